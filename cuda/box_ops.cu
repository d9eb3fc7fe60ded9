// CUDA box kernels. The math lives in cpp/box_math.h (shared with the CPU); storage may be half, bfloat16,
// float or double, accumulation is float (double for double). The backward of the pairwise ops gives one warp
// to each output row of grad_a and one to each of grad_b and reduces with shuffles in a fixed order:
// deterministic, no atomics.
#include "box_ops.h"
#include "check.cuh"
#include "types.cuh"

namespace detrcore {
namespace cuda {
namespace {

constexpr int kWarp = 32;

template <typename A, typename T>
__device__ __forceinline__ void load4(const T* p, A* q) {
  q[0] = load<A>(p), q[1] = load<A>(p + 1), q[2] = load<A>(p + 2), q[3] = load<A>(p + 3);
}
template <typename T, typename A>
__device__ __forceinline__ void store4(T* p, const A* q) {
  store(p, q[0]), store(p + 1, q[1]), store(p + 2, q[2]), store(p + 3, q[3]);
}

template <typename T>
__global__ void box_map_kernel(const T* in, T* out, int64_t n, int kind) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A x[4], y[4];
    load4(in + 4 * i, x);
    boxmath::box_map<A>(kind, x, y);
    store4(out + 4 * i, y);
  }
}

template <typename T, bool kGiou>
__global__ void pairwise_kernel(const T* a, const T* b, T* out, int64_t B, int64_t N, int64_t M) {
  using A = acc_t<T>;
  const int64_t total = B * N * M;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i % M, r = i / M, bi = r / N;  // r = bi * N + n
    A x[4], y[4];
    load4(a + 4 * r, x);
    load4(b + 4 * (bi * M + m), y);
    store(out + i, boxmath::pair_forward<A, kGiou>(x, y).giou);
  }
}

template <typename A>
__device__ __forceinline__ void warp_sum4(A* v) {
  for (int off = kWarp / 2; off > 0; off /= 2)
    for (int k = 0; k < 4; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
}

// One warp per row of grad_a (rows = B * N) or, with for_b, per row of grad_b (rows = B * M).
template <typename T, bool kGiou>
__global__ void pairwise_bwd_kernel(const T* grad, const T* a, const T* b, T* grad_out, int64_t B, int64_t N,
                                    int64_t M, bool for_b) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = int64_t(gridDim.x) * (blockDim.x / kWarp);
  const int64_t rows = for_b ? B * M : B * N;
  const int64_t inner = for_b ? N : M;
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; row < rows; row += warps_per_grid) {
    const int64_t bi = row / (for_b ? M : N), own = row % (for_b ? M : N);
    A mine[4];
    load4((for_b ? b + 4 * (bi * M) : a + 4 * (bi * N)) + 4 * own, mine);
    A acc[4] = {0, 0, 0, 0};
    for (int64_t j = lane; j < inner; j += kWarp) {
      const int64_t n = for_b ? j : own, m = for_b ? own : j;
      const A g = load<A>(grad + (bi * N + n) * M + m);
      A other[4], scratch[4] = {0, 0, 0, 0};
      load4((for_b ? a + 4 * (bi * N) : b + 4 * (bi * M)) + 4 * j, other);
      const A* pa = for_b ? other : mine;
      const A* pb = for_b ? mine : other;
      auto p = boxmath::pair_forward<A, kGiou>(pa, pb);
      if (for_b)
        boxmath::pair_backward<A, kGiou>(pa, pb, p, g, scratch, acc);
      else
        boxmath::pair_backward<A, kGiou>(pa, pb, p, g, acc, scratch);
    }
    warp_sum4(acc);
    if (lane == 0) store4(grad_out + 4 * row, acc);
  }
}

template <typename T>
__global__ void giou_loss_kernel(const T* a, const T* b, T* out, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A x[4], y[4];
    load4(a + 4 * i, x);
    load4(b + 4 * i, y);
    store(out + i, A(1) - boxmath::pair_forward<A, true>(x, y).giou);
  }
}

template <typename T>
__global__ void giou_loss_bwd_kernel(const T* grad, const T* a, const T* b, T* grad_a, T* grad_b, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A x[4], y[4], gx[4] = {0, 0, 0, 0}, gy[4] = {0, 0, 0, 0};
    load4(a + 4 * i, x);
    load4(b + 4 * i, y);
    auto p = boxmath::pair_forward<A, true>(x, y);
    boxmath::pair_backward<A, true>(x, y, p, -load<A>(grad + i), gx, gy);
    store4(grad_a + 4 * i, gx);
    store4(grad_b + 4 * i, gy);
  }
}

template <typename T>
__global__ void inverse_sigmoid_kernel(const T* x, T* out, int64_t n, double eps) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store(out + i, boxmath::inverse_sigmoid<A>(load<A>(x + i), A(eps)));
}

template <typename T>
__global__ void inverse_sigmoid_bwd_kernel(const T* grad, const T* x, T* grad_x, int64_t n, double eps) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store(grad_x + i, boxmath::inverse_sigmoid_grad<A>(load<A>(x + i), A(eps), load<A>(grad + i)));
}


}  // namespace
}  // namespace cuda

using cuda::blocks_for;
using cuda::cp;
using cuda::dispatch_floating;
using cuda::kThreads;
using cuda::mp;
using cuda::st;

int box_map_cuda(DType dt, const void* in, void* out, int64_t n, int kind, void* stream) {
  if (n == 0) return 0;
  return dispatch_floating(dt, [&](auto tag) {
    using T = decltype(tag);
    cuda::box_map_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(cp<T>(in), mp<T>(out), n, kind);
    DETRCORE_CUDA_CHECK_LAUNCH();
    return 0;
  });
}

int box_pairwise_cuda(DType dt, const void* a, const void* b, void* out, int64_t B, int64_t N, int64_t M, bool giou,
                      void* stream) {
  if (B * N * M == 0) return 0;
  return dispatch_floating(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = giou ? cuda::pairwise_kernel<T, true> : cuda::pairwise_kernel<T, false>;
    kernel<<<blocks_for(B * N * M), kThreads, 0, st(stream)>>>(cp<T>(a), cp<T>(b), mp<T>(out), B, N, M);
    DETRCORE_CUDA_CHECK_LAUNCH();
    return 0;
  });
}

int box_pairwise_bwd_cuda(DType dt, const void* grad, const void* a, const void* b, void* grad_a, void* grad_b,
                          int64_t B, int64_t N, int64_t M, bool giou, void* stream) {
  if (B == 0 || (N == 0 && M == 0)) return 0;
  return dispatch_floating(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = giou ? cuda::pairwise_bwd_kernel<T, true> : cuda::pairwise_bwd_kernel<T, false>;
    // Rows with an empty inner dimension still get their zero written by their warp.
    if (N > 0) {
      kernel<<<blocks_for(B * N * cuda::kWarp), kThreads, 0, st(stream)>>>(cp<T>(grad), cp<T>(a), cp<T>(b),
                                                                             mp<T>(grad_a), B, N, M, false);
      DETRCORE_CUDA_CHECK_LAUNCH();
    }
    if (M > 0) {
      kernel<<<blocks_for(B * M * cuda::kWarp), kThreads, 0, st(stream)>>>(cp<T>(grad), cp<T>(a), cp<T>(b),
                                                                             mp<T>(grad_b), B, N, M, true);
      DETRCORE_CUDA_CHECK_LAUNCH();
    }
    return 0;
  });
}

int giou_loss_cuda(DType dt, const void* a, const void* b, void* out, int64_t n, void* stream) {
  if (n == 0) return 0;
  return dispatch_floating(dt, [&](auto tag) {
    using T = decltype(tag);
    cuda::giou_loss_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(cp<T>(a), cp<T>(b), mp<T>(out), n);
    DETRCORE_CUDA_CHECK_LAUNCH();
    return 0;
  });
}

int giou_loss_bwd_cuda(DType dt, const void* grad, const void* a, const void* b, void* grad_a, void* grad_b,
                       int64_t n, void* stream) {
  if (n == 0) return 0;
  return dispatch_floating(dt, [&](auto tag) {
    using T = decltype(tag);
    cuda::giou_loss_bwd_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(cp<T>(grad), cp<T>(a), cp<T>(b),
                                                                               mp<T>(grad_a), mp<T>(grad_b), n);
    DETRCORE_CUDA_CHECK_LAUNCH();
    return 0;
  });
}

int inverse_sigmoid_cuda(DType dt, const void* x, void* out, int64_t n, double eps, void* stream) {
  if (n == 0) return 0;
  return dispatch_floating(dt, [&](auto tag) {
    using T = decltype(tag);
    cuda::inverse_sigmoid_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(cp<T>(x), mp<T>(out), n, eps);
    DETRCORE_CUDA_CHECK_LAUNCH();
    return 0;
  });
}

int inverse_sigmoid_bwd_cuda(DType dt, const void* grad, const void* x, void* grad_x, int64_t n, double eps,
                             void* stream) {
  if (n == 0) return 0;
  return dispatch_floating(dt, [&](auto tag) {
    using T = decltype(tag);
    cuda::inverse_sigmoid_bwd_kernel<T>
        <<<blocks_for(n), kThreads, 0, st(stream)>>>(cp<T>(grad), cp<T>(x), mp<T>(grad_x), n, eps);
    DETRCORE_CUDA_CHECK_LAUNCH();
    return 0;
  });
}

}  // namespace detrcore
