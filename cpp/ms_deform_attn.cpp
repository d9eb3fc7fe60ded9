// CPU kernels of multi-scale deformable attention (contract in ms_deform_attn.h).
//
// Forward: threads split the (batch, query) pairs; each sample adds its (up to) four corner rows of D channels,
// scaled by attention weight x corner weight, into the output row (vectorised over D).
// Backward: threads split the (batch, head) pairs. A (b, h) task owns grad_value[b, :, h, :], so no two threads
// write the same element: deterministic whatever the thread count, no atomics. Per sample the four corner dot
// products <grad_out, value_corner> give the weight and location gradients; four axpys scatter grad_value.
//
// Head-local copies. In [B, S, H, D] one head's value rows are D values in every H*D (128 bytes per kilobyte at
// the DETR shape), and so are its rows of grad_out, locations and weights: a (b, h) task touching only those
// wastes most of every cache set and page it uses (measured on 1 thread: 83 ns per backward sample at H = 8 vs
// 35 ns at H = 1). When a task's samples outnumber its value rows (the encoder), it copies its value rows into a
// contiguous per-thread buffer, accumulates grad_value in a second one (zeroed there, in cache), walks the
// queries in order (each query's strided rows read once) and writes its grad_value slice out once: 83 -> 48 ns.
// A decoder's few samples accumulate in place, level by level, after one contiguous parallel memset. (The
// forward, split by query, gained nothing from the same copies.)
//
// AVX2 + FMA (float, D in {16, 32, 64}: the models' D = 32; any L * P, best a multiple of 8), picked at run time
// when the CPU has them. A sample's footprint (scaling, floor, range tests, four corner weights and row offsets)
// costs about as much as its D = 32 multiply-adds when computed one sample at a time with branches: a third of
// the forward. These kernels compute the footprints of eight samples at once in vector registers, branch-free
// (a corner outside the map gets weight 0 and reads a row of zeros / writes a dump row), then take the samples one
// by one, their four rows read and written as whole vectors, the forward's sums kept in registers and the
// backward's four dot products reduced together; the weight and location gradients of the eight samples come out
// as vectors. The backward walks queries in order in both strategies (the in-place one too: a row of
// grad_value belongs to one level, so its contributions still arrive in query order, as in the scalar kernel).
// Same partitions as the scalar kernels: deterministic, results within float rounding of them. Measured against the
// scalar kernels of the same build (in-process A/B): forward 1.6-1.9x, fwd+bwd 1.7-1.8x (decoder), 1.4-1.5x
// (encoder).
#include "ms_deform_attn.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DETRCORE_X86_SIMD 1
#include <immintrin.h>
#else
#define DETRCORE_X86_SIMD 0
#endif

namespace detrcore {
namespace {

// A level's stored map (h x w rows from `start`) and the size (ch, cw) its sampling locations are normalised by:
// the same, or a larger zero-padded map whose top-left corner is stored (coord_shapes in the header).
struct Level {
  int64_t h, w, start, ch, cw;
};

std::vector<Level> levels_of(const int64_t* spatial_shapes, const int64_t* level_start, const int64_t* coord_shapes,
                             int64_t L) {
  const int64_t* coord = coord_shapes ? coord_shapes : spatial_shapes;
  std::vector<Level> lv(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l)
    lv[l] = {spatial_shapes[2 * l], spatial_shapes[2 * l + 1], level_start[l], coord[2 * l], coord[2 * l + 1]};
  return lv;
}

// The bilinear footprint of one sample: up to four in-range corners with their value-row indices.
template <typename T>
struct Footprint {
  T lx, ly, hx, hy;
  T cw[4];       // corner weights: (y0,x0), (y0,x1), (y1,x0), (y1,x1)
  int64_t row[4];  // value row (index into S) or -1 when the corner is outside the map
  bool any;      // false when the sample lies entirely outside: no contribution, zero gradients
};

template <typename T>
inline Footprint<T> footprint(T loc_x, T loc_y, const Level& lv, int64_t S) {
  Footprint<T> f;
  const T x = loc_x * T(lv.cw) - T(0.5);
  const T y = loc_y * T(lv.ch) - T(0.5);
  f.any = x > T(-1) && y > T(-1) && x < T(lv.w) && y < T(lv.h);  // false for NaN too
  if (!f.any) return f;
  const T fx = std::floor(x), fy = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  f.lx = x - fx, f.ly = y - fy, f.hx = T(1) - f.lx, f.hy = T(1) - f.ly;
  f.cw[0] = f.hy * f.hx, f.cw[1] = f.hy * f.lx, f.cw[2] = f.ly * f.hx, f.cw[3] = f.ly * f.lx;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1}, ys[4] = {y0, y0, y0 + 1, y0 + 1};
  for (int c = 0; c < 4; ++c) {
    const bool inside = xs[c] >= 0 && xs[c] < lv.w && ys[c] >= 0 && ys[c] < lv.h;
    const int64_t r = lv.start + ys[c] * lv.w + xs[c];
    f.row[c] = inside && r >= 0 && r < S ? r : -1;
  }
  return f;
}

template <typename T>
inline void axpy(T a, const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

template <typename T>
inline T dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += x[d] * y[d];
  return s;
}

template <typename T>
struct Args {
  const T *value, *loc, *attn, *grad_out;
  T *out, *grad_value, *grad_loc, *grad_attn;
  const Level* lv;
  MsdaShape s;
};

// The per-range workers are compiled twice on x86-64 (AVX2 + FMA, and the baseline) and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DETRCORE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DETRCORE_CPU_CLONES
#endif

// Per-thread scratch for the head-local copies (kept between calls; grows to the largest slice seen).
template <typename T>
T* scratch(size_t n) {
  static thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Copies rows of D values between a strided head slice (row r at src + r * stride) and a packed buffer.
template <typename T>
inline void gather_rows(const T* __restrict__ src, int64_t stride, T* __restrict__ dst, int64_t S, int64_t D) {
  for (int64_t r = 0; r < S; ++r) std::memcpy(dst + r * D, src + r * stride, static_cast<size_t>(D) * sizeof(T));
}
template <typename T>
inline void scatter_rows(const T* __restrict__ src, T* __restrict__ dst, int64_t stride, int64_t S, int64_t D) {
  for (int64_t r = 0; r < S; ++r) std::memcpy(dst + r * stride, src + r * D, static_cast<size_t>(D) * sizeof(T));
}

// The value rows a backward (b, h) task reads and the grad_value rows it accumulates into, D channels each: in place
// (rows H * D apart) or, kLocal, head-local copies in `local` (value copied in, grad_value zeroed; rows D apart).
// end_task writes a head-local grad_value slice out.
template <typename T, bool kLocal>
inline void begin_task(const Args<T>& A, int64_t b, int64_t h, int64_t D, T* local, const T*& v, T*& gv) {
  const int64_t HD = A.s.H * D, S = A.s.S;
  v = A.value + b * S * HD + h * D;
  gv = A.grad_value + b * S * HD + h * D;
  if (kLocal) {
    gather_rows(v, HD, local, S, D);
    std::fill(local + S * D, local + 2 * S * D, T(0));
    v = local, gv = local + S * D;
  }
}
template <typename T, bool kLocal>
inline void end_task(const Args<T>& A, int64_t b, int64_t h, int64_t D, const T* gv) {
  if (kLocal) scatter_rows(gv, A.grad_value + b * A.s.S * A.s.H * D + h * D, A.s.H * D, A.s.S, D);
}

// One (b, q, h) output row: the samples of every level and point. v: this (b, h)'s value rows, rs apart.
template <typename T>
inline __attribute__((always_inline)) void fwd_row(const Args<T>& A, const T* v, int64_t rs, int64_t bqh, T* o) {
  const MsdaShape& s = A.s;
  const int64_t LP = s.L * s.P, D = s.D;
  const T* loc = A.loc + bqh * LP * 2;
  const T* aw = A.attn + bqh * LP;
  std::fill(o, o + D, T(0));
  for (int64_t l = 0; l < s.L; ++l) {
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t lp = l * s.P + p;
      const Footprint<T> f = footprint<T>(loc[2 * lp], loc[2 * lp + 1], A.lv[l], s.S);
      if (!f.any) continue;
      const T a = aw[lp];
      if (f.row[0] >= 0 && f.row[1] >= 0 && f.row[2] >= 0 && f.row[3] >= 0) {  // interior: one pass
        const T *v0 = v + f.row[0] * rs, *v1 = v + f.row[1] * rs, *v2 = v + f.row[2] * rs, *v3 = v + f.row[3] * rs;
        const T c0 = a * f.cw[0], c1 = a * f.cw[1], c2 = a * f.cw[2], c3 = a * f.cw[3];
        for (int64_t d = 0; d < D; ++d) o[d] += c0 * v0[d] + c1 * v1[d] + c2 * v2[d] + c3 * v3[d];
      } else {
        for (int c = 0; c < 4; ++c)
          if (f.row[c] >= 0) axpy(a * f.cw[c], v + f.row[c] * rs, o, D);
      }
    }
  }
}

// Forward over (b, q) pairs [bq0, bq1), every head, reading value in place.
template <typename T>
inline __attribute__((always_inline)) void fwd_range(const Args<T>& A, int64_t bq0, int64_t bq1) {
  const MsdaShape& s = A.s;
  const int64_t HD = s.H * s.D;
  for (int64_t bq = bq0; bq < bq1; ++bq) {
    const int64_t b = bq / s.Q;
    for (int64_t h = 0; h < s.H; ++h)
      fwd_row(A, A.value + b * s.S * HD + h * s.D, HD, bq * s.H + h, A.out + (bq * s.H + h) * s.D);
  }
}

// Backward over (b, h) pairs [t0, t1). A task owns grad_value[b, :, h, :]. kLocal: it works on head-local copies
// and writes all of its slice; otherwise it accumulates in place into grad_value, zero-filled by the caller.
template <typename T, bool kLocal>
inline __attribute__((always_inline)) void bwd_range(const Args<T>& A, int64_t t0, int64_t t1) {
  const MsdaShape& s = A.s;
  const T *sampling_locations = A.loc, *attention_weights = A.attn, *grad_out = A.grad_out;
  T *grad_sampling_locations = A.grad_loc, *grad_attention_weights = A.grad_attn;
  const Level* lv = A.lv;
  const int64_t HD = s.H * s.D, LP = s.L * s.P, D = s.D;
  const int64_t rs = kLocal ? D : HD;  // the distance between two value rows of one head
  T* local = kLocal ? scratch<T>(static_cast<size_t>(2 * s.S * D)) : nullptr;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / s.H, h = t % s.H;
    const T* v;
    T* gv;
    begin_task<T, kLocal>(A, b, h, D, local, v, gv);
    // Head-local copies: query by query (each query's rows of the per-query arrays, H apart, are read once). In
    // place: level by level (the scattered value and grad_value rows of one level stay in cache).
    const int64_t n_outer = kLocal ? s.Q : s.L, n_inner = kLocal ? s.L : s.Q;
    for (int64_t i = 0; i < n_outer; ++i) {
      for (int64_t j = 0; j < n_inner; ++j) {
        const int64_t q = kLocal ? i : j, l = kLocal ? j : i;
        const int64_t bqh = (b * s.Q + q) * s.H + h;
        const T* g = grad_out + bqh * D;
        const T* loc = sampling_locations + bqh * LP * 2;
        const T* aw = attention_weights + bqh * LP;
        T* gloc = grad_sampling_locations + bqh * LP * 2;
        T* gaw = grad_attention_weights + bqh * LP;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t lp = l * s.P + p;
          const Footprint<T> f = footprint<T>(loc[2 * lp], loc[2 * lp + 1], lv[l], s.S);
          gloc[2 * lp] = gloc[2 * lp + 1] = gaw[lp] = T(0);
          if (!f.any) continue;
          const T a = aw[lp];
          T dots[4] = {0, 0, 0, 0};  // <grad_out, value at corner c>
          if (f.row[0] >= 0 && f.row[1] >= 0 && f.row[2] >= 0 && f.row[3] >= 0) {  // interior: one pass
            const T *v0 = v + f.row[0] * rs, *v1 = v + f.row[1] * rs, *v2 = v + f.row[2] * rs,
                    *v3 = v + f.row[3] * rs;
            T *g0 = gv + f.row[0] * rs, *g1 = gv + f.row[1] * rs, *g2 = gv + f.row[2] * rs, *g3 = gv + f.row[3] * rs;
            const T c0 = a * f.cw[0], c1 = a * f.cw[1], c2 = a * f.cw[2], c3 = a * f.cw[3];
            T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
            // The four grad_value rows are distinct (four different positions of one map).
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t d = 0; d < D; ++d) {
              const T gd = g[d];
              d0 += gd * v0[d], d1 += gd * v1[d], d2 += gd * v2[d], d3 += gd * v3[d];
              g0[d] += c0 * gd, g1[d] += c1 * gd, g2[d] += c2 * gd, g3[d] += c3 * gd;
            }
            dots[0] = d0, dots[1] = d1, dots[2] = d2, dots[3] = d3;
          } else {
            for (int c = 0; c < 4; ++c) {
              if (f.row[c] < 0) continue;
              dots[c] = dot(g, v + f.row[c] * rs, D);
              axpy(a * f.cw[c], g, gv + f.row[c] * rs, D);
            }
          }
          gaw[lp] = f.cw[0] * dots[0] + f.cw[1] * dots[1] + f.cw[2] * dots[2] + f.cw[3] * dots[3];
          const T d_lx = f.hy * (dots[1] - dots[0]) + f.ly * (dots[3] - dots[2]);
          const T d_ly = f.hx * (dots[2] - dots[0]) + f.lx * (dots[3] - dots[1]);
          gloc[2 * lp] = a * d_lx * T(lv[l].cw);
          gloc[2 * lp + 1] = a * d_ly * T(lv[l].ch);
        }
      }
    }
    end_task<T, kLocal>(A, b, h, D, gv);
  }
}

DETRCORE_CPU_CLONES void fwd_range_f32(const Args<float>& a, int64_t b, int64_t e) { fwd_range(a, b, e); }
DETRCORE_CPU_CLONES void fwd_range_f64(const Args<double>& a, int64_t b, int64_t e) { fwd_range(a, b, e); }
DETRCORE_CPU_CLONES void bwd_range_f32(const Args<float>& a, int64_t b, int64_t e, bool local) {
  local ? bwd_range<float, true>(a, b, e) : bwd_range<float, false>(a, b, e);
}
DETRCORE_CPU_CLONES void bwd_range_f64(const Args<double>& a, int64_t b, int64_t e, bool local) {
  local ? bwd_range<double, true>(a, b, e) : bwd_range<double, false>(a, b, e);
}
inline void fwd_range_any(const Args<float>& a, int64_t b, int64_t e) { fwd_range_f32(a, b, e); }
inline void fwd_range_any(const Args<double>& a, int64_t b, int64_t e) { fwd_range_f64(a, b, e); }
inline void bwd_range_any(const Args<float>& a, int64_t b, int64_t e, bool l) { bwd_range_f32(a, b, e, l); }
inline void bwd_range_any(const Args<double>& a, int64_t b, int64_t e, bool l) { bwd_range_f64(a, b, e, l); }

// ---------------------------------------------------------------------------------------------------------
// AVX2 + FMA kernels (see the top of the file).
bool cpu_has_avx2_fma() {
#if DETRCORE_X86_SIMD
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
std::atomic<bool> g_simd{cpu_has_avx2_fma()};

bool simd_applies(const MsdaShape& s) {
  return g_simd.load(std::memory_order_relaxed) && (s.D == 16 || s.D == 32 || s.D == 64);
}

// Per sample slot lp = l * P + p: its level's stored width and height (float and int), the width and height its
// locations are scaled by (sw, sh: coord_shapes), and its start and row pitch as value offsets in floats, for rows
// rs floats apart; padded to a multiple of 8 slots with a width and height of -1 (no sample there is ever inside).
struct Slots {
  std::vector<float> wf, hf, sw, sh;
  std::vector<int32_t> w, h, start, pitch;
};

// False when the int32 offsets or float sizes could overflow or the levels overrun S (the scalar kernels, which
// bounds-check every row, handle those).
bool make_slots(Slots& t, const std::vector<Level>& lv, const MsdaShape& s, int64_t rs) {
  int64_t max_w = 0;
  for (const Level& l : lv) {
    if (l.h < 0 || l.w < 0 || l.start < 0 || l.start + l.h * l.w > s.S || l.ch >= (1 << 24) || l.cw >= (1 << 24) ||
        l.h > l.ch || l.w > l.cw)
      return false;
    max_w = std::max(max_w, l.w);
  }
  if ((s.S + max_w + 2) * rs >= (int64_t(1) << 31)) return false;
  for (const Level& l : lv)
    for (int64_t p = 0; p < s.P; ++p) {
      t.wf.push_back(static_cast<float>(l.w)), t.hf.push_back(static_cast<float>(l.h));
      t.sw.push_back(static_cast<float>(l.cw)), t.sh.push_back(static_cast<float>(l.ch));
      t.w.push_back(static_cast<int32_t>(l.w)), t.h.push_back(static_cast<int32_t>(l.h));
      t.start.push_back(static_cast<int32_t>(l.start * rs)), t.pitch.push_back(static_cast<int32_t>(l.w * rs));
    }
  while (t.wf.size() % 8) {
    t.wf.push_back(-1.0f), t.hf.push_back(-1.0f), t.sw.push_back(-1.0f), t.sh.push_back(-1.0f);
    t.w.push_back(0), t.h.push_back(0), t.start.push_back(0), t.pitch.push_back(0);
  }
  return true;
}

#if DETRCORE_X86_SIMD
#define DETRCORE_AVX2 __attribute__((target("avx2,fma")))
#define DETRCORE_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

alignas(32) constexpr float kZeroRow[64] = {};  // read by corners outside the map (D <= 64)
alignas(32) constexpr int32_t kLaneMasks[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// The first n (0..8) lanes set.
DETRCORE_AVX2_INLINE __m256i first_lanes(int n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMasks + 8 - (n < 0 ? 0 : n > 8 ? 8 : n)));
}
// Eight floats from p, of which only the first n are read (the others are 0): the last, partial group of slots.
DETRCORE_AVX2_INLINE __m256 load_first(const float* p, int n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(n));
}
DETRCORE_AVX2_INLINE void store_first(float* p, int n, __m256 v) {
  if (n >= 8)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, first_lanes(n), v);
}

// The footprints of the samples in slots [j0, min(j0 + 8, LP)) of one (b, q, h) (lanes past LP read nothing and
// come out entirely outside, as the padding of the slot table makes them): corner c of lane j reads value
// offset off[c][j] (-1 when outside the map) with weight wt[c][j] = attention x corner weight (0 outside); cw
// are the corner weights, a the attention weights (0 for samples entirely outside), lx ... hy as in Footprint, sw
// and sh the location scales.
struct Foot8 {
  __m256 ok, a, lx, ly, hx, hy, sw, sh, cw[4], wt[4];
  __m256i off[4];
};

// (a0 a2 b0 b2 | a4 a6 b4 b6) -> (a0 a2 a4 a6 b0 b2 b4 b6), and the two 64-bit halves of 128-bit lanes.
DETRCORE_AVX2_INLINE __m256 cross_lanes(__m256 v) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
}
DETRCORE_AVX2_INLINE __m256 unpacklo64(__m256 a, __m256 b) {
  return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
}
DETRCORE_AVX2_INLINE __m256 unpackhi64(__m256 a, __m256 b) {
  return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
}

DETRCORE_AVX2_INLINE Foot8 footprint8(const float* loc, const float* aw, const Slots& t, int j0, int LP,
                                      int32_t rs) {
  Foot8 f;
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), minus1 = _mm256_set1_ps(-1.0f);
  const __m256i ione = _mm256_set1_epi32(1), none = _mm256_set1_epi32(-1), irs = _mm256_set1_epi32(rs);
  const int n = LP - j0;  // slots left (8 or more: a full group)
  const __m256 l0 = load_first(loc + 2 * j0, 2 * n), l1 = load_first(loc + 2 * j0 + 8, 2 * n - 8);  // x0 y0 x1 ...
  const __m256 lcx = cross_lanes(_mm256_shuffle_ps(l0, l1, 0x88)), lcy = cross_lanes(_mm256_shuffle_ps(l0, l1, 0xDD));
  const __m256 wf = _mm256_loadu_ps(t.wf.data() + j0), hf = _mm256_loadu_ps(t.hf.data() + j0);
  f.sw = _mm256_loadu_ps(t.sw.data() + j0), f.sh = _mm256_loadu_ps(t.sh.data() + j0);
  const __m256 x = _mm256_sub_ps(_mm256_mul_ps(lcx, f.sw), half), y = _mm256_sub_ps(_mm256_mul_ps(lcy, f.sh), half);
  // -1 < x < w and -1 < y < h (the stored map); ordered compares: false for NaN.
  f.ok = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(x, minus1, _CMP_GT_OQ), _mm256_cmp_ps(y, minus1, _CMP_GT_OQ)),
                       _mm256_and_ps(_mm256_cmp_ps(x, wf, _CMP_LT_OQ), _mm256_cmp_ps(y, hf, _CMP_LT_OQ)));
  const __m256 xc = _mm256_and_ps(f.ok, x), yc = _mm256_and_ps(f.ok, y);  // inside (-1, w) x (-1, h), or 0
  const __m256 fx = _mm256_floor_ps(xc), fy = _mm256_floor_ps(yc);
  f.lx = _mm256_sub_ps(xc, fx), f.ly = _mm256_sub_ps(yc, fy);
  f.hx = _mm256_sub_ps(one, f.lx), f.hy = _mm256_sub_ps(one, f.ly);
  f.cw[0] = _mm256_mul_ps(f.hy, f.hx), f.cw[1] = _mm256_mul_ps(f.hy, f.lx);
  f.cw[2] = _mm256_mul_ps(f.ly, f.hx), f.cw[3] = _mm256_mul_ps(f.ly, f.lx);
  f.a = _mm256_and_ps(f.ok, load_first(aw + j0, n));
  const __m256i x0 = _mm256_cvttps_epi32(fx), y0 = _mm256_cvttps_epi32(fy);  // exact: fx, fy are small integers
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.w.data() + j0));
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.h.data() + j0));
  const __m256i ok = _mm256_castps_si256(f.ok);
  const __m256i x0in = _mm256_cmpgt_epi32(x0, none), x1in = _mm256_cmpgt_epi32(w, _mm256_add_epi32(x0, ione));
  const __m256i y0in = _mm256_and_si256(ok, _mm256_cmpgt_epi32(y0, none));
  const __m256i y1in = _mm256_and_si256(ok, _mm256_cmpgt_epi32(h, _mm256_add_epi32(y0, ione)));
  const __m256i in[4] = {_mm256_and_si256(y0in, x0in), _mm256_and_si256(y0in, x1in), _mm256_and_si256(y1in, x0in),
                         _mm256_and_si256(y1in, x1in)};
  const __m256i start = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.start.data() + j0));
  const __m256i pitch = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.pitch.data() + j0));
  const __m256i o0 =
      _mm256_add_epi32(_mm256_add_epi32(start, _mm256_mullo_epi32(y0, pitch)), _mm256_mullo_epi32(x0, irs));
  const __m256i o[4] = {o0, _mm256_add_epi32(o0, irs), _mm256_add_epi32(o0, pitch),
                        _mm256_add_epi32(_mm256_add_epi32(o0, pitch), irs)};
  for (int c = 0; c < 4; ++c) {
    f.off[c] = _mm256_blendv_epi8(none, o[c], in[c]);
    f.wt[c] = _mm256_and_ps(_mm256_castsi256_ps(in[c]), _mm256_mul_ps(f.a, f.cw[c]));
  }
  return f;
}

// Forward, lane J of f: acc (kD / 8 vectors) += the sample's four weighted rows.
template <int kD, int J>
DETRCORE_AVX2_INLINE void fwd_lane(const float* v, const Foot8& f, __m256* acc) {
  const float* row[4];
  __m256 c[4];
  const __m256i lane = _mm256_set1_epi32(J);
  for (int k = 0; k < 4; ++k) {
    const int32_t r = _mm256_extract_epi32(f.off[k], J);
    row[k] = r >= 0 ? v + r : kZeroRow;
    c[k] = _mm256_permutevar8x32_ps(f.wt[k], lane);
  }
  for (int k = 0; k < kD / 8; ++k) {
    __m256 t = _mm256_mul_ps(c[0], _mm256_loadu_ps(row[0] + 8 * k));
    t = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(row[1] + 8 * k), t);
    t = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(row[2] + 8 * k), t);
    t = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(row[3] + 8 * k), t);
    acc[k] = _mm256_add_ps(acc[k], t);
  }
}
template <int kD, int J = 0>
DETRCORE_AVX2_INLINE void fwd_lanes(const float* v, const Foot8& f, __m256* acc) {
  fwd_lane<kD, J>(v, f, acc);
  if constexpr (J < 7) fwd_lanes<kD, J + 1>(v, f, acc);
}

// Forward over (b, q) pairs [bq0, bq1), every head.
template <int kD>
DETRCORE_AVX2 void fwd_range_avx2(const Args<float>& A, const Slots& t, int64_t bq0, int64_t bq1) {
  const MsdaShape& s = A.s;
  const int LP = static_cast<int>(s.L * s.P);
  const int64_t HD = s.H * kD;
  for (int64_t bq = bq0; bq < bq1; ++bq) {
    const int64_t b = bq / s.Q;
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t bqh = bq * s.H + h;
      const float* v = A.value + b * s.S * HD + h * kD;
      __m256 acc[kD / 8];
      for (int k = 0; k < kD / 8; ++k) acc[k] = _mm256_setzero_ps();
      for (int j0 = 0; j0 < LP; j0 += 8)
        fwd_lanes<kD>(v, footprint8(A.loc + bqh * LP * 2, A.attn + bqh * LP, t, j0, LP, static_cast<int32_t>(HD)),
                      acc);
      for (int k = 0; k < kD / 8; ++k) _mm256_storeu_ps(A.out + bqh * kD + 8 * k, acc[k]);
    }
  }
}

// Backward, lane J of f: returns the four dot products <g, corner row c>; grad_value's corner rows += wt_c * g.
// Corners outside the map read the zero row and add their zero into `dump`.
template <int kD, int J>
DETRCORE_AVX2_INLINE __m128 bwd_lane(const float* v, float* gv, float* dump, const __m256* g, const Foot8& f) {
  const float* row[4];
  float* grow[4];
  __m256 c[4], d[4];
  const __m256i lane = _mm256_set1_epi32(J);
  for (int k = 0; k < 4; ++k) {
    const int32_t r = _mm256_extract_epi32(f.off[k], J);
    row[k] = r >= 0 ? v + r : kZeroRow;
    grow[k] = r >= 0 ? gv + r : dump;
    c[k] = _mm256_permutevar8x32_ps(f.wt[k], lane);
    d[k] = _mm256_setzero_ps();
  }
  for (int k = 0; k < kD / 8; ++k) {
    for (int corner = 0; corner < 4; ++corner) {
      d[corner] = _mm256_fmadd_ps(g[k], _mm256_loadu_ps(row[corner] + 8 * k), d[corner]);
      float* gp = grow[corner] + 8 * k;
      _mm256_storeu_ps(gp, _mm256_fmadd_ps(c[corner], g[k], _mm256_loadu_ps(gp)));
    }
  }
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));  // (d0, d1, d2, d3)
}
template <int kD, int J = 0>
DETRCORE_AVX2_INLINE void bwd_lanes(const float* v, float* gv, float* dump, const __m256* g, const Foot8& f,
                                    __m128* dots) {
  dots[J] = bwd_lane<kD, J>(v, gv, dump, g, f);
  if constexpr (J < 7) bwd_lanes<kD, J + 1>(v, gv, dump, g, f, dots);
}

// Prefetches the n bytes from p on (one request per 64-byte line).
DETRCORE_AVX2_INLINE void prefetch_bytes(const void* p, int n) {
  for (int i = 0; i < n; i += 64) _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T0);
}

// How many queries ahead the backward prefetches a query's rows of the per-query arrays. A (b, h) task walks them
// H rows apart (128 of every 1024 bytes at D = 32, H = 8): the hardware prefetchers miss such strides, and in a
// training step those arrays come cold from memory. Measured in the Deformable DETR CPU training step (in one
// process, interleaved): the six layers' MSDA backward 44.2 -> 33.7 ms per step at 4 (2 - 16 within 0.5 ms).
constexpr int64_t kPrefetchQueries = 4;

// Backward over (b, h) pairs [t0, t1) (see bwd_range; rows rs = D apart in the head-local copies, H * D in place).
template <int kD, bool kLocal>
DETRCORE_AVX2 void bwd_range_avx2(const Args<float>& A, const Slots& t, int64_t t0, int64_t t1) {
  const MsdaShape& s = A.s;
  const int LP = static_cast<int>(s.L * s.P);
  const int64_t HD = s.H * kD;
  const int32_t rs = static_cast<int32_t>(kLocal ? kD : HD);
  float* local = kLocal ? scratch<float>(static_cast<size_t>(2 * s.S * kD)) : nullptr;
  alignas(32) float dump[kD];
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t b = task / s.H, h = task % s.H;
    const float* v;
    float* gv;
    begin_task<float, kLocal>(A, b, h, kD, local, v, gv);
    for (int64_t q = 0; q < s.Q; ++q) {
      const int64_t bqh = (b * s.Q + q) * s.H + h;
      if (q + kPrefetchQueries < s.Q) {
        const int64_t ahead = bqh + kPrefetchQueries * s.H;
        prefetch_bytes(A.loc + ahead * LP * 2, LP * 2 * 4), prefetch_bytes(A.grad_loc + ahead * LP * 2, LP * 2 * 4);
        prefetch_bytes(A.attn + ahead * LP, LP * 4), prefetch_bytes(A.grad_attn + ahead * LP, LP * 4);
        prefetch_bytes(A.grad_out + ahead * kD, kD * 4);
      }
      __m256 g[kD / 8];
      for (int k = 0; k < kD / 8; ++k) g[k] = _mm256_loadu_ps(A.grad_out + bqh * kD + 8 * k);
      for (int j0 = 0; j0 < LP; j0 += 8) {
        const Foot8 f = footprint8(A.loc + bqh * LP * 2, A.attn + bqh * LP, t, j0, LP, rs);
        __m128 dots[8];
        bwd_lanes<kD>(v, gv, dump, g, f, dots);
        // Transpose the eight (d0, d1, d2, d3) into D[c] = corner c's dot products of the eight samples.
        __m256 r[4], u[4], D[4];
        for (int k = 0; k < 4; ++k) r[k] = _mm256_insertf128_ps(_mm256_castps128_ps256(dots[k]), dots[k + 4], 1);
        u[0] = _mm256_unpacklo_ps(r[0], r[1]), u[1] = _mm256_unpackhi_ps(r[0], r[1]);
        u[2] = _mm256_unpacklo_ps(r[2], r[3]), u[3] = _mm256_unpackhi_ps(r[2], r[3]);
        D[0] = unpacklo64(u[0], u[2]), D[1] = unpackhi64(u[0], u[2]);
        D[2] = unpacklo64(u[1], u[3]), D[3] = unpackhi64(u[1], u[3]);
        const __m256 gaw = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(f.cw[0], D[0]), _mm256_mul_ps(f.cw[1], D[1])),
                                         _mm256_add_ps(_mm256_mul_ps(f.cw[2], D[2]), _mm256_mul_ps(f.cw[3], D[3])));
        const __m256 d_lx = _mm256_add_ps(_mm256_mul_ps(f.hy, _mm256_sub_ps(D[1], D[0])),
                                          _mm256_mul_ps(f.ly, _mm256_sub_ps(D[3], D[2])));
        const __m256 d_ly = _mm256_add_ps(_mm256_mul_ps(f.hx, _mm256_sub_ps(D[2], D[0])),
                                          _mm256_mul_ps(f.lx, _mm256_sub_ps(D[3], D[1])));
        const __m256 gx = _mm256_mul_ps(_mm256_mul_ps(f.a, d_lx), f.sw);
        const __m256 gy = _mm256_mul_ps(_mm256_mul_ps(f.a, d_ly), f.sh);
        const int n = LP - j0;
        store_first(A.grad_attn + bqh * LP + j0, n, _mm256_and_ps(f.ok, gaw));
        const __m256 xy_lo = _mm256_unpacklo_ps(gx, gy), xy_hi = _mm256_unpackhi_ps(gx, gy);  // x0 y0 x1 y1 | x4 ...
        float* gl = A.grad_loc + (bqh * LP + j0) * 2;
        store_first(gl, 2 * n, _mm256_permute2f128_ps(xy_lo, xy_hi, 0x20));
        store_first(gl + 8, 2 * n - 8, _mm256_permute2f128_ps(xy_lo, xy_hi, 0x31));
      }
    }
    end_task<float, kLocal>(A, b, h, kD, gv);
  }
}

void fwd_simd(const Args<float>& a, const Slots& t, int64_t b, int64_t e) {
  switch (a.s.D) {
    case 16: return fwd_range_avx2<16>(a, t, b, e);
    case 32: return fwd_range_avx2<32>(a, t, b, e);
    default: return fwd_range_avx2<64>(a, t, b, e);
  }
}
void bwd_simd(const Args<float>& a, const Slots& t, int64_t b, int64_t e, bool local) {
  switch (a.s.D) {
    case 16: return local ? bwd_range_avx2<16, true>(a, t, b, e) : bwd_range_avx2<16, false>(a, t, b, e);
    case 32: return local ? bwd_range_avx2<32, true>(a, t, b, e) : bwd_range_avx2<32, false>(a, t, b, e);
    default: return local ? bwd_range_avx2<64, true>(a, t, b, e) : bwd_range_avx2<64, false>(a, t, b, e);
  }
}
#else
void fwd_simd(const Args<float>&, const Slots&, int64_t, int64_t) {}
void bwd_simd(const Args<float>&, const Slots&, int64_t, int64_t, bool) {}
#endif

}  // namespace

bool ms_deform_attn_cpu_simd(int enable) {
  const bool was = g_simd.load();
  if (enable >= 0) g_simd.store(enable > 0 && cpu_has_avx2_fma());
  return was;
}

template <typename T>
void ms_deform_attn_fwd_cpu(const T* value, const int64_t* spatial_shapes, const int64_t* level_start,
                            const T* sampling_locations, const T* attention_weights, T* out, const MsdaShape& s,
                            int num_threads, const int64_t* coord_shapes) {
  const std::vector<Level> lv = levels_of(spatial_shapes, level_start, coord_shapes, s.L);
  const Args<T> a{value, sampling_locations, attention_weights, nullptr, out, nullptr, nullptr, nullptr, lv.data(), s};
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.H * s.L * s.P * s.D));
  if constexpr (std::is_same_v<T, float>) {
    Slots t;
    if (simd_applies(s) && make_slots(t, lv, s, s.H * s.D)) {
      parallel_for(s.B * s.Q, grain, num_threads, [&](int64_t b, int64_t e) { fwd_simd(a, t, b, e); });
      return;
    }
  }
  parallel_for(s.B * s.Q, grain, num_threads, [&](int64_t b, int64_t e) { fwd_range_any(a, b, e); });
}

template <typename T>
void ms_deform_attn_bwd_cpu(const T* value, const int64_t* spatial_shapes, const int64_t* level_start,
                            const T* sampling_locations, const T* attention_weights, const T* grad_out,
                            T* grad_value, T* grad_sampling_locations, T* grad_attention_weights, const MsdaShape& s,
                            int num_threads, const int64_t* coord_shapes) {
  const std::vector<Level> lv = levels_of(spatial_shapes, level_start, coord_shapes, s.L);
  const Args<T> a{value,      sampling_locations,      attention_weights,      grad_out, nullptr,
                  grad_value, grad_sampling_locations, grad_attention_weights, lv.data(), s};
  // Head-local copies cost three passes over a head's S x D slice: worth it when its samples outnumber its rows
  // (the encoder); a decoder's few samples accumulate in place, after one contiguous parallel memset.
  const bool local = s.Q * s.L * s.P >= s.S;
  if (!local) {
    const int64_t n = s.B * s.S * s.H * s.D;
    parallel_for(n, 1 << 16, num_threads, [&](int64_t b, int64_t e) {
      std::memset(grad_value + b, 0, static_cast<size_t>(e - b) * sizeof(T));
    });
  }
  if constexpr (std::is_same_v<T, float>) {
    Slots t;
    if (simd_applies(s) && make_slots(t, lv, s, local ? s.D : s.H * s.D)) {
      parallel_for(s.B * s.H, 1, num_threads, [&](int64_t b, int64_t e) { bwd_simd(a, t, b, e, local); });
      return;
    }
  }
  parallel_for(s.B * s.H, 1, num_threads, [&](int64_t b, int64_t e) { bwd_range_any(a, b, e, local); });
}

#define DETRCORE_INSTANTIATE(T)                                                                                \
  template void ms_deform_attn_fwd_cpu<T>(const T*, const int64_t*, const int64_t*, const T*, const T*, T*,    \
                                          const MsdaShape&, int, const int64_t*);                              \
  template void ms_deform_attn_bwd_cpu<T>(const T*, const int64_t*, const int64_t*, const T*, const T*,        \
                                          const T*, T*, T*, T*, const MsdaShape&, int, const int64_t*);
DETRCORE_INSTANTIATE(float)
DETRCORE_INSTANTIATE(double)
#undef DETRCORE_INSTANTIATE

}  // namespace detrcore
