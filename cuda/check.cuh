// The one error check used after every kernel launch: kernels never print or abort; the host entry point
// returns the cudaError_t and bindings.cpp raises it as a Python RuntimeError naming the op.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#define DETRCORE_CUDA_RETURN_IF_ERROR(expr)        \
  do {                                             \
    cudaError_t detrcore_err_ = (expr);            \
    if (detrcore_err_ != cudaSuccess) return static_cast<int>(detrcore_err_); \
  } while (0)

// After a launch: reports both launch-configuration errors and sticky errors from earlier work.
#define DETRCORE_CUDA_CHECK_LAUNCH() DETRCORE_CUDA_RETURN_IF_ERROR(cudaGetLastError())

namespace detrcore {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items (kernels loop, so the grid may be smaller than n / kThreads).
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  int64_t b = (n + threads - 1) / threads;
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned int>(b < 1 ? 1 : (b > cap ? cap : b));
}

}  // namespace cuda
}  // namespace detrcore
