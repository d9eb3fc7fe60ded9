// Winograd F(2x2, 3x3) transforms for 3x3 convolutions with stride 1, padding 1 and no dilation (Lavin & Gray,
// "Fast Algorithms for Convolutional Neural Networks", 2016). The convolution
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
#pragma once
#include <cstdint>

namespace detrcore {

inline int64_t winograd_tiles(int64_t N, int64_t H, int64_t W) { return N * ((H + 1) / 2) * ((W + 1) / 2); }

// w [K*C][3][3] -> U [16][K*C]
template <typename T>
void winograd_weight_cpu(const T* w, T* U, int64_t KC, int num_threads);
// gU [16][K*C] -> gw [K*C][3][3]
template <typename T>
void winograd_weight_adjoint_cpu(const T* gU, T* gw, int64_t KC, int num_threads);

// x [N][C][H][W] -> V [16][C][T]
template <typename T>
void winograd_input_cpu(const T* x, T* V, int64_t N, int64_t C, int64_t H, int64_t W, int num_threads);
// gV [16][C][T] -> gx [N][C][H][W]
template <typename T>
void winograd_input_adjoint_cpu(const T* gV, T* gx, int64_t N, int64_t C, int64_t H, int64_t W, int num_threads);

// M [16][K][T] -> y [N][K][H][W], plus bias[k] if bias is not null
template <typename T>
void winograd_output_cpu(const T* M, const T* bias, T* y, int64_t N, int64_t K, int64_t H, int64_t W,
                         int num_threads);
// gy [N][K][H][W] -> gM [16][K][T]
template <typename T>
void winograd_output_adjoint_cpu(const T* gy, T* gM, int64_t N, int64_t K, int64_t H, int64_t W, int num_threads);

}  // namespace detrcore
