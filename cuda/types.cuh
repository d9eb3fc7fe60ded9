// Storage <-> accumulation type conversions for the CUDA kernels: half and bfloat16 are loaded into float,
// float stays float, double stays double (torchvision's "upcast" habit).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tensor.h"

namespace detrcore {
namespace cuda {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

template <typename A, typename T>
__device__ __forceinline__ A load(const T* p) {
  return static_cast<A>(*p);
}
template <>
__device__ __forceinline__ float load<float, __half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ float load<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T, typename A>
__device__ __forceinline__ void store(T* p, A v) {
  *p = static_cast<T>(v);
}
template <>
__device__ __forceinline__ void store<__half, float>(__half* p, float v) {
  *p = __float2half_rn(v);
}
template <>
__device__ __forceinline__ void store<__nv_bfloat16, float>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

// Typed views of the untyped pointers the host entry points receive, and the stream handle.
template <typename T>
inline const T* cp(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
inline T* mp(void* p) {
  return static_cast<T*>(p);
}
inline cudaStream_t st(void* s) { return static_cast<cudaStream_t>(s); }

// Calls f(T{}) with T the storage type of dt; returns cudaErrorInvalidValue for other dtypes.
template <typename F>
int dispatch_floating(DType dt, F&& f) {
  switch (dt) {
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace detrcore
