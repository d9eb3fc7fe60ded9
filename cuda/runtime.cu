// Thin runtime helpers for bindings.cpp, which is compiled without the CUDA headers.
#include <cuda_runtime.h>

#include "runtime.h"

namespace detrcore {
namespace cuda {

int get_device(int* device) { return static_cast<int>(cudaGetDevice(device)); }
int set_device(int device) { return static_cast<int>(cudaSetDevice(device)); }
const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;  // no driver: 0 devices, not an error
}
int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace cuda
}  // namespace detrcore
