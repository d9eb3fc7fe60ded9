// Winograd F(2x2, 3x3) and F(4x4, 3x3) transforms for 3x3 convolutions with stride 1, padding 1 and no dilation
// (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). The convolution
//   y[n, k] = sum_c x[n, c] (*) w[k, c]            x: [N, C, H, W], w: [K, C, 3, 3], y: [N, K, H, W]
// is cut into 2x2 output tiles (T = N * ceil(H/2) * ceil(W/2) of them, t = (n * TH + ty) * TW + tx), each computed
// from its 4x4 input patch (rows 2ty-1 .. 2ty+2, columns 2tx-1 .. 2tx+2, zero outside the image) as
//   Y_t = A^T [ sum_c (G w[k,c] G^T) . (B^T d_{t,c} B) ] A        (. elementwise over the 4x4 = 16 positions xi)
// i.e. 16 matrix products M[xi] = U[xi] V[xi] ([K, C] x [C, T]) between the transforms below: 16 multiplies per 4
// outputs instead of 36, 2.25x fewer, and all of them in large matrix products. The caller does the products.
//   weight:  U[xi][k][c] = (G w[k,c] G^T)[xi]          G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//   input:   V[xi][c][t] = (B^T d_{t,c} B)[xi]         B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   output:  y[n][k][2ty+a][2tx+b] = (A^T M[.][k][t] A)[a][b] (+ bias[k])     A^T = [1 1 1 0; 0 1 -1 -1]
// and their adjoints for the backward (gradient of y -> of M, of V -> of x, of U -> of w):
//   grad_x = input_adjoint(U^T gM),  grad_w = weight_adjoint(gM V^T),  gM = output_adjoint(grad_y).
// The transforms' constants are 0, +-1 and +-1/2: exact in floating point, so the rounding is that of the sums
// (about that of a direct convolution). All arrays contiguous, T = float or double; every kernel overwrites its
// output. Parallel over image planes (input, output) or weight pairs (k, c).
// F(4x4, 3x3) (tile = 4; every function takes the tile size, 2 by default) is the same with 4x4 output tiles from 6x6
// patches (rows 4ty-1 .. 4ty+4) and 36 positions: U [36][K*C], V [36][C][T], M [36][K][T], T = N * ceil(H/4) *
// ceil(W/4); 36 multiplies per 16 outputs (4x fewer than direct), products with a quarter of the tiles. Its
// matrices are in winograd.cpp; G has 1/6, 1/12 and 1/24, so its weight transform rounds.
#pragma once
#include <cstdint>

namespace detrcore {

// Output tiles of N images of H x W (tile: 2 or 4, the output tile's side) and transform positions per tile.
inline int64_t winograd_tiles(int64_t N, int64_t H, int64_t W, int tile = 2) {
  return N * ((H + tile - 1) / tile) * ((W + tile - 1) / tile);
}
inline int64_t winograd_points(int tile) { return (tile + 2) * (tile + 2); }

// w [K*C][3][3] -> U [P][K*C], P = winograd_points(tile) (16 or 36)
template <typename T>
void winograd_weight_cpu(const T* w, T* U, int64_t KC, int num_threads, int tile = 2);
// gU [P][K*C] -> gw [K*C][3][3]
template <typename T>
void winograd_weight_adjoint_cpu(const T* gU, T* gw, int64_t KC, int num_threads, int tile = 2);

// x [N][C][H][W] -> V [P][C][T]
template <typename T>
void winograd_input_cpu(const T* x, T* V, int64_t N, int64_t C, int64_t H, int64_t W, int num_threads, int tile = 2);
// gV [P][C][T] -> gx [N][C][H][W]
template <typename T>
void winograd_input_adjoint_cpu(const T* gV, T* gx, int64_t N, int64_t C, int64_t H, int64_t W, int num_threads,
                                int tile = 2);

// M [P][K][T] -> y [N][K][H][W], plus bias[k] if bias is not null, plus residual [N][K][H][W] if not null, then
// max(., 0) if relu (a NaN stays NaN): a convolution's epilogue (a frozen BatchNorm folded into w and bias).
template <typename T>
void winograd_output_cpu(const T* M, const T* bias, T* y, int64_t N, int64_t K, int64_t H, int64_t W,
                         int num_threads, int tile = 2, const T* residual = nullptr, bool relu = false);
// gy [N][K][H][W] -> gM [P][K][T]
template <typename T>
void winograd_output_adjoint_cpu(const T* gy, T* gM, int64_t N, int64_t K, int64_t H, int64_t W, int num_threads,
                                 int tile = 2);

}  // namespace detrcore
