// Typed, borrowed views of DLPack tensors and the argument checks every entry point shares.
//
// The native core never sees torch: bindings.cpp turns each Python tensor into a `View` through DLPack
// (https://dmlc.github.io/dlpack/latest/c_api.html). Only the struct layouts we read are declared here; they
// are frozen by the DLPack ABI (v0.x "dltensor" and v1.x "dltensor_versioned").
//
// Checks throw detrcore::ValueError / detrcore::TypeError; bindings.cpp turns them into Python's ValueError /
// TypeError, so every message must name the offending argument.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace detrcore {

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

namespace dl {
struct Device {
  int32_t device_type;
  int32_t device_id;
};
struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; may be null for compact row-major
  uint64_t byte_offset;
};
struct ManagedTensor {  // capsule "dltensor"
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};
struct Version {
  uint32_t major;
  uint32_t minor;
};
struct ManagedTensorVersioned {  // capsule "dltensor_versioned" (DLPack >= 1.0)
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags;
  Tensor dl_tensor;
};
// DLPack >= 1.3 C exchange API, published by the producer type as `__dlpack_c_exchange_api__`.
struct ExchangeAPIHeader {
  Version version;
  ExchangeAPIHeader* prev_api;
};
struct ExchangeAPI {
  ExchangeAPIHeader header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);  // 0 ok; -1 with a Python error set
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_stream);
};
enum : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kCUDAManaged = 13 };
enum : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6 };
constexpr uint64_t kFlagReadOnly = 1ull << 0;
}  // namespace dl

enum class DType { f16, bf16, f32, f64, i64, u8, other };
enum class DeviceKind { cpu, cuda, other };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
    default: return "an unsupported dtype";
  }
}

// A borrowed view: valid while the Python object it came from is alive (bindings keep it alive for the call).
struct View {
  const char* name = "tensor";  // argument name, for error messages
  void* data = nullptr;
  DeviceKind device = DeviceKind::other;
  int32_t device_id = 0;
  int32_t ndim = 0;
  DType dtype = DType::other;
  const int64_t* shape = nullptr;
  const int64_t* strides = nullptr;  // null = compact row-major
  bool readonly = false;

  int64_t size(int i) const { return shape[i < 0 ? i + ndim : i]; }
  int64_t stride(int i) const {
    if (i < 0) i += ndim;
    if (strides) return strides[i];
    int64_t s = 1;
    for (int k = ndim - 1; k > i; --k) s *= shape[k];
    return s;
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {  // compact row-major; size-1 dims may carry any stride; empty: any strides
    if (!strides || numel() == 0) return true;
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] == 0) return true;
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

inline View view_of(const dl::Tensor& t, const char* name, bool readonly) {
  View v;
  v.name = name;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.device = t.device.device_type == dl::kCPU    ? DeviceKind::cpu
             : t.device.device_type == dl::kCUDA ? DeviceKind::cuda
                                                 : DeviceKind::other;
  v.device_id = t.device.device_id;
  v.ndim = t.ndim;
  v.shape = t.shape;
  v.strides = t.strides;
  v.readonly = readonly;
  const auto& d = t.dtype;
  if (d.lanes == 1) {
    if (d.code == dl::kFloat && d.bits == 16) v.dtype = DType::f16;
    if (d.code == dl::kFloat && d.bits == 32) v.dtype = DType::f32;
    if (d.code == dl::kFloat && d.bits == 64) v.dtype = DType::f64;
    if (d.code == dl::kBfloat && d.bits == 16) v.dtype = DType::bf16;
    if (d.code == dl::kInt && d.bits == 64) v.dtype = DType::i64;
    if (d.code == dl::kUInt && d.bits == 8) v.dtype = DType::u8;
  }
  return v;
}

// ---- argument checks (each names the argument) ----
inline std::string arg(const View& v) { return std::string(v.name); }

inline void check_ndim(const View& v, int ndim, const char* layout) {
  if (v.ndim != ndim)
    throw ValueError(arg(v) + " must be " + std::to_string(ndim) + "-D " + layout + ", got shape " + v.shape_str());
}
inline void check_size(const View& v, int dim, int64_t expected, const char* what) {
  if (v.size(dim) != expected)
    throw ValueError(arg(v) + ": expected " + what + " = " + std::to_string(expected) + " in dim " +
                     std::to_string(dim) + ", got shape " + v.shape_str());
}
inline void check_contiguous(const View& v) {
  if (!v.is_contiguous()) throw ValueError(arg(v) + " must be contiguous");
}
inline void check_writable(const View& v) {
  if (v.readonly) throw ValueError(arg(v) + " is read-only");
}
// Contiguous out and in share no element, or (allow_same: an in-place elementwise op) are exactly the same elements.
inline void check_no_overlap(const View& in, const View& out, size_t elem_bytes, bool allow_same) {
  const char* a = static_cast<const char*>(in.data);
  const char* b = static_cast<const char*>(out.data);
  const size_t na = static_cast<size_t>(in.numel()) * elem_bytes, nb = static_cast<size_t>(out.numel()) * elem_bytes;
  if (!na || !nb || a >= b + nb || b >= a + na) return;
  if (allow_same && a == b && na == nb) return;
  throw ValueError(arg(out) + " overlaps " + arg(in) +
                   (allow_same ? ": give the same tensor (in place) or a separate one" : ": give a separate tensor"));
}
inline void check_float(const View& v, bool allow_half) {
  bool ok = v.dtype == DType::f32 || v.dtype == DType::f64 ||
            (allow_half && (v.dtype == DType::f16 || v.dtype == DType::bf16));
  if (!ok)
    throw TypeError(arg(v) + " must be " +
                    (allow_half ? "float16, bfloat16, float32 or float64" : "float32 or float64 on the CPU") +
                    ", got " + dtype_name(v.dtype));
}
inline void check_same_dtype(const View& a, const View& b) {
  if (a.dtype != b.dtype)
    throw TypeError(arg(b) + " must have the dtype of " + arg(a) + " (" + dtype_name(a.dtype) + "), got " +
                    dtype_name(b.dtype));
}
inline void check_same_device(const View& a, const View& b) {
  if (a.device != b.device || a.device_id != b.device_id)
    throw ValueError(arg(b) + " must be on the device of " + arg(a));
}
inline void check_device_supported(const View& v) {
  if (v.device == DeviceKind::other) throw ValueError(arg(v) + ": only CPU and CUDA tensors are supported");
}

}  // namespace detrcore
