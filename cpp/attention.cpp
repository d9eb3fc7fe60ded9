// CPU multi-head attention with dropout (contract in attention.h).
//
// A task works on one (b, h) pair (the backward; the forward when there are enough pairs for the threads, else on a
// block of its query rows). It copies its head's keys and values into per-thread buffers laid out for the loops
// below (k transposed, [D][ld] with ld = Lk rounded up to kChunk and zero-padded, so that a row of scores is a sum
// over D of scaled key rows; v as packed rows), then takes its query rows four at a time (the last one to three in
// a pair and alone): scores, masked softmax (stored for the backward), the dropout mask regenerated from the
// counter-based stream, the weighted sum of value rows. The backward first goes over the rows, four at a time:
// dP = dO v^T, dS = a * (dA - <dA, a>) with dA the dropout-masked dP, dq = scale dS k, keeping dS and the
// dropped-out weights of every row; then over the keys, four at a time: dk = dS^T (scale q), dv = (dropped-out
// a)^T dO. Every product is a sum of scaled vector rows, with up to four outputs sharing each loaded vector.
//
// The loops use 32-byte GCC / Clang vector types (AVX registers in the x86-64-v3 / v4 clones, SSE pairs in the
// baseline); float's exp is a branch-free polynomial on them (below), double's is std::exp. The float32 backward on
// AVX-512 CPUs runs its products over 4-vector chunks (16 sums: AVX-512's 32 registers hold them). Measured at
// Deformable DETR's decoder shape (2 x 300 queries, 8 heads of 32, 2 threads, Zen 4): forward 1.7 ms, backward 2.4
// (2.8 with 2-vector chunks).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "dropout.h"
#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DETRCORE_ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DETRCORE_ATTN_CLONES
#endif

namespace detrcore {
namespace {

constexpr int64_t kChunk = 32;  // the transposed buffers' rows are padded to a multiple of this many values

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <typename T>
T* scratch(size_t n, int slot) {
  static thread_local std::vector<T> buf[6];
  if (buf[slot].size() < std::max<size_t>(n, 1)) buf[slot].resize(std::max<size_t>(n, 1));  // never null
  return buf[slot].data();
}

// exp(x) for float lanes: x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two for an exact n ln2), e^r by Cephes' degree-6
// polynomial (about 1 ulp on [-87, 88]), times 2^n built in the exponent bits. 0 below -87.3 (and for -inf), +inf
// above 88.7, NaN for NaN. Branch-free, so that a loop over it vectorises.
inline float exp_lane(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.7f);
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round to nearest integer in the mantissa
  const float n = t - 12582912.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof ti);
  const int32_t e = (ti - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r + 1.0f) * scale;
  return x < -87.3f ? 0.0f : (x > 88.7f ? std::numeric_limits<float>::infinity() : (x != x ? x : y));
}
inline double exp_lane(double x) { return std::exp(x); }

// The dropout factors of one row: f[j] = keep_scale if element base + j is kept, else 0 (dropout.h's draws).
template <typename T>
inline __attribute__((always_inline)) void keep_factors(uint64_t seed, uint64_t base, uint32_t threshold,
                                                        T keep_scale, int64_t n, T* __restrict__ f) {
  const int64_t i0 = static_cast<int64_t>(base);
  for_each_keep(i0, i0 + n, seed, threshold,
                [&](int64_t i, bool keep) __attribute__((always_inline)) { f[i - i0] = keep ? keep_scale : T(0); });
}

// 32-byte lanes of T (GCC / Clang vector extensions: AVX registers in the v3 / v4 clones, SSE pairs otherwise).
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);
template <typename T>
inline __attribute__((always_inline)) Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline __attribute__((always_inline)) void vstore(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
inline __attribute__((always_inline)) T hsum(const Vec<T>& v) {
  T s = 0;
  for (int64_t i = 0; i < kLanes<T>; ++i) s += v[i];
  return s;
}

// s[j] = sum_c x[c] * mt[c * ld + j] for j < n (mt: D rows of ld values, ld a multiple of kChunk, zero-padded).
template <typename T>
inline __attribute__((always_inline)) void row_times_transposed(const T* __restrict__ x, const T* __restrict__ mt,
                                                                int64_t ld, int64_t D, int64_t n, T* __restrict__ s) {
  constexpr int64_t W = kLanes<T>;
  static_assert(kChunk % (4 * W) == 0, "ld must hold whole groups of four vectors");
  for (int64_t j0 = 0; j0 < n; j0 += 4 * W) {
    Vec<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const T* m = mt + j0;
    for (int64_t c = 0; c < D; ++c, m += ld) {
      const T xc = x[c];
      a0 += xc * vload(m);
      a1 += xc * vload(m + W);
      a2 += xc * vload(m + 2 * W);
      a3 += xc * vload(m + 3 * W);
    }
    if (j0 + 4 * W <= n) {
      vstore(s + j0, a0), vstore(s + j0 + W, a1), vstore(s + j0 + 2 * W, a2), vstore(s + j0 + 3 * W, a3);
    } else {
      T tmp[4 * W];
      vstore(tmp, a0), vstore(tmp + W, a1), vstore(tmp + 2 * W, a2), vstore(tmp + 3 * W, a3);
      for (int64_t jj = 0; jj < n - j0; ++jj) s[j0 + jj] = tmp[jj];
    }
  }
}

// y[c] = scale * sum_j w[j * ws] * rows[j * D + c] for c < C (default D; rows packed, D apart).
template <typename T>
inline __attribute__((always_inline)) void weighted_rows(const T* __restrict__ w, const T* __restrict__ rows,
                                                         int64_t n, int64_t D, T scale, T* __restrict__ y,
                                                         int64_t C = -1, int64_t ws = 1) {
  constexpr int64_t W = kLanes<T>;
  if (C < 0) C = D;  // channels to compute (rows stay D apart)
  int64_t c0 = 0;
  for (; c0 + 4 * W <= C; c0 += 4 * W) {
    Vec<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const T* r = rows + c0;
    for (int64_t j = 0; j < n; ++j, r += D) {
      const T wj = w[j * ws];
      a0 += wj * vload(r);
      a1 += wj * vload(r + W);
      a2 += wj * vload(r + 2 * W);
      a3 += wj * vload(r + 3 * W);
    }
    vstore(y + c0, a0 * scale), vstore(y + c0 + W, a1 * scale), vstore(y + c0 + 2 * W, a2 * scale);
    vstore(y + c0 + 3 * W, a3 * scale);
  }
  for (; c0 + W <= C; c0 += W) {
    Vec<T> a = {};
    for (int64_t j = 0; j < n; ++j) a += w[j * ws] * vload(rows + j * D + c0);
    vstore(y + c0, a * scale);
  }
  for (; c0 < C; ++c0) {
    T a = 0;
    for (int64_t j = 0; j < n; ++j) a += w[j * ws] * rows[j * D + c0];
    y[c0] = a * scale;
  }
}

// sum_j x[j] (vector partial sums; n any).
template <typename T>
inline __attribute__((always_inline)) T sum_of(const T* __restrict__ x, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  Vec<T> a = {};
  int64_t j = 0;
  for (; j + W <= n; j += W) a += vload(x + j);
  T s = hsum<T>(a);
  for (; j < n; ++j) s += x[j];
  return s;
}

// max_j x[j] (-inf for n = 0; NaNs may be skipped: their row turns NaN through exp anyway).
template <typename T>
inline __attribute__((always_inline)) T max_of(const T* __restrict__ x, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  Vec<T> a = ninf - Vec<T>{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> v = vload(x + j);
    a = v > a ? v : a;
  }
  T m = ninf;
  for (int64_t i = 0; i < W; ++i) m = a[i] > m ? a[i] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Two rows at once of row_times_transposed and of weighted_rows: each loaded vector of mt / rows feeds two
// multiply-adds, and eight independent sums keep both FMA pipes busy (one row's four chains leave them half idle).
template <typename T>
inline __attribute__((always_inline)) void rows2_times_transposed(const T* __restrict__ x0, const T* __restrict__ x1,
                                                                  const T* __restrict__ mt, int64_t ld, int64_t D,
                                                                  int64_t n, T* __restrict__ s0,
                                                                  T* __restrict__ s1) {
  constexpr int64_t W = kLanes<T>;
  for (int64_t j0 = 0; j0 < n; j0 += 4 * W) {
    Vec<T> a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    const T* m = mt + j0;
    for (int64_t c = 0; c < D; ++c, m += ld) {
      const T u = x0[c], w = x1[c];
      const Vec<T> m0 = vload(m), m1 = vload(m + W), m2 = vload(m + 2 * W), m3 = vload(m + 3 * W);
      a0 += u * m0, a1 += u * m1, a2 += u * m2, a3 += u * m3;
      b0 += w * m0, b1 += w * m1, b2 += w * m2, b3 += w * m3;
    }
    if (j0 + 4 * W <= n) {
      vstore(s0 + j0, a0), vstore(s0 + j0 + W, a1), vstore(s0 + j0 + 2 * W, a2), vstore(s0 + j0 + 3 * W, a3);
      vstore(s1 + j0, b0), vstore(s1 + j0 + W, b1), vstore(s1 + j0 + 2 * W, b2), vstore(s1 + j0 + 3 * W, b3);
    } else {  // the last, partial chunk
      T tmp[8 * W];
      vstore(tmp, a0), vstore(tmp + W, a1), vstore(tmp + 2 * W, a2), vstore(tmp + 3 * W, a3);
      vstore(tmp + 4 * W, b0), vstore(tmp + 5 * W, b1), vstore(tmp + 6 * W, b2), vstore(tmp + 7 * W, b3);
      for (int64_t jj = 0; jj < n - j0; ++jj) s0[j0 + jj] = tmp[jj], s1[j0 + jj] = tmp[4 * W + jj];
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void weighted_rows2(const T* __restrict__ w0, const T* __restrict__ w1,
                                                          const T* __restrict__ rows, int64_t n, int64_t D, T scale,
                                                          T* __restrict__ y0, T* __restrict__ y1, int64_t ws = 1) {
  constexpr int64_t W = kLanes<T>;
  int64_t c0 = 0;
  for (; c0 + 4 * W <= D; c0 += 4 * W) {
    Vec<T> a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    const T* r = rows + c0;
    for (int64_t j = 0; j < n; ++j, r += D) {
      const T u = w0[j * ws], w = w1[j * ws];
      const Vec<T> r0 = vload(r), r1 = vload(r + W), r2 = vload(r + 2 * W), r3 = vload(r + 3 * W);
      a0 += u * r0, a1 += u * r1, a2 += u * r2, a3 += u * r3;
      b0 += w * r0, b1 += w * r1, b2 += w * r2, b3 += w * r3;
    }
    vstore(y0 + c0, a0 * scale), vstore(y0 + c0 + W, a1 * scale), vstore(y0 + c0 + 2 * W, a2 * scale);
    vstore(y0 + c0 + 3 * W, a3 * scale);
    vstore(y1 + c0, b0 * scale), vstore(y1 + c0 + W, b1 * scale), vstore(y1 + c0 + 2 * W, b2 * scale);
    vstore(y1 + c0 + 3 * W, b3 * scale);
  }
  if (c0 < D) {  // the rest of the channels, one row at a time
    weighted_rows(w0, rows + c0, n, D, scale, y0 + c0, D - c0, ws);
    weighted_rows(w1, rows + c0, n, D, scale, y1 + c0, D - c0, ws);
  }
}

// Four rows at once over chunks of kVecs vectors (4 * kVecs sums; each loaded vector feeds four multiply-adds): the
// forward's and the backward's main products. x and y rows are xs / ys apart; w rows wr apart (elements ws apart
// within). kVecs = 2 fits AVX2's 16 registers; the backward runs kVecs = 4 where AVX-512 gives 32 (see
// attention_bwd_cpu).
template <int kVecs, typename T>
inline __attribute__((always_inline)) void rows4_times_transposed(const T* __restrict__ x, int64_t xs,
                                                                  const T* __restrict__ mt, int64_t ld, int64_t D,
                                                                  int64_t n, T* __restrict__ s, int64_t ss) {
  constexpr int64_t W = kLanes<T>;
  static_assert(kChunk % (kVecs * W) == 0, "ld must hold whole chunks");
  for (int64_t j0 = 0; j0 < n; j0 += kVecs * W) {
    Vec<T> a[4][kVecs] = {};
    const T* m = mt + j0;
    for (int64_t c = 0; c < D; ++c, m += ld) {
      Vec<T> mv[kVecs];
      for (int v = 0; v < kVecs; ++v) mv[v] = vload(m + v * W);
      for (int r = 0; r < 4; ++r) {
        const T xr = x[r * xs + c];
        for (int v = 0; v < kVecs; ++v) a[r][v] += xr * mv[v];
      }
    }
    for (int r = 0; r < 4; ++r) {
      if (j0 + kVecs * W <= n) {
        for (int v = 0; v < kVecs; ++v) vstore(s + r * ss + j0 + v * W, a[r][v]);
      } else {  // the last, partial chunk
        T tmp[kVecs * W];
        for (int v = 0; v < kVecs; ++v) vstore(tmp + v * W, a[r][v]);
        for (int64_t jj = 0; jj < n - j0; ++jj) s[r * ss + j0 + jj] = tmp[jj];
      }
    }
  }
}

template <int kVecs, typename T>
inline __attribute__((always_inline)) void weighted_rows4(const T* __restrict__ w, int64_t wr, int64_t ws,
                                                          const T* __restrict__ rows, int64_t n, int64_t D, T scale,
                                                          T* __restrict__ y, int64_t ys) {
  constexpr int64_t W = kLanes<T>;
  int64_t c0 = 0;
  for (; c0 + kVecs * W <= D; c0 += kVecs * W) {
    Vec<T> a[4][kVecs] = {};
    const T* r = rows + c0;
    const T* wj = w;
    for (int64_t j = 0; j < n; ++j, r += D, wj += ws) {
      Vec<T> rv[kVecs];
      for (int v = 0; v < kVecs; ++v) rv[v] = vload(r + v * W);
      for (int q = 0; q < 4; ++q) {
        const T u = wj[q * wr];
        for (int v = 0; v < kVecs; ++v) a[q][v] += u * rv[v];
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < kVecs; ++v) vstore(y + q * ys + c0 + v * W, a[q][v] * scale);
  }
  if (c0 < D)  // the rest of the channels, one row at a time
    for (int64_t r = 0; r < 4; ++r) weighted_rows(w + r * wr, rows + c0, n, D, scale, y + r * ys + c0, D - c0, ws);
}

// The head's rows of a [B, L, H*D] tensor (row stride rs) packed ([L][D]) and, if mt, transposed ([D][ld], padded
// with zeros to ld).
template <typename T>
inline void pack_head(const T* src, int64_t rs, int64_t L, int64_t D, T* rows, T* mt, int64_t ld) {
  for (int64_t j = 0; j < L; ++j) {
    const T* s = src + j * rs;
    if (rows) std::copy_n(s, D, rows + j * D);  // (copy_n, not memcpy: empty tensors may have null data)
    if (mt)
      for (int64_t c = 0; c < D; ++c) mt[c * ld + j] = s[c];
  }
  if (mt)
    for (int64_t c = 0; c < D; ++c) std::fill(mt + c * ld + L, mt + (c + 1) * ld, T(0));
}

template <typename T>
inline __attribute__((always_inline)) void fwd_task(const AttnArgs<T>& a, int64_t task, int64_t per, T* out,
                                                    T* attn) {
  const int64_t blocks = (a.Lq + per - 1) / per;
  const int64_t bh = task / blocks, b = bh / a.H, h = bh % a.H;
  const int64_t i0 = (task % blocks) * per, i1 = std::min(a.Lq, i0 + per);
  const int64_t D = a.D, Lk = a.Lk, ld = round_up(Lk, kChunk), E = a.H * D;
  T* kt = scratch<T>(static_cast<size_t>(D * ld), 0);
  T* vr = scratch<T>(static_cast<size_t>(Lk * D), 1);
  T* s = scratch<T>(static_cast<size_t>(4 * ld), 2);  // four rows of scores, ld apart
  T* f = scratch<T>(static_cast<size_t>(ld), 3);
  T* qs = scratch<T>(static_cast<size_t>(4 * D), 4);
  pack_head(a.k + b * a.k_bs + h * D, a.k_rs, Lk, D, static_cast<T*>(nullptr), kt, ld);
  pack_head(a.v + b * a.v_bs + h * D, a.v_rs, Lk, D, vr, static_cast<T*>(nullptr), ld);
  const uint8_t* kpm = a.key_padding_mask ? a.key_padding_mask + b * Lk : nullptr;
  const T scale = static_cast<T>(a.scale), ks = static_cast<T>(a.keep_scale);
  const T ninf = -std::numeric_limits<T>::infinity();
  // Softmax of row i's scores in s (stored in attn), then s turned into its dropped-out weights. False for a row
  // with every key masked (filled with NaN, as torch's softmax gives).
  auto softmax_row = [&](int64_t i, T* s) __attribute__((always_inline)) {
    if (kpm)
      for (int64_t j = 0; j < Lk; ++j) s[j] = kpm[j] ? ninf : s[j];
    const T m = max_of(s, Lk);
    T* arow = attn + (bh * a.Lq + i) * Lk;
    if (m == ninf) {
      std::fill(arow, arow + Lk, std::numeric_limits<T>::quiet_NaN());
      T* orow = out + (b * a.Lq + i) * E + h * D;
      std::fill(orow, orow + D, std::numeric_limits<T>::quiet_NaN());
      return false;
    }
    for (int64_t j = 0; j < Lk; ++j) s[j] = exp_lane(s[j] - m);
    const T inv = T(1) / sum_of(s, Lk);
    for (int64_t j = 0; j < Lk; ++j) arow[j] = s[j] * inv;
    if (a.threshold) {
      keep_factors(a.seed, static_cast<uint64_t>((bh * a.Lq + i) * Lk), a.threshold, ks, Lk, f);
      for (int64_t j = 0; j < Lk; ++j) s[j] = arow[j] * f[j];
    } else {
      std::copy_n(arow, Lk, s);
    }
    return true;
  };
  // (q * scale) k^T, as nn.MultiheadAttention orders it
  auto scaled_q = [&](int64_t i, T* dst) __attribute__((always_inline)) {
    const T* qi = a.q + b * a.q_bs + i * a.q_rs + h * D;
    for (int64_t c = 0; c < D; ++c) dst[c] = qi[c] * scale;
  };
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    T* o0 = out + (b * a.Lq + i) * E + h * D;
    for (int64_t r = 0; r < 4; ++r) scaled_q(i + r, qs + r * D);
    rows4_times_transposed<2>(qs, D, kt, ld, D, Lk, s, ld);
    bool ok[4], all = true;
    for (int64_t r = 0; r < 4; ++r) all &= ok[r] = softmax_row(i + r, s + r * ld);
    if (all) {
      weighted_rows4<2>(s, ld, int64_t(1), vr, Lk, D, T(1), o0, E);
    } else {
      for (int64_t r = 0; r < 4; ++r)
        if (ok[r]) weighted_rows(s + r * ld, vr, Lk, D, T(1), o0 + r * E);
    }
  }
  for (; i < i1; i += 2) {
    T* o0 = out + (b * a.Lq + i) * E + h * D;
    scaled_q(i, qs);
    if (i + 1 < i1) {
      scaled_q(i + 1, qs + D);
      rows2_times_transposed(qs, qs + D, kt, ld, D, Lk, s, s + ld);
      const bool ok0 = softmax_row(i, s), ok1 = softmax_row(i + 1, s + ld);
      if (ok0 && ok1) {
        weighted_rows2(s, s + ld, vr, Lk, D, T(1), o0, o0 + E);
      } else if (ok0 || ok1) {
        weighted_rows(ok0 ? s : s + ld, vr, Lk, D, T(1), ok0 ? o0 : o0 + E);
      }
    } else {
      row_times_transposed(qs, kt, ld, D, Lk, s);
      if (softmax_row(i, s)) weighted_rows(s, vr, Lk, D, T(1), o0);
    }
  }
}

template <int kVecs, typename T>
inline __attribute__((always_inline)) void bwd_task(const AttnArgs<T>& a, int64_t bh, const T* grad_out,
                                                    const T* attn, T* grad_q, T* grad_k, T* grad_v) {
  const int64_t b = bh / a.H, h = bh % a.H;
  const int64_t D = a.D, Lq = a.Lq, Lk = a.Lk, ld = round_up(Lk, kChunk), E = a.H * D;
  T* kr = scratch<T>(static_cast<size_t>(Lk * D), 0);            // k rows
  T* vt = scratch<T>(static_cast<size_t>(D * ld), 1);            // v transposed
  T* qs = scratch<T>(static_cast<size_t>(2 * Lq * D), 2);        // scaled q rows, then dO rows
  T* ds = scratch<T>(static_cast<size_t>(2 * Lq * ld), 3);       // dS rows, then the dropped-out weights' rows
  T* f = scratch<T>(static_cast<size_t>(ld), 4);
  T* go = qs + Lq * D;
  T* pd = ds + Lq * ld;
  pack_head(a.k + b * a.k_bs + h * D, a.k_rs, Lk, D, kr, static_cast<T*>(nullptr), ld);
  pack_head(a.v + b * a.v_bs + h * D, a.v_rs, Lk, D, static_cast<T*>(nullptr), vt, ld);
  const T scale = static_cast<T>(a.scale), ks = static_cast<T>(a.keep_scale);
  const uint8_t* kpm = a.key_padding_mask ? a.key_padding_mask + b * Lk : nullptr;
  for (int64_t i = 0; i < Lq; ++i) {
    const T* qi = a.q + b * a.q_bs + i * a.q_rs + h * D;
    for (int64_t c = 0; c < D; ++c) qs[i * D + c] = qi[c] * scale;
    std::copy_n(grad_out + (b * Lq + i) * E + h * D, D, go + i * D);
  }
  // Rows four at a time: dP = dO v^T (of the dropped-out weights), dA = dP * keep / (1 - p), dS = a * (dA -
  // <dA, a>), dq = scale dS k.
  for (int64_t i = 0; i < Lq; i += 4) {
    const int64_t R = std::min<int64_t>(4, Lq - i);
    if (R == 4) {
      rows4_times_transposed<kVecs>(go + i * D, D, vt, ld, D, Lk, ds + i * ld, ld);
    } else {
      for (int64_t r = i; r < i + R; ++r) row_times_transposed(go + r * D, vt, ld, D, Lk, ds + r * ld);
    }
    for (int64_t r = i; r < i + R; ++r) {
      const T* arow = attn + (bh * Lq + r) * Lk;
      T* dsr = ds + r * ld;
      T* pdr = pd + r * ld;
      if (a.threshold) {
        keep_factors(a.seed, static_cast<uint64_t>((bh * Lq + r) * Lk), a.threshold, ks, Lk, f);
        for (int64_t j = 0; j < Lk; ++j) {
          dsr[j] *= f[j];
          pdr[j] = arow[j] * f[j];
        }
      } else {
        std::copy_n(arow, Lk, pdr);
      }
      for (int64_t j = 0; j < Lk; ++j) f[j] = dsr[j] * arow[j];
      const T dot = sum_of(f, Lk);
      for (int64_t j = 0; j < Lk; ++j) dsr[j] = arow[j] * (dsr[j] - dot);
      if (kpm)  // a masked score has no gradient (also in a row with every key masked, whose weights are NaN)
        for (int64_t j = 0; j < Lk; ++j) dsr[j] = kpm[j] ? T(0) : dsr[j];
    }
    T* gq = grad_q + (b * Lq + i) * E + h * D;
    if (R == 4) {
      weighted_rows4<kVecs>(ds + i * ld, ld, int64_t(1), kr, Lk, D, scale, gq, E);
    } else {
      for (int64_t r = 0; r < R; ++r) weighted_rows(ds + (i + r) * ld, kr, Lk, D, scale, gq + r * E);
    }
  }
  // Keys four at a time: dk[j] = sum_i dS[i][j] (scale q[i]), dv[j] = sum_i a'[i][j] dO[i].
  for (int64_t j = 0; j < Lk; j += 4) {
    T* gk = grad_k + (b * Lk + j) * E + h * D;
    T* gv = grad_v + (b * Lk + j) * E + h * D;
    if (j + 4 <= Lk) {
      weighted_rows4<kVecs>(ds + j, int64_t(1), ld, qs, Lq, D, T(1), gk, E);
      weighted_rows4<kVecs>(pd + j, int64_t(1), ld, go, Lq, D, T(1), gv, E);
    } else {
      for (int64_t r = 0; j + r < Lk; ++r) {
        weighted_rows(ds + j + r, qs, Lq, D, T(1), gk + r * E, -1, ld);
        weighted_rows(pd + j + r, go, Lq, D, T(1), gv + r * E, -1, ld);
      }
    }
  }
}

DETRCORE_ATTN_CLONES void fwd_range_f32(const AttnArgs<float>& a, int64_t t0, int64_t t1, int64_t per, float* out,
                                        float* attn) {
  for (int64_t t = t0; t < t1; ++t) fwd_task(a, t, per, out, attn);
}
DETRCORE_ATTN_CLONES void fwd_range_f64(const AttnArgs<double>& a, int64_t t0, int64_t t1, int64_t per, double* out,
                                        double* attn) {
  for (int64_t t = t0; t < t1; ++t) fwd_task(a, t, per, out, attn);
}
DETRCORE_ATTN_CLONES void bwd_range_f32(const AttnArgs<float>& a, int64_t t0, int64_t t1, const float* go,
                                        const float* attn, float* gq, float* gk, float* gv) {
  for (int64_t t = t0; t < t1; ++t) bwd_task<2>(a, t, go, attn, gq, gk, gv);
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
// The backward with 4-vector chunks (16 sums in registers: AVX-512's 32 vector registers hold them, AVX2's 16 would
// spill): at Deformable DETR's decoder shape (2 x 300 queries, 8 heads of 32, 2 threads, Zen 4) 2.72 -> 2.39 ms.
// The forward gained nothing from it (1.68 ms either way) and keeps 2-vector chunks.
__attribute__((target("arch=x86-64-v4"))) void bwd_range_f32_wide(const AttnArgs<float>& a, int64_t t0, int64_t t1,
                                                                   const float* go, const float* attn, float* gq,
                                                                   float* gk, float* gv) {
  for (int64_t t = t0; t < t1; ++t) bwd_task<4>(a, t, go, attn, gq, gk, gv);
}
const bool g_wide_backward = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f") &&
                              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                              __builtin_cpu_supports("avx512bw"));
#else
constexpr bool g_wide_backward = false;
void bwd_range_f32_wide(const AttnArgs<float>&, int64_t, int64_t, const float*, const float*, float*, float*,
                        float*) {}
#endif
DETRCORE_ATTN_CLONES void bwd_range_f64(const AttnArgs<double>& a, int64_t t0, int64_t t1, const double* go,
                                        const double* attn, double* gq, double* gk, double* gv) {
  for (int64_t t = t0; t < t1; ++t) bwd_task<2>(a, t, go, attn, gq, gk, gv);
}
inline void fwd_range(const AttnArgs<float>& a, int64_t t0, int64_t t1, int64_t per, float* o, float* at) {
  fwd_range_f32(a, t0, t1, per, o, at);
}
inline void fwd_range(const AttnArgs<double>& a, int64_t t0, int64_t t1, int64_t per, double* o, double* at) {
  fwd_range_f64(a, t0, t1, per, o, at);
}
inline void bwd_range(const AttnArgs<float>& a, int64_t t0, int64_t t1, const float* go, const float* at, float* gq,
                      float* gk, float* gv) {
  if (g_wide_backward && a.D % (4 * kLanes<float>) == 0) return bwd_range_f32_wide(a, t0, t1, go, at, gq, gk, gv);
  bwd_range_f32(a, t0, t1, go, at, gq, gk, gv);
}
inline void bwd_range(const AttnArgs<double>& a, int64_t t0, int64_t t1, const double* go, const double* at,
                      double* gq, double* gk, double* gv) {
  bwd_range_f64(a, t0, t1, go, at, gq, gk, gv);
}

}  // namespace

template <typename T>
void attention_fwd_cpu(const AttnArgs<T>& a, T* out, T* attn, int num_threads) {
  if (a.B == 0 || a.H == 0) return;
  if (a.Lk == 0) {  // no keys: a product over nothing, 0 (torch's softmax over an empty dim, then its matmul)
    std::fill(out, out + a.B * a.Lq * a.H * a.D, T(0));
    return;
  }
  // Whole heads per task when there are enough of them (each task packs its head's k and v once); else each head
  // split into row blocks so that every thread gets work.
  const int64_t heads = a.B * a.H, want = 2 * static_cast<int64_t>(std::max(num_threads, 1));
  const int64_t splits = heads >= want ? 1 : std::min((want + heads - 1) / heads, std::max<int64_t>(a.Lq / 16, 1));
  const int64_t per = std::max<int64_t>((a.Lq + splits - 1) / splits, 1);
  const int64_t blocks = (a.Lq + per - 1) / per;
  parallel_for(heads * blocks, 1, num_threads, [&](int64_t t0, int64_t t1) { fwd_range(a, t0, t1, per, out, attn); });
}

template <typename T>
void attention_bwd_cpu(const AttnArgs<T>& a, const T* grad_out, const T* attn, T* grad_q, T* grad_k, T* grad_v,
                       int num_threads) {
  if (a.B == 0 || a.H == 0) return;
  parallel_for(a.B * a.H, 1, num_threads, [&](int64_t t0, int64_t t1) {
    bwd_range(a, t0, t1, grad_out, attn, grad_q, grad_k, grad_v);
  });
}

template void attention_fwd_cpu<float>(const AttnArgs<float>&, float*, float*, int);
template void attention_fwd_cpu<double>(const AttnArgs<double>&, double*, double*, int);
template void attention_bwd_cpu<float>(const AttnArgs<float>&, const float*, const float*, float*, float*, float*,
                                       int);
template void attention_bwd_cpu<double>(const AttnArgs<double>&, const double*, const double*, double*, double*,
                                        double*, int);

}  // namespace detrcore
