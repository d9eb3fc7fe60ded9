// Box ops: the contract shared by the CPU kernels (box_ops.cpp) and the CUDA kernels (cuda/box_ops.cu).
// The math and its degenerate-box definitions are in box_math.h. All pointers address contiguous memory.
//   box_map:            in[n,4] -> out[n,4], one of boxmath::BoxMap
//   box_pairwise:       a[B,N,4], b[B,M,4] -> out[B,N,M]  (giou ? GIoU : IoU)
//   box_pairwise_bwd:   grad[B,N,M] -> grad_a[B,N,4], grad_b[B,M,4] (overwritten, deterministic)
//   giou_loss:          a[n,4], b[n,4] -> out[n] = 1 - giou(a_i, b_i)
//   giou_loss_bwd:      grad[n] -> grad_a[n,4], grad_b[n,4]
//   inverse_sigmoid:    x[n] -> out[n];  inverse_sigmoid_bwd: grad[n], x[n] -> grad_x[n]
#pragma once
#include <cstdint>

#include "box_math.h"
#include "tensor.h"

namespace detrcore {

// ---- CPU (T = float or double); num_threads as torch.get_num_threads() ----
template <typename T>
void box_map_cpu(const T* in, T* out, int64_t n, int kind, int num_threads);
template <typename T>
void box_pairwise_cpu(const T* a, const T* b, T* out, int64_t B, int64_t N, int64_t M, bool giou, int num_threads);
template <typename T>
void box_pairwise_bwd_cpu(const T* grad, const T* a, const T* b, T* grad_a, T* grad_b, int64_t B, int64_t N,
                          int64_t M, bool giou, int num_threads);
template <typename T>
void giou_loss_cpu(const T* a, const T* b, T* out, int64_t n, int num_threads);
template <typename T>
void giou_loss_bwd_cpu(const T* grad, const T* a, const T* b, T* grad_a, T* grad_b, int64_t n, int num_threads);
template <typename T>
void inverse_sigmoid_cpu(const T* x, T* out, int64_t n, double eps, int num_threads);
template <typename T>
void inverse_sigmoid_bwd_cpu(const T* grad, const T* x, T* grad_x, int64_t n, double eps, int num_threads);

// ---- CUDA (dtype any of f16, bf16, f32, f64; accumulation in float, double for f64). Launch on `stream`
// (a cudaStream_t) on the current device; return a cudaError_t (0 = success), never throw. ----
int box_map_cuda(DType dt, const void* in, void* out, int64_t n, int kind, void* stream);
int box_pairwise_cuda(DType dt, const void* a, const void* b, void* out, int64_t B, int64_t N, int64_t M, bool giou,
                      void* stream);
int box_pairwise_bwd_cuda(DType dt, const void* grad, const void* a, const void* b, void* grad_a, void* grad_b,
                          int64_t B, int64_t N, int64_t M, bool giou, void* stream);
int giou_loss_cuda(DType dt, const void* a, const void* b, void* out, int64_t n, void* stream);
int giou_loss_bwd_cuda(DType dt, const void* grad, const void* a, const void* b, void* grad_a, void* grad_b,
                       int64_t n, void* stream);
int inverse_sigmoid_cuda(DType dt, const void* x, void* out, int64_t n, double eps, void* stream);
int inverse_sigmoid_bwd_cuda(DType dt, const void* grad, const void* x, void* grad_x, int64_t n, double eps,
                             void* stream);

}  // namespace detrcore
