// Host-side CUDA runtime helpers callable from code compiled without the CUDA headers (bindings.cpp).
#pragma once

namespace detrcore {
namespace cuda {

int get_device(int* device);        // cudaError_t as int
int set_device(int device);         // cudaError_t as int
const char* error_string(int err);  // cudaGetErrorString
int device_count();                 // 0 when there is no driver or no device
int runtime_version();              // CUDART_VERSION of the linked runtime, e.g. 13000

}  // namespace cuda
}  // namespace detrcore
