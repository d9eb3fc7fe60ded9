#include "winograd.h"

#include <algorithm>
#include <vector>

#include "elem.h"
#include "parallel.h"

namespace detrcore {
namespace {

#define DETRCORE_INLINE inline __attribute__((always_inline))

// Planes of HW elements per parallel chunk: at least kElementwiseGrain elements of work (each plane's transform
// reads or writes about 4 HW).
int64_t plane_grain(int64_t HW) { return std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, 4 * HW)); }

// ---- weight: U = G w G^T and its adjoint, per (k, c) pair ----

// Writes go through a [16][kBlock] buffer, then out as 16 runs: storing each pair's 16 values straight into the 16
// planes (KC apart, often a multiple of the cache's set stride) thrashes the caches (6 ms instead of 0.5 for
// 512 x 512 pairs).
constexpr int64_t kBlock = 64;

// The 3x3 weights of pairs [b0, b0 + nb) transposed into g[9][kBlock], so that the transforms run on unit-stride
// vectors (GCC does not vectorise the 9-element groups in place).
template <typename T>
inline void weight_block_in(const T* __restrict w, T (*__restrict g)[kBlock], int64_t b0, int64_t nb) {
  const T* wb = w + b0 * 9;
  for (int64_t e = 0; e < nb; ++e)
    for (int q = 0; q < 9; ++q) g[q][e] = wb[e * 9 + q];
}

// The P transformed runs of a block, buf[P][kBlock], out to U[P][KC] at pair b0.
template <typename T>
inline void weight_block_out(const T* __restrict buf, T* __restrict U, int P, int64_t b0, int64_t nb, int64_t KC) {
  for (int xi = 0; xi < P; ++xi) std::copy_n(buf + xi * kBlock, nb, U + xi * KC + b0);
}

template <typename T>
DETRCORE_ELEMENTWISE_CLONES void weight_range(const T* __restrict w, T* __restrict U, int64_t i0, int64_t i1,
                                              int64_t KC) {
  const T h = T(0.5);
  T g[9][kBlock], buf[16 * kBlock];
  for (int64_t b0 = i0; b0 < i1; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, i1 - b0);
    weight_block_in(w, g, b0, nb);
#pragma GCC ivdep  // the stores' streams never overlap
    for (int64_t e = 0; e < nb; ++e) {
      T a[4][3];
      for (int q = 0; q < 3; ++q) {  // rows: G g
        a[0][q] = g[q][e];
        a[1][q] = h * (g[q][e] + g[3 + q][e] + g[6 + q][e]);
        a[2][q] = h * (g[q][e] - g[3 + q][e] + g[6 + q][e]);
        a[3][q] = g[6 + q][e];
      }
      for (int r = 0; r < 4; ++r) {  // columns: (G g) G^T
        buf[(4 * r + 0) * kBlock + e] = a[r][0];
        buf[(4 * r + 1) * kBlock + e] = h * (a[r][0] + a[r][1] + a[r][2]);
        buf[(4 * r + 2) * kBlock + e] = h * (a[r][0] - a[r][1] + a[r][2]);
        buf[(4 * r + 3) * kBlock + e] = a[r][2];
      }
    }
    weight_block_out(buf, U, 16, b0, nb, KC);
  }
}

template <typename T>
DETRCORE_ELEMENTWISE_CLONES void weight_adjoint_range(const T* __restrict gU, T* __restrict gw, int64_t i0,
                                                      int64_t i1, int64_t KC) {
  const T h = T(0.5);
  for (int64_t i = i0; i < i1; ++i) {
    T a[4][3];
    for (int r = 0; r < 4; ++r) {  // adjoint of the columns
      const T u0 = gU[(4 * r + 0) * KC + i], u1 = gU[(4 * r + 1) * KC + i];
      const T u2 = gU[(4 * r + 2) * KC + i], u3 = gU[(4 * r + 3) * KC + i];
      a[r][0] = u0 + h * (u1 + u2);
      a[r][1] = h * (u1 - u2);
      a[r][2] = h * (u1 + u2) + u3;
    }
    T* g = gw + i * 9;
    for (int q = 0; q < 3; ++q) {  // adjoint of the rows
      g[q] = a[0][q] + h * (a[1][q] + a[2][q]);
      g[3 + q] = h * (a[1][q] - a[2][q]);
      g[6 + q] = h * (a[1][q] + a[2][q]) + a[3][q];
    }
  }
}

// ---- input: V = B^T d B per 4x4 patch, and its adjoint (overlapping patches summed) ----

// Planes [p0, p1) in channel-major order (p = c * N + n: one channel's images are adjacent runs of V). Each
// plane's tile values go to a [16][TH * TW] buffer first, then out as 16 runs (see kBlock). The patch rows are split
// into even and odd columns so that the tile loop reads unit-stride (vectorised).
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void input_planes(const T* __restrict x, T* __restrict V, T* __restrict rows,
                                              T* __restrict half, T* __restrict loc, int64_t p0, int64_t p1, int64_t N,
                                              int64_t C, int64_t H, int64_t W, int64_t Tn) {
  // rows: one patch row, zero-padded (columns -1 .. 2 TW); half: the 4 patch rows' even and odd padded columns,
  // half[(2 i + odd) * Th + m]; loc: the plane's [16][TH * TW] tile values. Separate buffers: GCC vectorises the
  // tile loop only when its loads and stores do not share a base.
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, Wp = 2 * TW + 2, TP = TH * TW, Th = TW + 1;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p / N, n = p % N;
    const T* plane = x + (n * C + c) * H * W;
    for (int64_t ty = 0; ty < TH; ++ty) {
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t r = 2 * ty - 1 + i;
        std::fill(rows, rows + Wp, T(0));
        if (r >= 0 && r < H) std::copy_n(plane + r * W, W, rows + 1);
        T* __restrict ev = half + 2 * i * Th;
        T* __restrict od = ev + Th;
        for (int64_t m = 0; m < Th; ++m) {
          ev[m] = rows[2 * m];
          od[m] = rows[2 * m + 1];
        }
      }
      T* __restrict o = loc + ty * TW;
#pragma GCC ivdep  // the stores' streams never overlap
      for (int64_t tx = 0; tx < TW; ++tx) {
        T d[4][4], a[4][4];
        for (int i = 0; i < 4; ++i) {  // patch row i, columns 0..3: even[tx], odd[tx], even[tx + 1], odd[tx + 1]
          const T* ev = half + 2 * i * Th;
          const T* od = ev + Th;
          d[i][0] = ev[tx], d[i][1] = od[tx], d[i][2] = ev[tx + 1], d[i][3] = od[tx + 1];
        }
        for (int j = 0; j < 4; ++j) {  // rows: B^T d
          a[0][j] = d[0][j] - d[2][j];
          a[1][j] = d[1][j] + d[2][j];
          a[2][j] = d[2][j] - d[1][j];
          a[3][j] = d[1][j] - d[3][j];
        }
        for (int r = 0; r < 4; ++r) {  // columns: (B^T d) B
          o[(4 * r + 0) * TP + tx] = a[r][0] - a[r][2];
          o[(4 * r + 1) * TP + tx] = a[r][1] + a[r][2];
          o[(4 * r + 2) * TP + tx] = a[r][2] - a[r][1];
          o[(4 * r + 3) * TP + tx] = a[r][1] - a[r][3];
        }
      }
    }
    for (int xi = 0; xi < 16; ++xi) std::copy_n(loc + xi * TP, TP, V + (xi * C + c) * Tn + n * TP);
  }
}

// Planes in channel-major order. Each tile's 16 gradient values (gV) become its 4x4 patch gradient E[i][j], stored
// with a zero tile all round; then every pixel sums the entries of the (up to) four patches that cover it, written
// out row by row without a zeroing pass. scratch: 16 * (TH + 2) * (TW + 2) + 2 * TW.
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void input_adjoint_planes(const T* __restrict gV, T* __restrict gx, T* __restrict scratch,
                                                      int64_t p0, int64_t p1, int64_t N, int64_t C, int64_t H,
                                                      int64_t W, int64_t Tn) {
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, TP = TH * TW, Gw = TW + 2, GP = (TH + 2) * Gw;
  T* __restrict E = scratch;  // E[(4 i + j) * GP + (ty + 1) * Gw + tx + 1]
  T* __restrict line = scratch + 16 * GP;
  std::fill(E, E + 16 * GP, T(0));
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p / N, n = p % N;
    const T* __restrict g = gV + c * Tn + n * TP;
    const int64_t st = C * Tn;
    for (int64_t ty = 0; ty < TH; ++ty) {
      const T* __restrict gr = g + ty * TW;
      T* __restrict e = E + (ty + 1) * Gw + 1;
      #pragma GCC ivdep  // the stores' streams never overlap
      for (int64_t tx = 0; tx < TW; ++tx) {
        T v[4][4], a[4][4];
        for (int r = 0; r < 4; ++r)
          for (int j = 0; j < 4; ++j) v[r][j] = gr[(4 * r + j) * st + tx];
        for (int r = 0; r < 4; ++r) {  // adjoint of the columns
          a[r][0] = v[r][0];
          a[r][1] = v[r][1] - v[r][2] + v[r][3];
          a[r][2] = v[r][2] - v[r][0] + v[r][1];
          a[r][3] = -v[r][3];
        }
        for (int j = 0; j < 4; ++j) {  // adjoint of the rows
          e[(0 + j) * GP + tx] = a[0][j];
          e[(4 + j) * GP + tx] = a[1][j] - a[2][j] + a[3][j];
          e[(8 + j) * GP + tx] = a[2][j] - a[0][j] + a[1][j];
          e[(12 + j) * GP + tx] = -a[3][j];
        }
      }
    }
    T* plane = gx + (n * C + c) * H * W;
    for (int64_t r = 0; r < H; ++r) {
      // Patch row i of tile row ty covers image row 2 ty - 1 + i. So row r = 2s takes (tile row s, patch row 1) and
      // (s - 1, 3); row r = 2s + 1 takes (s, 2) and (s + 1, 0). The zero tile rows stand in for s - 1 < 0, s + 1 = TH.
      const int64_t s = r / 2;
      const int64_t i_a = r % 2 ? 2 : 1, i_b = r % 2 ? 0 : 3;
      const T* __restrict ra = E + (s + 1) * Gw + 1;                  // tile row s, patch row i_a
      const T* __restrict rb = E + (r % 2 ? s + 2 : s) * Gw + 1;      // tile row s + 1 or s - 1, patch row i_b
      const T* __restrict a0 = ra + (4 * i_a + 0) * GP;
      const T* __restrict a1 = ra + (4 * i_a + 1) * GP;
      const T* __restrict a2 = ra + (4 * i_a + 2) * GP;
      const T* __restrict a3 = ra + (4 * i_a + 3) * GP;
      const T* __restrict b0 = rb + (4 * i_b + 0) * GP;
      const T* __restrict b1 = rb + (4 * i_b + 1) * GP;
      const T* __restrict b2 = rb + (4 * i_b + 2) * GP;
      const T* __restrict b3 = rb + (4 * i_b + 3) * GP;
      // Column 2u: tile u's patch column 1 and tile u - 1's column 3; column 2u + 1: tile u's 2 and tile u + 1's 0.
      #pragma GCC ivdep  // the stores' streams never overlap
      for (int64_t u = 0; u < TW; ++u) {
        line[2 * u] = (a1[u] + a3[u - 1]) + (b1[u] + b3[u - 1]);
        line[2 * u + 1] = (a2[u] + a0[u + 1]) + (b2[u] + b0[u + 1]);
      }
      std::copy_n(line, W, plane + r * W);
    }
  }
}

// ---- output: y = A^T m A per 2x2 tile, and its adjoint ----

// The output's epilogue over one written plane of n values: + residual (if not null), then max(., 0) (if relu;
// written so that a NaN stays NaN).
template <typename T>
DETRCORE_INLINE void epilogue(T* __restrict plane, const T* __restrict residual, int64_t n, bool relu) {
  if (residual) {
    for (int64_t i = 0; i < n; ++i) plane[i] += residual[i];
  }
  if (relu) {
    for (int64_t i = 0; i < n; ++i) plane[i] = plane[i] < T(0) ? T(0) : plane[i];
  }
}

// line: 2 * (2 * TW) scratch (the tile row's two output rows).
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void output_planes(const T* __restrict M, const T* __restrict bias, T* __restrict y,
                                               T* __restrict line, int64_t p0, int64_t p1, int64_t K, int64_t H,
                                               int64_t W, int64_t Tn, const T* __restrict residual, bool relu) {
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, W2 = 2 * TW, st = K * Tn;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / K, k = p % K;
    const T b0 = bias ? bias[k] : T(0);
    T* plane = y + p * H * W;
    for (int64_t ty = 0; ty < TH; ++ty) {
      const T* __restrict m = M + k * Tn + (n * TH + ty) * TW;
      T* __restrict l0 = line;
      T* __restrict l1 = line + W2;
      #pragma GCC ivdep  // the stores' streams never overlap
      for (int64_t tx = 0; tx < TW; ++tx) {
        T a[2][4];
        for (int j = 0; j < 4; ++j) {  // rows: A^T m
          const T m0 = m[(0 + j) * st + tx], m1 = m[(4 + j) * st + tx];
          const T m2 = m[(8 + j) * st + tx], m3 = m[(12 + j) * st + tx];
          a[0][j] = m0 + m1 + m2;
          a[1][j] = m1 - m2 - m3;
        }
        l0[2 * tx] = a[0][0] + a[0][1] + a[0][2] + b0;  // columns: (A^T m) A
        l0[2 * tx + 1] = a[0][1] - a[0][2] - a[0][3] + b0;
        l1[2 * tx] = a[1][0] + a[1][1] + a[1][2] + b0;
        l1[2 * tx + 1] = a[1][1] - a[1][2] - a[1][3] + b0;
      }
      std::copy_n(l0, W, plane + 2 * ty * W);
      if (2 * ty + 1 < H) std::copy_n(l1, W, plane + (2 * ty + 1) * W);
    }
    epilogue(plane, residual ? residual + p * H * W : nullptr, H * W, relu);
  }
}

// Planes in channel-major order, through a [16][TH * TW] buffer, as input_planes. scratch: 2 * (2 * TW) (the tile
// row's two gradient rows, zero past the image) + 16 * TH * TW.
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void output_adjoint_planes(const T* __restrict gy, T* __restrict gM,
                                                       T* __restrict scratch, int64_t p0, int64_t p1, int64_t N,
                                                       int64_t K, int64_t H, int64_t W, int64_t Tn) {
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, W2 = 2 * TW, TP = TH * TW;
  T* __restrict l0 = scratch;
  T* __restrict l1 = scratch + W2;
  T* __restrict loc = scratch + 2 * W2;
  std::fill(scratch, scratch + 2 * W2, T(0));
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t k = p / N, n = p % N;
    const T* plane = gy + (n * K + k) * H * W;
    for (int64_t ty = 0; ty < TH; ++ty) {
      std::copy_n(plane + 2 * ty * W, W, l0);
      if (2 * ty + 1 < H) {
        std::copy_n(plane + (2 * ty + 1) * W, W, l1);
      } else {
        std::fill(l1, l1 + W, T(0));
      }
      T* __restrict g = loc + ty * TW;
      #pragma GCC ivdep  // the stores' streams never overlap
      for (int64_t tx = 0; tx < TW; ++tx) {
        T a[2][4];  // adjoint of the columns
        for (int r = 0; r < 2; ++r) {
          const T* l = r ? l1 : l0;
          const T o0 = l[2 * tx], o1 = l[2 * tx + 1];
          a[r][0] = o0;
          a[r][1] = o0 + o1;
          a[r][2] = o0 - o1;
          a[r][3] = -o1;
        }
        for (int j = 0; j < 4; ++j) {  // adjoint of the rows
          g[(0 + j) * TP + tx] = a[0][j];
          g[(4 + j) * TP + tx] = a[0][j] + a[1][j];
          g[(8 + j) * TP + tx] = a[0][j] - a[1][j];
          g[(12 + j) * TP + tx] = -a[1][j];
        }
      }
    }
    for (int xi = 0; xi < 16; ++xi) std::copy_n(loc + xi * TP, TP, gM + (xi * K + k) * Tn + n * TP);
  }
}

// ---- F(4x4, 3x3): 6x6 patches at stride 4, 36 positions ----
// The same structure as above with Lavin & Gray's 4x4-output matrices (interpolation points 0, +-1, +-2, infinity):
//   B^T = [4  0 -5  0 1 0]    G = [ 1/4     0    0 ]    A^T = [1 1  1 1  1 0]
//         [0 -4 -4  1 1 0]        [-1/6 -1/6 -1/6 ]          [0 1 -1 2 -2 0]
//         [0  4 -4 -1 1 0]        [-1/6  1/6 -1/6 ]          [0 1  1 4  4 0]
//         [0 -2 -1  2 1 0]        [1/24 1/12  1/6 ]          [0 1 -1 8 -8 1]
//         [0  2 -1 -2 1 0]        [1/24 -1/12 1/6 ]
//         [0  4  0 -5 0 1]        [  0     0    1 ]
// 36 multiplies per 16 outputs instead of 144 (4x fewer; F(2x2) has 2.25x). The constants are small integers but
// for G's 1/6, 1/12 and 1/24, so the transforms round (about an ulp of the weights); the larger constants make the
// result's rounding a few times that of F(2x2).
// Each helper applies one 1-D matrix to a strided vector: x[0], x[xs], ...; y[0], y[ys], ...

template <typename T>
DETRCORE_INLINE void bt6(const T* x, int64_t xs, T* y, int64_t ys) {  // y = B^T x
  const T x0 = x[0], x1 = x[xs], x2 = x[2 * xs], x3 = x[3 * xs], x4 = x[4 * xs], x5 = x[5 * xs];
  y[0] = T(4) * x0 - T(5) * x2 + x4;
  y[ys] = (x3 + x4) - T(4) * (x1 + x2);
  y[2 * ys] = (x4 - x3) + T(4) * (x1 - x2);
  y[3 * ys] = (x4 - x2) + T(2) * (x3 - x1);
  y[4 * ys] = (x4 - x2) - T(2) * (x3 - x1);
  y[5 * ys] = T(4) * x1 - T(5) * x3 + x5;
}

template <typename T>
DETRCORE_INLINE void b6(const T* y, int64_t ys, T* x, int64_t xs) {  // x = B y (adjoint of bt6)
  const T y0 = y[0], y1 = y[ys], y2 = y[2 * ys], y3 = y[3 * ys], y4 = y[4 * ys], y5 = y[5 * ys];
  x[0] = T(4) * y0;
  x[xs] = T(4) * (y2 - y1 + y5) + T(2) * (y4 - y3);
  x[2 * xs] = -(T(5) * y0 + T(4) * (y1 + y2) + y3 + y4);
  x[3 * xs] = (y1 - y2) + T(2) * (y3 - y4) - T(5) * y5;
  x[4 * xs] = y0 + y1 + y2 + y3 + y4;
  x[5 * xs] = y5;
}

template <typename T>
DETRCORE_INLINE void at6(const T* m, int64_t ms, T* o, int64_t os) {  // o = A^T m (6 -> 4)
  const T m0 = m[0], m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms], m4 = m[4 * ms], m5 = m[5 * ms];
  const T s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
  o[0] = m0 + s12 + s34;
  o[os] = d12 + T(2) * d34;
  o[2 * os] = s12 + T(4) * s34;
  o[3 * os] = d12 + T(8) * d34 + m5;
}

template <typename T>
DETRCORE_INLINE void a6(const T* g, int64_t gs, T* m, int64_t ms) {  // m = A g (4 -> 6, adjoint of at6)
  const T g0 = g[0], g1 = g[gs], g2 = g[2 * gs], g3 = g[3 * gs];
  const T e = g0 + g2, o = g1 + g3, e4 = g0 + T(4) * g2, o8 = T(2) * g1 + T(8) * g3;
  m[0] = g0;
  m[ms] = e + o;
  m[2 * ms] = e - o;
  m[3 * ms] = e4 + o8;
  m[4 * ms] = e4 - o8;
  m[5 * ms] = g3;
}

// G's sixths as a multiply by the rounded 1/6 (a division each cost about as much as the rest of the transform).
template <typename T>
DETRCORE_INLINE void g6(const T* w, int64_t ws, T* u, int64_t us) {  // u = G w (3 -> 6)
  const T w0 = w[0], w1 = w[ws], w2 = w[2 * ws], sixth = T(1) / T(6);
  const T s = w0 + w2, q = T(0.25) * w0 + w2;
  u[0] = T(0.25) * w0;
  u[us] = -(s + w1) * sixth;
  u[2 * us] = (w1 - s) * sixth;
  u[3 * us] = (q + T(0.5) * w1) * sixth;
  u[4 * us] = (q - T(0.5) * w1) * sixth;
  u[5 * us] = w2;
}

template <typename T>
DETRCORE_INLINE void gt6(const T* u, int64_t us, T* w, int64_t ws) {  // w = G^T u (6 -> 3, adjoint of g6)
  const T u0 = u[0], u1 = u[us], u2 = u[2 * us], u3 = u[3 * us], u4 = u[4 * us], u5 = u[5 * us];
  const T s12 = u1 + u2, s34 = u3 + u4, sixth = T(1) / T(6);
  w[0] = T(0.25) * u0 + (T(0.25) * s34 - s12) * sixth;
  w[ws] = ((u2 - u1) + T(0.5) * (u3 - u4)) * sixth;
  w[2 * ws] = (s34 - s12) * sixth + u5;
}

template <typename T>
DETRCORE_ELEMENTWISE_CLONES void weight4_range(const T* __restrict w, T* __restrict U, int64_t i0, int64_t i1,
                                               int64_t KC) {
  T g[9][kBlock], buf[36 * kBlock];
  for (int64_t b0 = i0; b0 < i1; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, i1 - b0);
    weight_block_in(w, g, b0, nb);
#pragma GCC ivdep  // the stores' streams never overlap
    for (int64_t e = 0; e < nb; ++e) {
      T a[6][3];
      #pragma GCC unroll 6
      for (int q = 0; q < 3; ++q) g6(&g[q][e], 3 * kBlock, &a[0][q], 3);  // rows: G g
      #pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) g6(&a[r][0], 1, buf + 6 * r * kBlock + e, kBlock);  // columns: (G g) G^T
    }
    weight_block_out(buf, U, 36, b0, nb, KC);
  }
}

template <typename T>
DETRCORE_ELEMENTWISE_CLONES void weight4_adjoint_range(const T* __restrict gU, T* __restrict gw, int64_t i0,
                                                       int64_t i1, int64_t KC) {
  for (int64_t i = i0; i < i1; ++i) {
    T a[6][3];
    #pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) gt6(gU + 6 * r * KC + i, KC, &a[r][0], 1);  // adjoint of the columns
    #pragma GCC unroll 6
    for (int q = 0; q < 3; ++q) gt6(&a[0][q], 3, gw + i * 9 + q, 3);        // adjoint of the rows
  }
}

// As input_planes with 6x6 patches at stride 4: each padded patch row is split into its four column phases
// (quarter[(4 i + phase) * Tq + m] = padded column 4 m + phase) so that the tile loop reads unit-stride.
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void input4_planes(const T* __restrict x, T* __restrict V, T* __restrict rows,
                                               T* __restrict quarter, T* __restrict loc, int64_t p0, int64_t p1,
                                               int64_t N, int64_t C, int64_t H, int64_t W, int64_t Tn) {
  const int64_t TH = (H + 3) / 4, TW = (W + 3) / 4, Tq = TW + 1, TP = TH * TW;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p / N, n = p % N;
    const T* plane = x + (n * C + c) * H * W;
    for (int64_t ty = 0; ty < TH; ++ty) {
      for (int64_t i = 0; i < 6; ++i) {
        const int64_t r = 4 * ty - 1 + i;
        std::fill(rows, rows + 4 * Tq, T(0));
        if (r >= 0 && r < H) std::copy_n(plane + r * W, W, rows + 1);
        T* __restrict q = quarter + 4 * i * Tq;
        for (int64_t m = 0; m < Tq; ++m) {
          q[m] = rows[4 * m];
          q[Tq + m] = rows[4 * m + 1];
          q[2 * Tq + m] = rows[4 * m + 2];
          q[3 * Tq + m] = rows[4 * m + 3];
        }
      }
      T* __restrict o = loc + ty * TW;
#pragma GCC ivdep  // the stores' streams never overlap
      for (int64_t tx = 0; tx < TW; ++tx) {
        T d[6][6], a[6][6];
        #pragma GCC unroll 6
        for (int i = 0; i < 6; ++i) {  // patch row i, columns 0..5: phases 0..3 of tile tx, phases 0, 1 of tx + 1
          const T* q = quarter + 4 * i * Tq;
          d[i][0] = q[tx], d[i][1] = q[Tq + tx], d[i][2] = q[2 * Tq + tx], d[i][3] = q[3 * Tq + tx];
          d[i][4] = q[tx + 1], d[i][5] = q[Tq + tx + 1];
        }
        #pragma GCC unroll 6
        for (int j = 0; j < 6; ++j) bt6(&d[0][j], 6, &a[0][j], 6);               // rows: B^T d
        #pragma GCC unroll 6
        for (int r = 0; r < 6; ++r) bt6(&a[r][0], 1, o + 6 * r * TP + tx, TP);  // columns: (B^T d) B
      }
    }
    for (int xi = 0; xi < 36; ++xi) std::copy_n(loc + xi * TP, TP, V + (xi * C + c) * Tn + n * TP);
  }
}

// Small maps have few tiles per row (5 at 16 x 20), so the input adjoint and the output transform below vectorise
// over all TH * TW tiles of a plane, through a [positions][TH * TW] buffer, and scatter the 6x6 / 4x4 blocks in a
// separate pass (the input transform above and the output adjoint below go by tile rows, as F(2x2)'s).
// Input adjoint: each tile's 36 gradient values become its 6x6 patch gradient E[6 i + j][tile], then every pixel
// sums the patches that cover it. scratch: 36 * TH * TW + (4 * TH + 2) * (4 * TW + 2).
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void input4_adjoint_planes(const T* __restrict gV, T* __restrict gx,
                                                       T* __restrict scratch, int64_t p0, int64_t p1, int64_t N,
                                                       int64_t C, int64_t H, int64_t W, int64_t Tn) {
  const int64_t TH = (H + 3) / 4, TW = (W + 3) / 4, TP = TH * TW, Wb = 4 * TW + 2;
  T* __restrict E = scratch;
  T* __restrict pad = scratch + 36 * TP;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p / N, n = p % N;
    const T* __restrict g = gV + c * Tn + n * TP;
    const int64_t st = C * Tn;
#pragma GCC ivdep  // the stores' streams never overlap
    for (int64_t t = 0; t < TP; ++t) {
      T a[6][6];
      #pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) b6(g + 6 * r * st + t, st, &a[r][0], 1);  // adjoint of the columns
      #pragma GCC unroll 6
      for (int j = 0; j < 6; ++j) b6(&a[0][j], 6, E + j * TP + t, 6 * TP);   // adjoint of the rows
    }
    // Overlap-add of the patches into the zero-padded image (padded row 4 ty + i, column 4 tx + j), then its
    // interior out.
    std::fill(pad, pad + (4 * TH + 2) * Wb, T(0));
    for (int64_t ty = 0; ty < TH; ++ty)
      #pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) {
        T* __restrict row = pad + (4 * ty + i) * Wb;
        const T* __restrict e = E + 6 * i * TP + ty * TW;
        for (int64_t tx = 0; tx < TW; ++tx)
          #pragma GCC unroll 6
          for (int j = 0; j < 6; ++j) row[4 * tx + j] += e[j * TP + tx];
      }
    T* plane = gx + (n * C + c) * H * W;
    for (int64_t r = 0; r < H; ++r) std::copy_n(pad + (r + 1) * Wb + 1, W, plane + r * W);
  }
}

// Output: each tile's 16 values into buf[4 a + b][tile], then scattered to the image (rows and columns past it
// dropped). buf: 16 * TH * TW.
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void output4_planes(const T* __restrict M, const T* __restrict bias, T* __restrict y,
                                                T* __restrict buf, int64_t p0, int64_t p1, int64_t K, int64_t H,
                                                int64_t W, int64_t Tn, const T* __restrict residual, bool relu) {
  const int64_t TH = (H + 3) / 4, TW = (W + 3) / 4, TP = TH * TW, st = K * Tn;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / K, k = p % K;
    const T b0 = bias ? bias[k] : T(0);
    const T* __restrict m = M + k * Tn + n * TP;
#pragma GCC ivdep  // the stores' streams never overlap
    for (int64_t t = 0; t < TP; ++t) {
      T a[4][6];
      #pragma GCC unroll 6
      for (int j = 0; j < 6; ++j) at6(m + j * st + t, 6 * st, &a[0][j], 6);  // rows: A^T m
      #pragma GCC unroll 6
      for (int r = 0; r < 4; ++r) at6(&a[r][0], 1, buf + 4 * r * TP + t, TP);  // columns: (A^T m) A
    }
    T* __restrict plane = y + p * H * W;
    for (int64_t r = 0; r < H; ++r) {
      const T* __restrict row = buf + 4 * (r % 4) * TP + (r / 4) * TW;
      for (int64_t x = 0; x < W; ++x) plane[r * W + x] = row[(x % 4) * TP + x / 4] + b0;
    }
    epilogue(plane, residual ? residual + p * H * W : nullptr, H * W, relu);
  }
}

// Through a [36][TH * TW] buffer, as output_adjoint_planes. scratch: 4 * (4 * TW) (the tile row's four gradient
// rows, zero past the image) + 36 * TH * TW.
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void output4_adjoint_planes(const T* __restrict gy, T* __restrict gM,
                                                        T* __restrict scratch, int64_t p0, int64_t p1, int64_t N,
                                                        int64_t K, int64_t H, int64_t W, int64_t Tn) {
  const int64_t TH = (H + 3) / 4, TW = (W + 3) / 4, W4 = 4 * TW, TP = TH * TW;
  T* __restrict l = scratch;
  T* __restrict loc = scratch + 4 * W4;
  std::fill(l, l + 4 * W4, T(0));
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t k = p / N, n = p % N;
    const T* plane = gy + (n * K + k) * H * W;
    for (int64_t ty = 0; ty < TH; ++ty) {
      for (int64_t r = 0; r < 4; ++r) {
        if (4 * ty + r < H) {
          std::copy_n(plane + (4 * ty + r) * W, W, l + r * W4);
        } else {
          std::fill(l + r * W4, l + r * W4 + W, T(0));
        }
      }
      T* __restrict g = loc + ty * TW;
#pragma GCC ivdep  // the stores' streams never overlap
      for (int64_t tx = 0; tx < TW; ++tx) {
        T a[4][6];
        #pragma GCC unroll 6
        for (int r = 0; r < 4; ++r) a6(l + r * W4 + 4 * tx, 1, &a[r][0], 1);  // adjoint of the columns
        #pragma GCC unroll 6
        for (int j = 0; j < 6; ++j) a6(&a[0][j], 6, g + j * TP + tx, 6 * TP);   // adjoint of the rows
      }
    }
    for (int xi = 0; xi < 36; ++xi) std::copy_n(loc + xi * TP, TP, gM + (xi * K + k) * Tn + n * TP);
  }
}

#undef DETRCORE_INLINE

}  // namespace

template <typename T>
void winograd_weight_cpu(const T* w, T* U, int64_t KC, int num_threads, int tile) {
  if (KC <= 0) return;
  parallel_for(KC, kElementwiseGrain / winograd_points(tile), num_threads, [&](int64_t i0, int64_t i1) {
    tile == 4 ? weight4_range<T>(w, U, i0, i1, KC) : weight_range<T>(w, U, i0, i1, KC);
  });
}

template <typename T>
void winograd_weight_adjoint_cpu(const T* gU, T* gw, int64_t KC, int num_threads, int tile) {
  if (KC <= 0) return;
  parallel_for(KC, kElementwiseGrain / winograd_points(tile), num_threads, [&](int64_t i0, int64_t i1) {
    tile == 4 ? weight4_adjoint_range<T>(gU, gw, i0, i1, KC) : weight_adjoint_range<T>(gU, gw, i0, i1, KC);
  });
}

template <typename T>
void winograd_input_cpu(const T* x, T* V, int64_t N, int64_t C, int64_t H, int64_t W, int num_threads, int tile) {
  if (N <= 0 || C <= 0 || H <= 0 || W <= 0) return;
  const int64_t Tn = winograd_tiles(N, H, W, tile), TW = (W + tile - 1) / tile, TP = ((H + tile - 1) / tile) * TW;
  parallel_for(N * C, plane_grain(H * W), num_threads, [&](int64_t p0, int64_t p1) {
    if (tile == 4) {
      std::vector<T> rows(4 * TW + 4), quarter(24 * (TW + 1)), loc(36 * TP);
      input4_planes<T>(x, V, rows.data(), quarter.data(), loc.data(), p0, p1, N, C, H, W, Tn);
    } else {
      std::vector<T> rows(2 * TW + 2), half(8 * (TW + 1)), loc(16 * TP);
      input_planes<T>(x, V, rows.data(), half.data(), loc.data(), p0, p1, N, C, H, W, Tn);
    }
  });
}

template <typename T>
void winograd_input_adjoint_cpu(const T* gV, T* gx, int64_t N, int64_t C, int64_t H, int64_t W, int num_threads,
                                int tile) {
  if (N <= 0 || C <= 0 || H <= 0 || W <= 0) return;
  const int64_t Tn = winograd_tiles(N, H, W, tile), TW = (W + tile - 1) / tile, TH = (H + tile - 1) / tile;
  parallel_for(N * C, plane_grain(H * W), num_threads, [&](int64_t p0, int64_t p1) {
    if (tile == 4) {
      std::vector<T> scratch(36 * TH * TW + (4 * TH + 2) * (4 * TW + 2));
      input4_adjoint_planes<T>(gV, gx, scratch.data(), p0, p1, N, C, H, W, Tn);
    } else {
      std::vector<T> scratch(16 * (TH + 2) * (TW + 2) + 2 * TW);
      input_adjoint_planes<T>(gV, gx, scratch.data(), p0, p1, N, C, H, W, Tn);
    }
  });
}

template <typename T>
void winograd_output_cpu(const T* M, const T* bias, T* y, int64_t N, int64_t K, int64_t H, int64_t W,
                         int num_threads, int tile, const T* residual, bool relu) {
  if (N <= 0 || K <= 0 || H <= 0 || W <= 0) return;
  const int64_t Tn = winograd_tiles(N, H, W, tile), TW = (W + tile - 1) / tile;
  parallel_for(N * K, plane_grain(H * W), num_threads, [&](int64_t p0, int64_t p1) {
    if (tile == 4) {
      std::vector<T> buf(16 * ((H + 3) / 4) * TW);
      output4_planes<T>(M, bias, y, buf.data(), p0, p1, K, H, W, Tn, residual, relu);
    } else {
      std::vector<T> line(4 * TW);
      output_planes<T>(M, bias, y, line.data(), p0, p1, K, H, W, Tn, residual, relu);
    }
  });
}

template <typename T>
void winograd_output_adjoint_cpu(const T* gy, T* gM, int64_t N, int64_t K, int64_t H, int64_t W, int num_threads,
                                 int tile) {
  if (N <= 0 || K <= 0 || H <= 0 || W <= 0) return;
  const int64_t Tn = winograd_tiles(N, H, W, tile), TW = (W + tile - 1) / tile, TP = ((H + tile - 1) / tile) * TW;
  parallel_for(N * K, plane_grain(H * W), num_threads, [&](int64_t p0, int64_t p1) {
    std::vector<T> scratch(tile * tile * TW + winograd_points(tile) * TP);
    tile == 4 ? output4_adjoint_planes<T>(gy, gM, scratch.data(), p0, p1, N, K, H, W, Tn)
              : output_adjoint_planes<T>(gy, gM, scratch.data(), p0, p1, N, K, H, W, Tn);
  });
}

#define DETRCORE_INSTANTIATE(T)                                                                          \
  template void winograd_weight_cpu<T>(const T*, T*, int64_t, int, int);                                      \
  template void winograd_weight_adjoint_cpu<T>(const T*, T*, int64_t, int, int);                              \
  template void winograd_input_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, int, int);            \
  template void winograd_input_adjoint_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, int, int);    \
  template void winograd_output_cpu<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, int, int,  \
                                       const T*, bool);                                                      \
  template void winograd_output_adjoint_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, int, int);
DETRCORE_INSTANTIATE(float)
DETRCORE_INSTANTIATE(double)
#undef DETRCORE_INSTANTIATE

}  // namespace detrcore
