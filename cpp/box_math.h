// Per-box and per-pair math shared by the CPU (box_ops.cpp) and CUDA (cuda/box_ops.cu) kernels.
// Everything here is computed in the accumulation type A (float for half/bfloat16/float, double for double).
//
// Definitions (boxes are xyxy unless named otherwise; documented in python/detrcore/ops/boxes.py):
//   area(a)  = max(x1 - x0, 0) * max(y1 - y0, 0)            inverted boxes have zero area
//   inter    = max(min(ax1, bx1) - max(ax0, bx0), 0) * (same in y)
//   union    = area(a) + area(b) - inter                    >= 0
//   iou      = inter / union if union > 0 else 0            two empty boxes do not overlap
//   enclose  = max(max(ax1, bx1) - min(ax0, bx0), 0) * (same in y)   >= union
//   giou     = iou - (enclose - union) / enclose if enclose > 0 else iou
// Gradients follow PyTorch's conventions for the same expression written with clamp/minimum/maximum: a clamp
// at its boundary passes the gradient, and a tie in min/max splits it in half. They are exact derivatives
// wherever the function is differentiable, and finite everywhere.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define DETRCORE_HD __host__ __device__ __forceinline__
#else
#define DETRCORE_HD inline
#endif

namespace detrcore {
namespace boxmath {

enum BoxMap : int {
  kCxcywhToXyxy = 0,      // (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2)
  kXyxyToCxcywh = 1,      // (x0, y0, x1, y1) -> ((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0)
  kCxcywhToXyxyGrad = 2,  // gradient of kCxcywhToXyxy w.r.t. its input, given the output's gradient
  kXyxyToCxcywhGrad = 3,  // gradient of kXyxyToCxcywh w.r.t. its input
};

template <typename A>
DETRCORE_HD void box_map(int kind, const A* in, A* out) {
  const A h = A(0.5);
  switch (kind) {
    case kCxcywhToXyxy:
      out[0] = in[0] - h * in[2], out[1] = in[1] - h * in[3], out[2] = in[0] + h * in[2], out[3] = in[1] + h * in[3];
      break;
    case kXyxyToCxcywh:
      out[0] = h * (in[0] + in[2]), out[1] = h * (in[1] + in[3]), out[2] = in[2] - in[0], out[3] = in[3] - in[1];
      break;
    case kCxcywhToXyxyGrad:
      out[0] = in[0] + in[2], out[1] = in[1] + in[3], out[2] = h * (in[2] - in[0]), out[3] = h * (in[3] - in[1]);
      break;
    default:  // kXyxyToCxcywhGrad
      out[0] = h * in[0] - in[2], out[1] = h * in[1] - in[3], out[2] = h * in[0] + in[2], out[3] = h * in[1] + in[3];
      break;
  }
}

// d min(p, q) / dp following torch.minimum (ties split in half); dmax likewise.
template <typename A>
DETRCORE_HD A dmin_first(A p, A q) {
  return p < q ? A(1) : (p == q ? A(0.5) : A(0));
}
template <typename A>
DETRCORE_HD A dmax_first(A p, A q) {
  return p > q ? A(1) : (p == q ? A(0.5) : A(0));
}

// The overlap terms of one pair, kept for the backward pass.
template <typename A>
struct Pair {
  A aw, ah, bw, bh;  // raw extents (may be negative)
  A area_a, area_b;
  A ix0, iy0, ix1, iy1, iw, ih, inter, uni, iou;
  A cx0, cy0, cx1, cy1, cw, ch, enclose, giou;
};

template <typename A>
DETRCORE_HD A clamp0(A x) {
  return x > A(0) ? x : A(0);
}
template <typename A>
DETRCORE_HD A min2(A p, A q) {
  return q < p ? q : p;
}
template <typename A>
DETRCORE_HD A max2(A p, A q) {
  return q > p ? q : p;
}

// Branch-free (selects only), so the CPU loops vectorise; kGiou adds the enclosing-box term.
template <typename A, bool kGiou>
DETRCORE_HD Pair<A> pair_forward(const A* a, const A* b) {
  Pair<A> p;
  p.aw = a[2] - a[0], p.ah = a[3] - a[1], p.bw = b[2] - b[0], p.bh = b[3] - b[1];
  p.area_a = clamp0(p.aw) * clamp0(p.ah);
  p.area_b = clamp0(p.bw) * clamp0(p.bh);
  p.ix0 = max2(a[0], b[0]), p.iy0 = max2(a[1], b[1]), p.ix1 = min2(a[2], b[2]), p.iy1 = min2(a[3], b[3]);
  p.iw = p.ix1 - p.ix0, p.ih = p.iy1 - p.iy0;
  p.inter = clamp0(p.iw) * clamp0(p.ih);
  p.uni = p.area_a + p.area_b - p.inter;
  const bool has_union = p.uni > A(0);
  p.iou = p.inter / (has_union ? p.uni : A(1));  // inter == 0 whenever uni == 0
  p.giou = p.iou;
  if (kGiou) {
    p.cx0 = min2(a[0], b[0]), p.cy0 = min2(a[1], b[1]), p.cx1 = max2(a[2], b[2]), p.cy1 = max2(a[3], b[3]);
    p.cw = p.cx1 - p.cx0, p.ch = p.cy1 - p.cy0;
    p.enclose = clamp0(p.cw) * clamp0(p.ch);
    const bool has_enclose = p.enclose > A(0);
    const A c = has_enclose ? p.enclose : A(1);
    p.giou = has_enclose ? p.iou - (c - p.uni) / c : p.iou;
  } else {
    p.cx0 = p.cy0 = p.cx1 = p.cy1 = p.cw = p.ch = p.enclose = A(0);
  }
  return p;
}

// Accumulates g * d(value)/d(a) into ga[4] and g * d(value)/d(b) into gb[4], where value is the pair's
// giou (kGiou) or iou. Branch-free like pair_forward.
template <typename A, bool kGiou>
DETRCORE_HD void pair_backward(const A* a, const A* b, const Pair<A>& p, A g, A* ga, A* gb) {
  // value = iou(inter, uni) [+ uni / enclose - 1 when enclose > 0]; uni = area_a + area_b - inter.
  const bool has_union = p.uni > A(0);
  const A u = has_union ? p.uni : A(1);
  A d_inter = has_union ? g / u : A(0);
  A d_uni = has_union ? -g * p.inter / (u * u) : A(0);
  A d_enc = A(0);
  if (kGiou) {
    const bool has_enclose = p.enclose > A(0);
    const A c = has_enclose ? p.enclose : A(1);
    d_uni += has_enclose ? g / c : A(0);
    d_enc = has_enclose ? -g * p.uni / (c * c) : A(0);
  }
  d_inter -= d_uni;  // through uni = ... - inter
  const A d_area_a = d_uni, d_area_b = d_uni;

  // area_a = clamp0(aw) * clamp0(ah); a clamp at 0 passes the gradient (x >= 0).
  const A pa_w = p.aw >= A(0) ? d_area_a * clamp0(p.ah) : A(0);
  const A pa_h = p.ah >= A(0) ? d_area_a * clamp0(p.aw) : A(0);
  const A pb_w = p.bw >= A(0) ? d_area_b * clamp0(p.bh) : A(0);
  const A pb_h = p.bh >= A(0) ? d_area_b * clamp0(p.bw) : A(0);
  ga[0] -= pa_w, ga[2] += pa_w, ga[1] -= pa_h, ga[3] += pa_h;
  gb[0] -= pb_w, gb[2] += pb_w, gb[1] -= pb_h, gb[3] += pb_h;

  // inter = clamp0(ix1 - ix0) * clamp0(iy1 - iy0); ix0 = max(a0, b0), ix1 = min(a2, b2), ...
  const A d_iw = p.iw >= A(0) ? d_inter * clamp0(p.ih) : A(0);
  const A d_ih = p.ih >= A(0) ? d_inter * clamp0(p.iw) : A(0);
  ga[2] += d_iw * dmin_first(a[2], b[2]), gb[2] += d_iw * dmin_first(b[2], a[2]);
  ga[0] -= d_iw * dmax_first(a[0], b[0]), gb[0] -= d_iw * dmax_first(b[0], a[0]);
  ga[3] += d_ih * dmin_first(a[3], b[3]), gb[3] += d_ih * dmin_first(b[3], a[3]);
  ga[1] -= d_ih * dmax_first(a[1], b[1]), gb[1] -= d_ih * dmax_first(b[1], a[1]);

  if (kGiou) {
    // enclose = clamp0(cx1 - cx0) * clamp0(cy1 - cy0); cx0 = min(a0, b0), cx1 = max(a2, b2), ...
    const A d_cw = p.cw >= A(0) ? d_enc * clamp0(p.ch) : A(0);
    const A d_ch = p.ch >= A(0) ? d_enc * clamp0(p.cw) : A(0);
    ga[2] += d_cw * dmax_first(a[2], b[2]), gb[2] += d_cw * dmax_first(b[2], a[2]);
    ga[0] -= d_cw * dmin_first(a[0], b[0]), gb[0] -= d_cw * dmin_first(b[0], a[0]);
    ga[3] += d_ch * dmax_first(a[3], b[3]), gb[3] += d_ch * dmax_first(b[3], a[3]);
    ga[1] -= d_ch * dmin_first(a[1], b[1]), gb[1] -= d_ch * dmin_first(b[1], a[1]);
  }
}

// inverse_sigmoid(x, eps) = log(max(c, eps) / max(1 - c, eps)) with c = clamp(x, 0, 1).
template <typename A>
DETRCORE_HD A inverse_sigmoid(A x, A eps) {
  const A c = min2(max2(x, A(0)), A(1));
  return std::log(max2(c, eps) / max2(A(1) - c, eps));
}
template <typename A>
DETRCORE_HD A inverse_sigmoid_grad(A x, A eps, A g) {
  if (!(x >= A(0) && x <= A(1))) return A(0);  // outside [0, 1] (or NaN): the clamp blocks it
  A d = 0;
  if (x >= eps) d += A(1) / x;
  if (A(1) - x >= eps) d += A(1) / (A(1) - x);
  return g * d;
}

}  // namespace boxmath
}  // namespace detrcore
