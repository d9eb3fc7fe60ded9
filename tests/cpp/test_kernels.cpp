// CPU box, dropout, frozen batch norm, MSDA and Winograd kernels under AddressSanitizer + UndefinedBehaviorSanitizer (CI
// builds this with -fsanitize=address,undefined): results against naive scalar twins, gradients against finite
// differences, hostile inputs (NaN/inf locations, corners outside the map, empty sizes) without any out-of-bounds
// access.
#include <cmath>
#include <cstdio>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "box_ops.h"
#include "dropout.h"
#include "frozen_bn.h"
#include "ms_deform_attn.h"
#include "winograd.h"

using namespace detrcore;

static int failures = 0;
static int checks = 0;
#define EXPECT_NEAR(a, b, tol)                                                                        \
  do {                                                                                                \
    ++checks;                                                                                         \
    const double a_ = (a), b_ = (b);                                                                  \
    if (!(std::fabs(a_ - b_) <= (tol) * (1 + std::fabs(b_)))) {                                       \
      std::fprintf(stderr, "FAILED %s:%d: %s = %.10g vs %s = %.10g\n", __FILE__, __LINE__, #a, a_, #b, b_); \
      ++failures;                                                                                     \
    }                                                                                                 \
  } while (0)

static std::mt19937 rng(1234);
static double uni(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }

static std::vector<double> random_boxes(int n) {
  std::vector<double> b(4 * n);
  for (int i = 0; i < n; ++i) {
    double cx = uni(0, 1), cy = uni(0, 1), w = uni(0, 0.4), h = uni(0, 0.4);
    if (i % 7 == 3) w = 0;          // degenerate
    if (i % 11 == 5) w = -0.1;      // inverted
    b[4 * i] = cx - w / 2, b[4 * i + 1] = cy - h / 2, b[4 * i + 2] = cx + w / 2, b[4 * i + 3] = cy + h / 2;
  }
  return b;
}

static void test_boxes() {
  const int B = 2, N = 37, M = 5;
  auto a = random_boxes(B * N), b = random_boxes(B * M);
  std::vector<double> out(B * N * M), grad(B * N * M), ga(4 * B * N), gb(4 * B * M);
  for (auto& g : grad) g = uni(-1, 1);
  box_pairwise_cpu<double>(a.data(), b.data(), out.data(), B, N, M, true, 3);
  for (int bi = 0; bi < B; ++bi)
    for (int n = 0; n < N; ++n)
      for (int m = 0; m < M; ++m)
        EXPECT_NEAR(out[(bi * N + n) * M + m],
                    (boxmath::pair_forward<double, true>(&a[4 * (bi * N + n)], &b[4 * (bi * M + m)]).giou), 1e-12);
  box_pairwise_bwd_cpu<double>(grad.data(), a.data(), b.data(), ga.data(), gb.data(), B, N, M, true, 2);
  // finite differences of sum(grad * giou) on a few coordinates away from kinks
  auto objective = [&](const std::vector<double>& aa, const std::vector<double>& bb) {
    std::vector<double> o(B * N * M);
    box_pairwise_cpu<double>(aa.data(), bb.data(), o.data(), B, N, M, true, 1);
    double s = 0;
    for (size_t i = 0; i < o.size(); ++i) s += grad[i] * o[i];
    return s;
  };
  const double eps = 1e-7;
  for (int idx : {0, 5, 9, 18, 26}) {  // boxes 0, 1, 2, 4, 6: away from the degenerate ones (kinks)
    auto ap = a, am = a;
    ap[idx] += eps, am[idx] -= eps;
    const double fd = (objective(ap, b) - objective(am, b)) / (2 * eps);
    EXPECT_NEAR(ga[idx], fd, 1e-4);
  }
  for (int idx : {0, 3, 9, 30}) {
    auto bp = b, bm = b;
    bp[idx] += eps, bm[idx] -= eps;
    const double fd = (objective(a, bp) - objective(a, bm)) / (2 * eps);
    EXPECT_NEAR(gb[idx], fd, 1e-4);
  }
  // empty sizes touch nothing
  box_pairwise_cpu<double>(a.data(), b.data(), nullptr, B, 0, M, true, 2);
  box_pairwise_bwd_cpu<double>(nullptr, a.data(), b.data(), ga.data(), gb.data(), B, N, 0, true, 2);
  std::vector<float> x = {0.f, 1.f, -1.f, 2.f, NAN, INFINITY, 0.5f}, y(x.size()), gx(x.size()), g(x.size(), 1.f);
  inverse_sigmoid_cpu<float>(x.data(), y.data(), static_cast<int64_t>(x.size()), 1e-5, 2);
  inverse_sigmoid_bwd_cpu<float>(g.data(), x.data(), gx.data(), static_cast<int64_t>(x.size()), 1e-5, 2);
  EXPECT_NEAR(y[6], 0.0, 1e-6);
  EXPECT_NEAR(gx[5], 0.0, 0);
}

// Naive MSDA forward: grid_sample(align_corners=False, zeros) per sample.
static double sample(const std::vector<double>& v, int64_t S, int64_t H, int64_t D, int64_t b, int64_t h, int64_t d,
                     int64_t start, int64_t hl, int64_t wl, double lx, double ly) {
  const double x = lx * wl - 0.5, y = ly * hl - 0.5;
  if (!(x > -1 && y > -1 && x < wl && y < hl)) return 0;
  const double fx = std::floor(x), fy = std::floor(y);
  double acc = 0;
  for (int dy = 0; dy < 2; ++dy)
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t xi = static_cast<int64_t>(fx) + dx, yi = static_cast<int64_t>(fy) + dy;
      if (xi < 0 || yi < 0 || xi >= wl || yi >= hl) continue;
      const double w = (dx ? x - fx : 1 - (x - fx)) * (dy ? y - fy : 1 - (y - fy));
      acc += w * v[((b * S + start + yi * wl + xi) * H + h) * D + d];
    }
  return acc;
}

// Dropout: the forward against a scalar twin of its definition, the three threads agreeing with one, the mask
// regenerated by the backward, the fused ReLU backward, odd lengths (vector tails) and the empty tensor.
static void test_dropout() {
  for (int64_t n : {0, 1, 7, 33, 40000, 100003}) {
    std::vector<float> x(n), y(n), y1(n), yr(n), g(n), gx(n), gr(n);
    for (auto& v : x) v = static_cast<float>(uni(-2, 2));
    for (auto& v : g) v = static_cast<float>(uni(-1, 1));
    const uint64_t seed = 0x1234567890abcdefull + n;
    const uint32_t threshold = 1288490189u;  // p = 0.3
    const float scale = 1.0f / 0.7f;
    dropout_cpu<float>(x.data(), y.data(), n, seed, threshold, scale, false, 3);
    dropout_cpu<float>(x.data(), y1.data(), n, seed, threshold, scale, false, 1);
    dropout_cpu<float>(x.data(), yr.data(), n, seed, threshold, scale, true, 2);
    dropout_bwd_cpu<float>(g.data(), gx.data(), n, seed, threshold, scale, 2);
    relu_dropout_bwd_cpu<float>(g.data(), yr.data(), gr.data(), n, scale, 3);
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool keep = dropout_draw(seed, static_cast<uint64_t>(i)) >= threshold;
      kept += keep;
      EXPECT_NEAR(y[i], keep ? x[i] * scale : 0.0f, 0);
      EXPECT_NEAR(y1[i], y[i], 0);
      EXPECT_NEAR(yr[i], keep && x[i] > 0 ? x[i] * scale : 0.0f, 0);
      EXPECT_NEAR(gx[i], keep ? g[i] * scale : 0.0f, 0);
      EXPECT_NEAR(gr[i], keep && x[i] > 0 ? g[i] * scale : 0.0f, 0);
    }
    if (n >= 40000) EXPECT_NEAR(static_cast<double>(kept) / n, 0.7, 0.02);
    if (n >= 40000) {  // the two halves of one SplitMix64 output decide independently: both dropped ~ p^2
      int64_t both = 0;
      for (int64_t k = 0; 2 * k + 1 < n; ++k)
        both += dropout_draw(seed, 2 * k) < threshold && dropout_draw(seed, 2 * k + 1) < threshold;
      EXPECT_NEAR(static_cast<double>(both) / (n / 2), 0.09, 0.01);
    }
  }
}

static void test_msda() {
  const int64_t B = 2, H = 3, D = 5, Q = 4, P = 2;
  const std::vector<int64_t> shapes = {4, 3, 2, 2, 1, 1};  // (h, w) per level
  const std::vector<int64_t> starts = {0, 12, 16};
  const int64_t L = 3, S = 17;
  MsdaShape s{B, S, H, D, Q, L, P};
  std::vector<double> value(B * S * H * D), loc(B * Q * H * L * P * 2), attn(B * Q * H * L * P);
  for (auto& x : value) x = uni(-1, 1);
  for (size_t i = 0; i < loc.size(); ++i) loc[i] = uni(-0.3, 1.3);
  loc[0] = NAN, loc[3] = INFINITY, loc[5] = -1e300;  // hostile locations
  for (auto& x : attn) x = uni(0, 1);
  std::vector<double> out(B * Q * H * D);
  ms_deform_attn_fwd_cpu<double>(value.data(), shapes.data(), starts.data(), loc.data(), attn.data(), out.data(), s, 3);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) {
          double want = 0;
          for (int64_t l = 0; l < L; ++l)
            for (int64_t p = 0; p < P; ++p) {
              const int64_t k = (((b * Q + q) * H + h) * L + l) * P + p;
              want += attn[k] * sample(value, S, H, D, b, h, d, starts[l], shapes[2 * l], shapes[2 * l + 1],
                                       loc[2 * k], loc[2 * k + 1]);
            }
          EXPECT_NEAR(out[((b * Q + q) * H + h) * D + d], want, 1e-12);
        }
  // backward: grad_attn and grad_value against the linear structure (out is linear in value and attn)
  std::vector<double> g(out.size()), gv(value.size()), gl(loc.size()), ga(attn.size());
  for (auto& x : g) x = uni(-1, 1);
  ms_deform_attn_bwd_cpu<double>(value.data(), shapes.data(), starts.data(), loc.data(), attn.data(), g.data(),
                                 gv.data(), gl.data(), ga.data(), s, 2);
  auto objective = [&](const std::vector<double>& v, const std::vector<double>& a, const std::vector<double>& lc) {
    std::vector<double> o(out.size());
    ms_deform_attn_fwd_cpu<double>(v.data(), shapes.data(), starts.data(), lc.data(), a.data(), o.data(), s, 1);
    double sum = 0;
    for (size_t i = 0; i < o.size(); ++i) sum += g[i] * o[i];
    return sum;
  };
  const double eps = 1e-6;
  for (int idx : {1, 7, 33, 100, 200}) {
    auto vp = value, vm = value;
    vp[idx] += eps, vm[idx] -= eps;
    EXPECT_NEAR(gv[idx], (objective(vp, attn, loc) - objective(vm, attn, loc)) / (2 * eps), 1e-5);
    auto ap = attn, am = attn;
    ap[idx % attn.size()] += eps, am[idx % attn.size()] -= eps;
    EXPECT_NEAR(ga[idx % attn.size()], (objective(value, ap, loc) - objective(value, am, loc)) / (2 * eps), 1e-5);
  }
  for (int idx : {9, 20, 41}) {
    auto lp = loc, lm = loc;
    lp[idx] += eps, lm[idx] -= eps;
    EXPECT_NEAR(gl[idx], (objective(value, attn, lp) - objective(value, attn, lm)) / (2 * eps), 1e-4);
  }
  EXPECT_NEAR(gl[0], 0.0, 0);  // NaN location: no contribution, zero gradient
  // inconsistent metadata (a level running past S) must not read or write out of bounds
  const std::vector<int64_t> bad_starts = {0, 12, 16 + 1000};
  ms_deform_attn_fwd_cpu<double>(value.data(), shapes.data(), bad_starts.data(), loc.data(), attn.data(), out.data(), s,
                                 2);
  ms_deform_attn_bwd_cpu<double>(value.data(), shapes.data(), bad_starts.data(), loc.data(), attn.data(), g.data(),
                                 gv.data(), gl.data(), ga.data(), s, 2);
}

// The float kernels' AVX2 path (D = 32, L * P = 8, and 6: a partial group of slots) against the scalar kernels, in
// both backward strategies, with
// locations on the edges, outside and non-finite; metadata that overruns S falls back to the bounds-checked
// scalar kernels.
static void test_msda_simd() {
  const bool simd = ms_deform_attn_cpu_simd(-1);
  std::printf("test_kernels: MSDA AVX2 path %s\n", simd ? "on" : "not available: comparing the scalar kernels");
  const int64_t B = 2, H = 2, D = 32, L = 2, S = 5 * 7 + 3 * 2;
  const std::vector<int64_t> shapes = {5, 7, 3, 2}, starts = {0, 35};
  // Q = 3: in place (Q * L * P < S); Q = 40: head-local copies
  for (const auto& [P, Q] : std::vector<std::pair<int64_t, int64_t>>{{4, 3}, {4, 40}, {3, 3}, {3, 40}}) {
    MsdaShape s{B, S, H, D, Q, L, P};
    std::vector<float> value(B * S * H * D), loc(B * Q * H * L * P * 2), attn(B * Q * H * L * P), g(B * Q * H * D);
    for (auto& x : value) x = static_cast<float>(uni(-1, 1));
    for (auto& x : loc) x = static_cast<float>(uni(-0.3, 1.3));
    for (auto& x : attn) x = static_cast<float>(uni(0, 1));
    for (auto& x : g) x = static_cast<float>(uni(-1, 1));
    const float hostile[] = {NAN, INFINITY, -INFINITY, -1e30f, 3e9f, 0.0f, 1.0f, -0.1f, 1.1f};
    for (size_t i = 0; i < sizeof(hostile) / sizeof(float); ++i) loc[7 * i + 1] = hostile[i];
    std::vector<float> out[2], gv[2], gl[2], ga[2];
    for (int on = 0; on < 2; ++on) {
      ms_deform_attn_cpu_simd(on);
      out[on].resize(B * Q * H * D), gv[on].resize(value.size()), gl[on].resize(loc.size()), ga[on].resize(attn.size());
      ms_deform_attn_fwd_cpu<float>(value.data(), shapes.data(), starts.data(), loc.data(), attn.data(),
                                    out[on].data(), s, 2);
      ms_deform_attn_bwd_cpu<float>(value.data(), shapes.data(), starts.data(), loc.data(), attn.data(), g.data(),
                                    gv[on].data(), gl[on].data(), ga[on].data(), s, 2);
    }
    for (size_t i = 0; i < out[0].size(); ++i) EXPECT_NEAR(out[1][i], out[0][i], 1e-5);
    for (size_t i = 0; i < gv[0].size(); ++i) EXPECT_NEAR(gv[1][i], gv[0][i], 1e-5);
    for (size_t i = 0; i < gl[0].size(); ++i) EXPECT_NEAR(gl[1][i], gl[0][i], 1e-4);
    for (size_t i = 0; i < ga[0].size(); ++i) EXPECT_NEAR(ga[1][i], ga[0][i], 1e-5);
    EXPECT_NEAR(gl[1][0], 0.0, 0);  // loc[1] is NaN: the sample contributes nothing, its gradients are zero
    EXPECT_NEAR(ga[1][0], 0.0, 0);
    const std::vector<int64_t> bad_starts = {0, 35 + 1000};
    ms_deform_attn_fwd_cpu<float>(value.data(), shapes.data(), bad_starts.data(), loc.data(), attn.data(),
                                  out[1].data(), s, 2);
    ms_deform_attn_bwd_cpu<float>(value.data(), shapes.data(), bad_starts.data(), loc.data(), attn.data(), g.data(),
                                  gv[1].data(), gl[1].data(), ga[1].data(), s, 2);
  }
  ms_deform_attn_cpu_simd(simd);
}

// Frozen batch norm (+ residual, + ReLU) and its backward against a scalar twin, in float (exact: the same
// expression) and bfloat16 (computed in float, rounded once), over sizes with empty, tiny and multi-thread planes.
static void test_frozen_bn() {
  for (auto [N, C, HW] : {std::tuple<int64_t, int64_t, int64_t>{0, 3, 5}, {1, 1, 1}, {2, 5, 7}, {3, 4, 20000}}) {
    const int64_t n = N * C * HW;
    std::vector<float> x(n), r(n), g(n), scale(C), shift(C);
    for (auto& v : x) v = static_cast<float>(uni(-2, 2));
    for (auto& v : r) v = static_cast<float>(uni(-1, 1));
    for (auto& v : g) v = static_cast<float>(uni(-1, 1));
    for (auto& v : scale) v = static_cast<float>(uni(-2, 2));
    for (auto& v : shift) v = static_cast<float>(uni(-1, 1));
    for (bool relu : {false, true}) {
      for (bool residual : {false, true}) {
        std::vector<float> y(n), gx(n), gr(n);
        frozen_bn_cpu<float>(x.data(), residual ? r.data() : nullptr, scale.data(), shift.data(), y.data(), N, C, HW,
                             relu, 3);
        frozen_bn_bwd_cpu<float>(g.data(), y.data(), scale.data(), gx.data(), residual ? gr.data() : nullptr, N, C,
                                 HW, relu, 2);
        std::vector<BFloat16> xb(n), rb(n), yb(n), gb(n), gxb(n), grb(n);
        for (int64_t i = 0; i < n; ++i)
          xb[i] = Elem<BFloat16>::store(x[i]), rb[i] = Elem<BFloat16>::store(r[i]), gb[i] = Elem<BFloat16>::store(g[i]);
        frozen_bn_cpu<BFloat16>(xb.data(), residual ? rb.data() : nullptr, scale.data(), shift.data(), yb.data(), N, C,
                                HW, relu, 2);
        frozen_bn_bwd_cpu<BFloat16>(gb.data(), yb.data(), scale.data(), gxb.data(), residual ? grb.data() : nullptr,
                                    N, C, HW, relu, 3);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t c = (i / HW) % C;
          float v = x[i] * scale[c] + shift[c];
          if (residual) v += r[i];
          if (relu) v = v > 0 ? v : 0.0f;
          EXPECT_NEAR(y[i], v, 0);
          const float gm = relu && !(v > 0) ? 0.0f : g[i];
          EXPECT_NEAR(gx[i], gm * scale[c], 0);
          if (residual) EXPECT_NEAR(gr[i], gm, 0);
          float vb = Elem<BFloat16>::load(xb[i]) * scale[c] + shift[c];
          if (residual) vb += Elem<BFloat16>::load(rb[i]);
          if (relu) vb = vb > 0 ? vb : 0.0f;
          EXPECT_NEAR(Elem<BFloat16>::load(yb[i]), Elem<BFloat16>::load(Elem<BFloat16>::store(vb)), 0);
          const float gbm = relu && !(Elem<BFloat16>::load(yb[i]) > 0) ? 0.0f : Elem<BFloat16>::load(gb[i]);
          EXPECT_NEAR(Elem<BFloat16>::load(gxb[i]), Elem<BFloat16>::load(Elem<BFloat16>::store(gbm * scale[c])), 0);
        }
      }
    }
  }
}

// Winograd F(2x2, 3x3) and F(4x4, 3x3): transforms around naive products against a direct convolution (forward,
// input and weight gradients) in double, odd sizes included.
static void test_winograd(int tile) {
  for (auto [N, C, K, H, W] : {std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>{1, 1, 1, 1, 1}, {2, 3, 4, 5, 7},
                               {1, 2, 3, 6, 2}, {3, 5, 2, 9, 8}, {1, 2, 2, 13, 11}}) {
    const int64_t T = winograd_tiles(N, H, W, tile), P = winograd_points(tile);
    std::vector<double> x(N * C * H * W), w(K * C * 9), g(N * K * H * W);
    for (auto* v : {&x, &w, &g})
      for (auto& e : *v) e = uni(-1, 1);
    std::vector<double> U(P * K * C), V(P * C * T), M(P * K * T, 0.0), y(N * K * H * W);
    winograd_weight_cpu<double>(w.data(), U.data(), K * C, 2, tile);
    winograd_input_cpu<double>(x.data(), V.data(), N, C, H, W, 3, tile);
    for (int64_t xi = 0; xi < P; ++xi)  // M = U V per position xi
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t t = 0; t < T; ++t) M[(xi * K + k) * T + t] += U[(xi * K + k) * C + c] * V[(xi * C + c) * T + t];
    winograd_output_cpu<double>(M.data(), nullptr, y.data(), N, K, H, W, 2, tile);
    std::vector<double> gM(P * K * T), gV(P * C * T, 0.0), gU(P * K * C, 0.0), gx(N * C * H * W), gw(K * C * 9);
    winograd_output_adjoint_cpu<double>(g.data(), gM.data(), N, K, H, W, 2, tile);
    for (int64_t xi = 0; xi < P; ++xi)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t t = 0; t < T; ++t) {
            gV[(xi * C + c) * T + t] += U[(xi * K + k) * C + c] * gM[(xi * K + k) * T + t];
            gU[(xi * K + k) * C + c] += gM[(xi * K + k) * T + t] * V[(xi * C + c) * T + t];
          }
    winograd_input_adjoint_cpu<double>(gV.data(), gx.data(), N, C, H, W, 3, tile);
    winograd_weight_adjoint_cpu<double>(gU.data(), gw.data(), K * C, 1, tile);
    std::vector<double> ry(N * K * H * W, 0.0), rgx(N * C * H * W, 0.0), rgw(K * C * 9, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < H; ++i)
            for (int64_t j = 0; j < W; ++j)
              for (int64_t p = 0; p < 3; ++p)
                for (int64_t q = 0; q < 3; ++q) {
                  const int64_t r = i + p - 1, s = j + q - 1;
                  if (r < 0 || r >= H || s < 0 || s >= W) continue;
                  const int64_t yi = ((n * K + k) * H + i) * W + j, xi = ((n * C + c) * H + r) * W + s;
                  const int64_t wi = (k * C + c) * 9 + 3 * p + q;
                  ry[yi] += w[wi] * x[xi];
                  rgx[xi] += w[wi] * g[yi];
                  rgw[wi] += x[xi] * g[yi];
                }
    for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], ry[i], 1e-12);
    for (size_t i = 0; i < gx.size(); ++i) EXPECT_NEAR(gx[i], rgx[i], 1e-12);
    for (size_t i = 0; i < gw.size(); ++i) EXPECT_NEAR(gw[i], rgw[i], 1e-12);
  }
}

int main() {
  test_boxes();
  test_dropout();
  test_frozen_bn();
  test_msda();
  test_msda_simd();
  test_winograd(2);
  test_winograd(4);
  std::printf("test_kernels: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
