// detrcore._C: the only pybind11 file. It converts arguments (DLPack -> View), checks them, releases the GIL
// and dispatches to the CPU or CUDA kernel. No math here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "assignment.h"
#include "attention.h"
#include "box_ops.h"
#include "dropout.h"
#include "frozen_bn.h"
#include "ms_deform_attn.h"
#include "parallel.h"
#include "tensor.h"
#include "winograd.h"
#ifdef DETRCORE_WITH_CUDA
#include "runtime.h"
#endif

namespace py = pybind11;

namespace detrcore {
namespace {

// ---------------------------------------------------------------------------------------------------------
// DLPack import. Fast path: the producer type's C exchange API (torch >= 2.13 publishes it), ~25x cheaper
// than calling __dlpack__; cached per Python type. Fallback: the __dlpack__ protocol (numpy, older torch).
const dl::ExchangeAPI* exchange_api_for(PyObject* obj) {
  static PyTypeObject* cached_type = nullptr;
  static const dl::ExchangeAPI* cached_api = nullptr;
  PyTypeObject* tp = Py_TYPE(obj);
  if (tp == cached_type) return cached_api;
  const dl::ExchangeAPI* api = nullptr;
  PyObject* cap = PyObject_GetAttrString(reinterpret_cast<PyObject*>(tp), "__dlpack_c_exchange_api__");
  if (!cap) {
    PyErr_Clear();
    cap = PyObject_GetAttrString(reinterpret_cast<PyObject*>(tp), "__c_dlpack_exchange_api__");
  }
  if (!cap) PyErr_Clear();
  if (cap && PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
    auto* a = static_cast<const dl::ExchangeAPI*>(PyCapsule_GetPointer(cap, "dlpack_exchange_api"));
    if (a && a->header.version.major == 1 && a->dltensor_from_py_object_no_sync) api = a;
  }
  Py_XDECREF(cap);  // the table is static inside the producer library
  cached_type = tp;
  cached_api = api;
  return api;
}

// One tensor argument, borrowed for the duration of the call.
struct Arg {
  static constexpr int kMaxNumpyDims = 8;
  py::object keep;  // the DLPack capsule on the slow path
  dl::Tensor raw{};
  int64_t np_shape[kMaxNumpyDims], np_strides[kMaxNumpyDims];
  bool from_numpy_path = false;
  View v;

  // numpy arrays are read directly (cheaper than a DLPack round trip); false when this one cannot be.
  bool from_numpy(py::handle obj, const char* name) {
    if (!py::isinstance<py::array>(obj)) return false;
    auto arr = py::reinterpret_borrow<py::array>(obj);
    const int nd = static_cast<int>(arr.ndim());
    const py::dtype dt = arr.dtype();
    const char kind = dt.kind(), order = dt.byteorder();
    const int64_t item = dt.itemsize();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    const bool native = order == '=' || order == '|' || order == '>';
#else
    const bool native = order == '=' || order == '|' || order == '<';
#endif
    if (nd > kMaxNumpyDims || !native) return false;
    DType t = DType::other;
    if (kind == 'f' && item == 2) t = DType::f16;
    if (kind == 'f' && item == 4) t = DType::f32;
    if (kind == 'f' && item == 8) t = DType::f64;
    if (kind == 'i' && item == 8) t = DType::i64;
    if (kind == 'u' && item == 1) t = DType::u8;
    for (int i = 0; i < nd; ++i) {
      if (arr.strides(i) % item) return false;  // not element-aligned: let DLPack report it
      np_shape[i] = arr.shape(i);
      np_strides[i] = arr.strides(i) / item;
    }
    v.name = name;
    v.data = const_cast<void*>(arr.data());
    v.device = DeviceKind::cpu;
    v.ndim = nd;
    v.dtype = t;
    v.shape = np_shape;
    v.strides = np_strides;
    v.readonly = !arr.writeable();
    return true;
  }

  Arg(py::handle obj, const char* name) {
    if (obj.is_none()) throw TypeError(std::string(name) + " must be a tensor, got None");
    if ((from_numpy_path = from_numpy(obj, name))) return;
    if (const dl::ExchangeAPI* api = exchange_api_for(obj.ptr())) {
      if (api->dltensor_from_py_object_no_sync(obj.ptr(), &raw) != 0) {
        py::error_already_set e;
        throw TypeError(std::string(name) + ": " + e.what());
      }
      v = view_of(raw, name, false);
      return;
    }
    if (!py::hasattr(obj, "__dlpack__"))
      throw TypeError(std::string(name) + " must be a tensor or array supporting DLPack, got " +
                      std::string(py::str(py::type::of(obj).attr("__name__"))));
    try {
      py::tuple dev = obj.attr("__dlpack_device__")();
      // CPU producers (numpy) accept only stream=None; for CUDA, -1 = "no synchronisation": we launch on the
      // caller's current stream ourselves.
      py::object stream = dev[0].cast<int>() == dl::kCPU ? py::object(py::none()) : py::object(py::int_(-1));
      try {
        keep = obj.attr("__dlpack__")(py::arg("stream") = stream, py::arg("max_version") = py::make_tuple(1, 0));
      } catch (py::error_already_set& e) {
        if (!e.matches(PyExc_TypeError)) throw;  // a producer older than DLPack 1.0
        keep = obj.attr("__dlpack__")(py::arg("stream") = stream);
      }
    } catch (py::error_already_set& e) {
      throw TypeError(std::string(name) + ": cannot export through DLPack: " + e.what());
    }
    PyObject* cap = keep.ptr();
    // Borrow only: the capsule keeps its name, so its destructor runs the producer's deleter.
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
      auto* m = static_cast<dl::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
      if (m->version.major != 1) throw TypeError(std::string(name) + ": unsupported DLPack major version");
      v = view_of(m->dl_tensor, name, (m->flags & dl::kFlagReadOnly) != 0);
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
      v = view_of(static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"))->dl_tensor, name, false);
    } else {
      throw TypeError(std::string(name) + ": __dlpack__ did not return a DLPack capsule");
    }
  }
};

int threads_arg(int num_threads) { return num_threads < 1 ? 1 : num_threads; }

// ---------------------------------------------------------------------------------------------------------
// Device dispatch. CUDA kernels run on the tensor's device, on the stream the caller passes (the producer's
// current stream), and report errors as return codes that become RuntimeError here.
#ifdef DETRCORE_WITH_CUDA
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    if (cuda::get_device(&prev) != 0) prev = -1;
    if (prev != device) {
      int err = cuda::set_device(device);
      if (err) throw std::runtime_error(std::string("detrcore: cannot select CUDA device ") + std::to_string(device) +
                                        ": " + cuda::error_string(err));
    } else {
      prev = -1;
    }
  }
  ~DeviceGuard() {
    if (prev >= 0) cuda::set_device(prev);
  }
};
#endif

template <typename CpuFn, typename CudaFn>
void dispatch(const char* op, const View& ref, CpuFn&& cpu, CudaFn&& gpu) {
  if (ref.device == DeviceKind::cpu) {
    py::gil_scoped_release nogil;
    if (ref.dtype == DType::f32)
      cpu(float{});
    else
      cpu(double{});
    return;
  }
#ifdef DETRCORE_WITH_CUDA
  DeviceGuard guard(ref.device_id);
  int err = gpu();
  if (err) throw std::runtime_error(std::string("detrcore.") + op + ": CUDA error: " + cuda::error_string(err));
#else
  (void)gpu;
  throw ValueError(std::string("detrcore.") + op + ": " + ref.name +
                   " is a CUDA tensor but detrcore was built without CUDA kernels (see detrcore.ops.build_info())");
#endif
}

// Checks shared by every box entry point: device known, dtype allowed on that device, contiguity; the
// others must match the first in device and dtype; outputs must be writable.
void check_group(std::initializer_list<const View*> inputs, std::initializer_list<const View*> outputs) {
  const View& ref = **inputs.begin();
  check_device_supported(ref);
  check_float(ref, ref.device == DeviceKind::cuda);
  for (const View* v : inputs) {
    check_same_device(ref, *v);
    check_same_dtype(ref, *v);
    check_contiguous(*v);
  }
  for (const View* v : outputs) {
    check_same_device(ref, *v);
    check_same_dtype(ref, *v);
    check_contiguous(*v);
    check_writable(*v);
  }
}
void check_same_shape(const View& ref, const View& v) {
  bool same = ref.ndim == v.ndim;
  for (int i = 0; same && i < ref.ndim; ++i) same = ref.size(i) == v.size(i);
  if (!same) throw ValueError(arg(v) + " must have the shape of " + arg(ref) + " " + ref.shape_str() + ", got " +
                              v.shape_str());
}
void check_boxes(const View& v) {
  if (v.ndim < 1 || v.size(-1) != 4)
    throw ValueError(arg(v) + " must hold boxes in its last dimension (size 4), got shape " + v.shape_str());
}

// ---------------------------------------------------------------------------------------------------------
// Box ops. Shapes are normalised by the Python layer: boxes [n, 4] or [B, N, 4], pairwise outputs [B, N, M].
void box_map(py::handle in_, py::handle out_, int kind, int num_threads, uintptr_t stream) {
  Arg in(in_, "boxes"), out(out_, "out");
  check_group({&in.v}, {&out.v});
  check_boxes(in.v);
  check_same_shape(in.v, out.v);
  if (kind < 0 || kind > 3) throw ValueError("box_map: unknown kind " + std::to_string(kind));
  const int64_t n = in.v.numel() / 4;
  dispatch(
      "box_map", in.v,
      [&](auto t) {
        using T = decltype(t);
        box_map_cpu<T>(in.v.ptr<T>(), out.v.ptr<T>(), n, kind, threads_arg(num_threads));
      },
      [&] { return box_map_cuda(in.v.dtype, in.v.data, out.v.data, n, kind, reinterpret_cast<void*>(stream)); });
}

void check_pairwise(const View& a, const View& b) {
  check_ndim(a, 3, "boxes [B, N, 4]");
  check_ndim(b, 3, "boxes [B, M, 4]");
  check_boxes(a);
  check_boxes(b);
  if (a.size(0) != b.size(0))
    throw ValueError(arg(b) + ": batch size " + std::to_string(b.size(0)) + " does not match " + arg(a) + "'s " +
                     std::to_string(a.size(0)));
}

void box_pairwise(py::handle a_, py::handle b_, py::handle out_, bool giou, int num_threads, uintptr_t stream) {
  Arg a(a_, "boxes1"), b(b_, "boxes2"), out(out_, "out");
  check_group({&a.v, &b.v}, {&out.v});
  check_pairwise(a.v, b.v);
  const int64_t B = a.v.size(0), N = a.v.size(1), M = b.v.size(1);
  check_ndim(out.v, 3, "[B, N, M]");
  check_size(out.v, 0, B, "B");
  check_size(out.v, 1, N, "N");
  check_size(out.v, 2, M, "M");
  dispatch(
      giou ? "generalized_box_iou" : "box_iou", a.v,
      [&](auto t) {
        using T = decltype(t);
        box_pairwise_cpu<T>(a.v.ptr<T>(), b.v.ptr<T>(), out.v.ptr<T>(), B, N, M, giou, threads_arg(num_threads));
      },
      [&] {
        return box_pairwise_cuda(a.v.dtype, a.v.data, b.v.data, out.v.data, B, N, M, giou,
                                 reinterpret_cast<void*>(stream));
      });
}

void box_pairwise_backward(py::handle grad_, py::handle a_, py::handle b_, py::handle ga_, py::handle gb_, bool giou,
                           int num_threads, uintptr_t stream) {
  Arg grad(grad_, "grad"), a(a_, "boxes1"), b(b_, "boxes2"), ga(ga_, "grad_boxes1"), gb(gb_, "grad_boxes2");
  check_group({&grad.v, &a.v, &b.v}, {&ga.v, &gb.v});
  check_pairwise(a.v, b.v);
  const int64_t B = a.v.size(0), N = a.v.size(1), M = b.v.size(1);
  check_ndim(grad.v, 3, "[B, N, M]");
  check_size(grad.v, 0, B, "B");
  check_size(grad.v, 1, N, "N");
  check_size(grad.v, 2, M, "M");
  check_same_shape(a.v, ga.v);
  check_same_shape(b.v, gb.v);
  dispatch(
      "box_pairwise_backward", a.v,
      [&](auto t) {
        using T = decltype(t);
        box_pairwise_bwd_cpu<T>(grad.v.ptr<T>(), a.v.ptr<T>(), b.v.ptr<T>(), ga.v.ptr<T>(), gb.v.ptr<T>(), B, N, M,
                                giou, threads_arg(num_threads));
      },
      [&] {
        return box_pairwise_bwd_cuda(a.v.dtype, grad.v.data, a.v.data, b.v.data, ga.v.data, gb.v.data, B, N, M, giou,
                                     reinterpret_cast<void*>(stream));
      });
}

void check_paired(const View& a, const View& b) {
  check_ndim(a, 2, "boxes [N, 4]");
  check_boxes(a);
  check_same_shape(a, b);
}

void giou_loss(py::handle a_, py::handle b_, py::handle out_, int num_threads, uintptr_t stream) {
  Arg a(a_, "boxes1"), b(b_, "boxes2"), out(out_, "out");
  check_group({&a.v, &b.v}, {&out.v});
  check_paired(a.v, b.v);
  const int64_t n = a.v.size(0);
  check_ndim(out.v, 1, "[N]");
  check_size(out.v, 0, n, "N");
  dispatch(
      "generalized_box_iou_loss", a.v,
      [&](auto t) {
        using T = decltype(t);
        giou_loss_cpu<T>(a.v.ptr<T>(), b.v.ptr<T>(), out.v.ptr<T>(), n, threads_arg(num_threads));
      },
      [&] { return giou_loss_cuda(a.v.dtype, a.v.data, b.v.data, out.v.data, n, reinterpret_cast<void*>(stream)); });
}

void giou_loss_backward(py::handle grad_, py::handle a_, py::handle b_, py::handle ga_, py::handle gb_,
                        int num_threads, uintptr_t stream) {
  Arg grad(grad_, "grad"), a(a_, "boxes1"), b(b_, "boxes2"), ga(ga_, "grad_boxes1"), gb(gb_, "grad_boxes2");
  check_group({&grad.v, &a.v, &b.v}, {&ga.v, &gb.v});
  check_paired(a.v, b.v);
  const int64_t n = a.v.size(0);
  check_ndim(grad.v, 1, "[N]");
  check_size(grad.v, 0, n, "N");
  check_same_shape(a.v, ga.v);
  check_same_shape(a.v, gb.v);
  dispatch(
      "generalized_box_iou_loss_backward", a.v,
      [&](auto t) {
        using T = decltype(t);
        giou_loss_bwd_cpu<T>(grad.v.ptr<T>(), a.v.ptr<T>(), b.v.ptr<T>(), ga.v.ptr<T>(), gb.v.ptr<T>(), n,
                             threads_arg(num_threads));
      },
      [&] {
        return giou_loss_bwd_cuda(a.v.dtype, grad.v.data, a.v.data, b.v.data, ga.v.data, gb.v.data, n,
                                  reinterpret_cast<void*>(stream));
      });
}

void check_eps(double eps) {
  if (!(eps > 0.0 && eps < 0.5)) throw ValueError("eps must be in (0, 0.5), got " + std::to_string(eps));
}

void inverse_sigmoid(py::handle x_, py::handle out_, double eps, int num_threads, uintptr_t stream) {
  Arg x(x_, "x"), out(out_, "out");
  check_group({&x.v}, {&out.v});
  check_same_shape(x.v, out.v);
  check_eps(eps);
  const int64_t n = x.v.numel();
  dispatch(
      "inverse_sigmoid", x.v,
      [&](auto t) {
        using T = decltype(t);
        inverse_sigmoid_cpu<T>(x.v.ptr<T>(), out.v.ptr<T>(), n, eps, threads_arg(num_threads));
      },
      [&] { return inverse_sigmoid_cuda(x.v.dtype, x.v.data, out.v.data, n, eps, reinterpret_cast<void*>(stream)); });
}

void inverse_sigmoid_backward(py::handle grad_, py::handle x_, py::handle gx_, double eps, int num_threads,
                              uintptr_t stream) {
  Arg grad(grad_, "grad"), x(x_, "x"), gx(gx_, "grad_x");
  check_group({&grad.v, &x.v}, {&gx.v});
  check_same_shape(x.v, grad.v);
  check_same_shape(x.v, gx.v);
  check_eps(eps);
  const int64_t n = x.v.numel();
  dispatch(
      "inverse_sigmoid_backward", x.v,
      [&](auto t) {
        using T = decltype(t);
        inverse_sigmoid_bwd_cpu<T>(grad.v.ptr<T>(), x.v.ptr<T>(), gx.v.ptr<T>(), n, eps, threads_arg(num_threads));
      },
      [&] {
        return inverse_sigmoid_bwd_cuda(x.v.dtype, grad.v.data, x.v.data, gx.v.data, n, eps,
                                        reinterpret_cast<void*>(stream));
      });
}

// ---------------------------------------------------------------------------------------------------------
// Dropout (CPU only: on CUDA, torch's own fused dropout is used by the Python layer). float32, float64 and
// bfloat16 (what CPU autocast produces). The output may be the first input itself (in place), nothing else of it.
struct DropoutParams {
  uint32_t threshold;
  double scale;
};
// Bytes per element of a floating dtype (float64, float32, or a 16-bit one).
size_t float_elem_bytes(DType t) { return t == DType::f64 ? 8 : t == DType::f32 ? 4 : 2; }

DropoutParams dropout_params(std::initializer_list<const View*> inputs, std::initializer_list<const View*> outputs,
                             double p) {
  const View& ref = **inputs.begin();
  if (ref.device != DeviceKind::cpu)
    throw ValueError("detrcore dropout: " + arg(ref) + " must be a CPU tensor (CUDA tensors use torch's dropout)");
  if (ref.dtype != DType::f32 && ref.dtype != DType::f64 && ref.dtype != DType::bf16)
    throw TypeError(arg(ref) + " must be float32, float64 or bfloat16, got " + dtype_name(ref.dtype));
  for (const View* v : inputs) {
    check_same_device(ref, *v);
    check_same_dtype(ref, *v);
    check_contiguous(*v);
    check_same_shape(ref, *v);
  }
  for (const View* v : outputs) {
    check_same_device(ref, *v);
    check_same_dtype(ref, *v);
    check_contiguous(*v);
    check_writable(*v);
    check_same_shape(ref, *v);
    const size_t bytes = float_elem_bytes(ref.dtype);
    for (const View* in : inputs) check_no_overlap(*in, *v, bytes, in == *inputs.begin());  // the first: in place
  }
  if (!(p >= 0.0 && p < 1.0)) throw ValueError("dropout: p must be in [0, 1), got " + std::to_string(p));
  const double t = p * 4294967296.0;  // drop when the 32-bit draw < t
  return {t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t + 0.5), 1.0 / (1.0 - p)};
}

template <typename Fn>
void dropout_dispatch(const View& ref, Fn&& fn) {
  py::gil_scoped_release nogil;
  if (ref.dtype == DType::f32) {
    fn(float{});
  } else if (ref.dtype == DType::f64) {
    fn(double{});
  } else {
    fn(BFloat16{});
  }
}

void dropout(py::handle x_, py::handle y_, int64_t seed, double p, bool relu, int num_threads) {
  Arg x(x_, "input"), y(y_, "out");
  const DropoutParams d = dropout_params({&x.v}, {&y.v}, p);
  dropout_dispatch(x.v, [&](auto t) {
    using T = decltype(t);
    dropout_cpu<T>(x.v.ptr<T>(), y.v.ptr<T>(), x.v.numel(), static_cast<uint64_t>(seed), d.threshold, d.scale, relu,
                   threads_arg(num_threads));
  });
}

void dropout_backward(py::handle grad_, py::handle gx_, int64_t seed, double p, int num_threads) {
  Arg grad(grad_, "grad"), gx(gx_, "grad_input");
  const DropoutParams d = dropout_params({&grad.v}, {&gx.v}, p);
  dropout_dispatch(grad.v, [&](auto t) {
    using T = decltype(t);
    dropout_bwd_cpu<T>(grad.v.ptr<T>(), gx.v.ptr<T>(), grad.v.numel(), static_cast<uint64_t>(seed), d.threshold,
                       d.scale, threads_arg(num_threads));
  });
}

void dropout_add(py::handle a_, py::handle x_, py::handle out_, int64_t seed, double p, int num_threads) {
  Arg a(a_, "input"), x(x_, "residual"), out(out_, "out");
  const DropoutParams d = dropout_params({&a.v, &x.v}, {&out.v}, p);
  check_no_overlap(a.v, out.v, float_elem_bytes(a.v.dtype), false);  // not in place
  dropout_dispatch(a.v, [&](auto t) {
    using T = decltype(t);
    dropout_add_cpu<T>(a.v.ptr<T>(), x.v.ptr<T>(), out.v.ptr<T>(), a.v.numel(), static_cast<uint64_t>(seed),
                       d.threshold, d.scale, threads_arg(num_threads));
  });
}

void relu_dropout_backward(py::handle grad_, py::handle y_, py::handle gx_, double p, int num_threads,
                           py::handle colsum_) {
  Arg grad(grad_, "grad"), y(y_, "output"), gx(gx_, "grad_input");
  const DropoutParams d = dropout_params({&grad.v, &y.v}, {&gx.v}, p);
  if (!colsum_.is_none()) {  // [cols]: grad_input's column sums over its rows, in the same pass
    Arg colsum(colsum_, "column_sums");
    check_same_device(grad.v, colsum.v);
    check_same_dtype(grad.v, colsum.v);
    check_contiguous(colsum.v);
    check_writable(colsum.v);
    check_ndim(colsum.v, 1, "[cols]");
    const int64_t cols = colsum.v.size(0), n = grad.v.numel();
    if (cols == 0 || n % cols || grad.v.size(grad.v.ndim - 1) != cols)
      throw ValueError("column_sums must have grad's last dimension (" +
                       std::to_string(grad.v.ndim ? grad.v.size(grad.v.ndim - 1) : 0) + "), got " +
                       colsum.v.shape_str());
    for (const View* v : {&grad.v, &y.v, &gx.v}) check_no_overlap(*v, colsum.v, float_elem_bytes(v->dtype), false);
    dropout_dispatch(grad.v, [&](auto t) {
      using T = decltype(t);
      relu_dropout_bwd_colsum_cpu<T>(grad.v.ptr<T>(), y.v.ptr<T>(), gx.v.ptr<T>(), n / cols, cols, d.scale,
                                     colsum.v.ptr<T>(), threads_arg(num_threads));
    });
    return;
  }
  dropout_dispatch(grad.v, [&](auto t) {
    using T = decltype(t);
    relu_dropout_bwd_cpu<T>(grad.v.ptr<T>(), y.v.ptr<T>(), gx.v.ptr<T>(), grad.v.numel(), d.scale,
                            threads_arg(num_threads));
  });
}

// ---------------------------------------------------------------------------------------------------------
// Frozen batch norm (+ residual, + ReLU) over [N, C, ...] (CPU): float32 / float64 / bfloat16 tensors, scale and
// shift [C] in float32 (float64 for float64 tensors).
struct PlaneShape {
  int64_t N, C, HW;
};
PlaneShape frozen_bn_check(const View& ref, std::initializer_list<const View*> same,
                           std::initializer_list<const View*> outputs, std::initializer_list<const View*> per_channel) {
  if (ref.device != DeviceKind::cpu) throw ValueError("detrcore frozen_bn: " + arg(ref) + " must be a CPU tensor");
  if (ref.dtype != DType::f32 && ref.dtype != DType::f64 && ref.dtype != DType::bf16)
    throw TypeError(arg(ref) + " must be float32, float64 or bfloat16, got " + dtype_name(ref.dtype));
  if (ref.ndim < 2) throw ValueError(arg(ref) + " must be [N, C, ...], got shape " + ref.shape_str());
  check_contiguous(ref);
  for (const View* v : same) {
    check_same_device(ref, *v);
    check_same_dtype(ref, *v);
    check_contiguous(*v);
    check_same_shape(ref, *v);
  }
  for (const View* v : outputs) check_writable(*v);
  const DType param = ref.dtype == DType::f64 ? DType::f64 : DType::f32;
  for (const View* v : per_channel) {
    check_same_device(ref, *v);
    check_contiguous(*v);
    if (v->dtype != param)
      throw TypeError(arg(*v) + " must be " + dtype_name(param) + " for " + dtype_name(ref.dtype) + " tensors, got " +
                      dtype_name(v->dtype));
    if (v->ndim != 1 || v->size(0) != ref.size(1))
      throw ValueError(arg(*v) + " must be [" + std::to_string(ref.size(1)) + "], got shape " + v->shape_str());
  }
  const int64_t N = ref.size(0), C = ref.size(1);
  return {N, C, N * C == 0 ? 0 : ref.numel() / (N * C)};
}

template <typename Fn>
void float_dispatch(DType t, Fn&& fn) {
  py::gil_scoped_release nogil;
  if (t == DType::f32) {
    fn(float{});
  } else if (t == DType::f64) {
    fn(double{});
  } else {
    fn(BFloat16{});
  }
}

void frozen_bn(py::handle x_, py::handle r_, py::handle scale_, py::handle shift_, py::handle y_, bool relu,
               int num_threads) {
  Arg x(x_, "input"), scale(scale_, "scale"), shift(shift_, "shift"), y(y_, "out");
  std::optional<Arg> r;
  if (!r_.is_none()) r.emplace(r_, "residual");
  const PlaneShape sh = r ? frozen_bn_check(x.v, {&y.v, &r->v}, {&y.v}, {&scale.v, &shift.v})
                          : frozen_bn_check(x.v, {&y.v}, {&y.v}, {&scale.v, &shift.v});
  float_dispatch(x.v.dtype, [&](auto t) {
    using T = decltype(t);
    using S = typename Elem<T>::C;
    frozen_bn_cpu<T>(x.v.ptr<T>(), r ? r->v.ptr<T>() : nullptr, scale.v.ptr<S>(), shift.v.ptr<S>(), y.v.ptr<T>(),
                     sh.N, sh.C, sh.HW, relu, threads_arg(num_threads));
  });
}

void frozen_bn_backward(py::handle grad_, py::handle y_, py::handle scale_, py::handle gx_, py::handle gr_, bool relu,
                        int num_threads) {
  Arg grad(grad_, "grad"), scale(scale_, "scale"), gx(gx_, "grad_input");
  std::optional<Arg> y, gr;
  if (relu) y.emplace(y_, "output");
  if (!gr_.is_none()) gr.emplace(gr_, "grad_residual");
  std::vector<const View*> same{&gx.v}, outs{&gx.v};
  if (y) same.push_back(&y->v);
  if (gr) same.push_back(&gr->v), outs.push_back(&gr->v);
  PlaneShape sh = frozen_bn_check(grad.v, {}, {}, {&scale.v});
  for (const View* v : same) frozen_bn_check(grad.v, {v}, {}, {});
  for (const View* v : outs) check_writable(*v);
  float_dispatch(grad.v.dtype, [&](auto t) {
    using T = decltype(t);
    using S = typename Elem<T>::C;
    frozen_bn_bwd_cpu<T>(grad.v.ptr<T>(), y ? y->v.ptr<T>() : nullptr, scale.v.ptr<S>(), gx.v.ptr<T>(),
                         gr ? gr->v.ptr<T>() : nullptr, sh.N, sh.C, sh.HW, relu, threads_arg(num_threads));
  });
}

// ---------------------------------------------------------------------------------------------------------
// Multi-scale deformable attention.
struct MsdaArgs {
  Arg value, shapes, starts, loc, attn;
  MsdaShape s{};
  MsdaArgs(py::handle value_, py::handle shapes_, py::handle starts_, py::handle loc_, py::handle attn_)
      : value(value_, "value"),
        shapes(shapes_, "spatial_shapes"),
        starts(starts_, "level_start_index"),
        loc(loc_, "sampling_locations"),
        attn(attn_, "attention_weights") {
    const View &v = value.v, &ss = shapes.v, &ls = starts.v, &sl = loc.v, &aw = attn.v;
    check_device_supported(v);
    check_float(v, v.device == DeviceKind::cuda);
    for (const View* t : {&ss, &ls, &sl, &aw}) check_same_device(v, *t);
    check_same_dtype(v, sl);
    check_same_dtype(v, aw);
    for (const View* t : {&ss, &ls}) {
      if (t->dtype != DType::i64) throw TypeError(arg(*t) + " must be int64, got " + dtype_name(t->dtype));
    }
    for (const View* t : {&v, &ss, &ls, &sl, &aw}) check_contiguous(*t);
    check_ndim(v, 4, "[B, S, H, D]");
    check_ndim(ss, 2, "[L, 2]");
    check_ndim(ls, 1, "[L]");
    check_ndim(sl, 6, "[B, Q, H, L, P, 2]");
    check_ndim(aw, 5, "[B, Q, H, L, P]");
    s.B = v.size(0), s.S = v.size(1), s.H = v.size(2), s.D = v.size(3);
    s.L = ss.size(0), s.Q = sl.size(1), s.P = sl.size(4);
    check_size(ss, 1, 2, "(height, width) pairs");
    check_size(ls, 0, s.L, "L (levels in spatial_shapes)");
    check_size(sl, 0, s.B, "B (batch of value)");
    check_size(sl, 2, s.H, "H (heads of value)");
    check_size(sl, 3, s.L, "L (levels in spatial_shapes)");
    check_size(sl, 5, 2, "2 (x, y)");
    check_size(aw, 0, s.B, "B");
    check_size(aw, 1, s.Q, "Q (queries of sampling_locations)");
    check_size(aw, 2, s.H, "H");
    check_size(aw, 3, s.L, "L");
    check_size(aw, 4, s.P, "P (points of sampling_locations)");
    if (v.device == DeviceKind::cpu) check_levels();
  }
  // The level metadata against S; only where it can be read without a device->host copy.
  void check_levels() const {
    const int64_t* hw = shapes.v.ptr<int64_t>();
    const int64_t* st = starts.v.ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < s.L; ++l) {
      if (hw[2 * l] < 0 || hw[2 * l + 1] < 0)
        throw ValueError("spatial_shapes: level " + std::to_string(l) + " has a negative size");
      if (st[l] != total)
        throw ValueError("level_start_index[" + std::to_string(l) + "] = " + std::to_string(st[l]) +
                         " but the levels before it hold " + std::to_string(total) + " positions");
      total += hw[2 * l] * hw[2 * l + 1];
    }
    if (total != s.S)
      throw ValueError("value has S = " + std::to_string(s.S) + " positions but spatial_shapes sums to " +
                       std::to_string(total));
  }
  const int64_t* hw() const { return shapes.v.ptr<int64_t>(); }
  const int64_t* st() const { return starts.v.ptr<int64_t>(); }
};

// The optional coord_shapes of the CPU kernels (ms_deform_attn.h): None, or a CPU int64 [L, 2] whose sizes are at
// least spatial_shapes' (the stored maps are their top-left corners). Returns its data, or nullptr for None.
const int64_t* msda_coord_shapes(const MsdaArgs& a, py::handle coord_, std::optional<Arg>& holder) {
  if (coord_.is_none()) return nullptr;
  holder.emplace(coord_, "coord_shapes");
  const View& c = holder->v;
  if (a.value.v.device != DeviceKind::cpu) throw ValueError("coord_shapes is supported by the CPU kernels only");
  check_same_device(a.value.v, c);
  if (c.dtype != DType::i64) throw TypeError(arg(c) + " must be int64, got " + dtype_name(c.dtype));
  check_contiguous(c);
  check_ndim(c, 2, "[L, 2]");
  check_size(c, 0, a.s.L, "L (levels in spatial_shapes)");
  check_size(c, 1, 2, "(height, width) pairs");
  const int64_t *cs = c.ptr<int64_t>(), *hw = a.hw();
  for (int64_t i = 0; i < 2 * a.s.L; ++i)
    if (cs[i] < hw[i])
      throw ValueError("coord_shapes: level " + std::to_string(i / 2) + " (" + std::to_string(cs[i & ~int64_t(1)]) +
                       ", " + std::to_string(cs[i | 1]) + ") is smaller than its stored map (" +
                       std::to_string(hw[i & ~int64_t(1)]) + ", " + std::to_string(hw[i | 1]) + ")");
  return cs;
}

// out on ref's device, in its dtype, contiguous, of this shape.
void check_like(const View& ref, const View& out, std::initializer_list<int64_t> shape) {
  check_same_device(ref, out);
  check_same_dtype(ref, out);
  check_contiguous(out);
  bool ok = out.ndim == static_cast<int>(shape.size());
  int i = 0;
  for (int64_t n : shape) ok = ok && out.size(i++) == n;
  if (!ok) {
    std::string want = "[";
    i = 0;
    for (int64_t n : shape) want += (i++ ? ", " : "") + std::to_string(n);
    throw ValueError(arg(out) + " must have shape " + want + "], got " + out.shape_str());
  }
}

void check_out(const View& ref, const View& out, std::initializer_list<int64_t> shape) {
  check_like(ref, out, shape);
  check_writable(out);
}

// ---------------------------------------------------------------------------------------------------------
// Winograd F(2x2, 3x3) and F(4x4, 3x3) transforms (CPU, float32 / float64, contiguous): detrcore.nn.Conv2d's 3x3
// stride-1 convolutions. tile: the output tile's side, 2 or 4; P = (tile + 2)^2 positions. Shapes: weight
// [K, C, 3, 3], U [P, K, C]; image [N, C, H, W], V [P, C, T]; M [P, K, T], output [N, K, H, W];
// T = N * ceil(H / tile) * ceil(W / tile).
void winograd_check(const View& ref, int ndim) {
  if (ref.device != DeviceKind::cpu) throw ValueError("detrcore winograd: " + arg(ref) + " must be a CPU tensor");
  if (ref.dtype != DType::f32 && ref.dtype != DType::f64)
    throw TypeError(arg(ref) + " must be float32 or float64, got " + dtype_name(ref.dtype));
  if (ref.ndim != ndim)
    throw ValueError(arg(ref) + " must have " + std::to_string(ndim) + " dimensions, got shape " + ref.shape_str());
  check_contiguous(ref);
}

int64_t winograd_points_arg(int tile) {
  if (tile != 2 && tile != 4) throw ValueError("tile must be 2 or 4 (F(2x2, 3x3) or F(4x4, 3x3)), got " +
                                               std::to_string(tile));
  return winograd_points(tile);
}

template <typename Fn>
void f32_f64_dispatch(DType t, Fn&& fn) {
  py::gil_scoped_release nogil;
  if (t == DType::f32) {
    fn(float{});
  } else {
    fn(double{});
  }
}

void winograd_weight(py::handle w_, py::handle out_, int num_threads, int tile) {
  const int64_t P = winograd_points_arg(tile);
  Arg w(w_, "weight"), out(out_, "out");
  winograd_check(w.v, 4);
  if (w.v.size(2) != 3 || w.v.size(3) != 3)
    throw ValueError("weight must be [K, C, 3, 3], got shape " + w.v.shape_str());
  const int64_t K = w.v.size(0), C = w.v.size(1);
  check_out(w.v, out.v, {P, K, C});
  f32_f64_dispatch(w.v.dtype, [&](auto t) {
    using T = decltype(t);
    winograd_weight_cpu<T>(w.v.ptr<T>(), out.v.ptr<T>(), K * C, threads_arg(num_threads), tile);
  });
}

void winograd_weight_adjoint(py::handle g_, py::handle out_, int num_threads, int tile) {
  const int64_t P = winograd_points_arg(tile);
  Arg g(g_, "grad"), out(out_, "grad_weight");
  winograd_check(g.v, 3);
  if (g.v.size(0) != P)
    throw ValueError("grad must be [" + std::to_string(P) + ", K, C], got shape " + g.v.shape_str());
  const int64_t K = g.v.size(1), C = g.v.size(2);
  check_out(g.v, out.v, {K, C, 3, 3});
  f32_f64_dispatch(g.v.dtype, [&](auto t) {
    using T = decltype(t);
    winograd_weight_adjoint_cpu<T>(g.v.ptr<T>(), out.v.ptr<T>(), K * C, threads_arg(num_threads), tile);
  });
}

// [N, C, H, W] image -> [P, C, T] tile values (input transform, output adjoint).
template <typename Kernel>
void winograd_to_tiles(py::handle x_, py::handle out_, const char* x_name, const char* out_name, int num_threads,
                       int tile, Kernel kernel) {
  const int64_t P = winograd_points_arg(tile);
  Arg x(x_, x_name), out(out_, out_name);
  winograd_check(x.v, 4);
  const int64_t N = x.v.size(0), C = x.v.size(1), H = x.v.size(2), W = x.v.size(3);
  check_out(x.v, out.v, {P, C, winograd_tiles(N, H, W, tile)});
  f32_f64_dispatch(x.v.dtype, [&](auto t) {
    using T = decltype(t);
    kernel(x.v.ptr<T>(), out.v.ptr<T>(), N, C, H, W, threads_arg(num_threads), tile);
  });
}

// [P, C, T] tile values -> [N, C, H, W] image of out's size (input adjoint, output transform; the output's bias
// [C] and residual [N, C, H, W], None for the adjoint).
template <typename Kernel>
void winograd_from_tiles(py::handle m_, py::handle bias_, py::handle residual_, py::handle out_, const char* m_name,
                         const char* out_name, int num_threads, int tile, Kernel kernel) {
  const int64_t P = winograd_points_arg(tile);
  Arg m(m_, m_name), out(out_, out_name);
  std::optional<Arg> bias, residual;
  if (!bias_.is_none()) bias.emplace(bias_, "bias");
  if (!residual_.is_none()) residual.emplace(residual_, "residual");
  winograd_check(m.v, 3);
  winograd_check(out.v, 4);
  const int64_t N = out.v.size(0), C = out.v.size(1), H = out.v.size(2), W = out.v.size(3);
  check_like(out.v, m.v, {P, C, winograd_tiles(N, H, W, tile)});
  check_writable(out.v);
  if (bias) check_like(out.v, bias->v, {C});
  if (residual) {
    winograd_check(residual->v, 4);
    check_like(out.v, residual->v, {N, C, H, W});
    check_no_overlap(residual->v, out.v, float_elem_bytes(residual->v.dtype), false);  // out is written first
  }
  f32_f64_dispatch(m.v.dtype, [&](auto t) {
    using T = decltype(t);
    kernel(m.v.ptr<T>(), bias ? bias->v.ptr<T>() : nullptr, out.v.ptr<T>(), N, C, H, W, threads_arg(num_threads),
           tile, residual ? residual->v.ptr<T>() : nullptr);
  });
}

void winograd_input(py::handle x, py::handle out, int num_threads, int tile) {
  winograd_to_tiles(x, out, "input", "out", num_threads, tile, [](auto... a) { winograd_input_cpu(a...); });
}

void winograd_output_adjoint(py::handle g, py::handle out, int num_threads, int tile) {
  winograd_to_tiles(g, out, "grad", "grad_m", num_threads, tile,
                    [](auto... a) { winograd_output_adjoint_cpu(a...); });
}

void winograd_output(py::handle m, py::handle bias, py::handle out, int num_threads, int tile, py::handle residual,
                     bool relu) {
  winograd_from_tiles(m, bias, residual, out, "m", "out", num_threads, tile,
                      [relu](auto... a) { winograd_output_cpu(a..., relu); });
}

void winograd_input_adjoint(py::handle g, py::handle out, int num_threads, int tile) {
  winograd_from_tiles(g, py::none(), py::none(), out, "grad", "grad_input", num_threads, tile,
                      [](auto g, auto, auto gx, auto N, auto C, auto H, auto W, auto nt, auto tl, auto) {
                        winograd_input_adjoint_cpu(g, gx, N, C, H, W, nt, tl);
                      });
}

void ms_deform_attn_forward(py::handle value, py::handle shapes, py::handle starts, py::handle loc, py::handle attn,
                            py::handle out_, int num_threads, uintptr_t stream, py::handle coord_shapes) {
  MsdaArgs a(value, shapes, starts, loc, attn);
  std::optional<Arg> coord_holder;
  const int64_t* coord = msda_coord_shapes(a, coord_shapes, coord_holder);
  Arg out(out_, "out");
  const MsdaShape& s = a.s;
  check_out(a.value.v, out.v, {s.B, s.Q, s.H * s.D});
  dispatch(
      "ms_deform_attn", a.value.v,
      [&](auto t) {
        using T = decltype(t);
        ms_deform_attn_fwd_cpu<T>(a.value.v.ptr<T>(), a.hw(), a.st(), a.loc.v.ptr<T>(), a.attn.v.ptr<T>(),
                                  out.v.ptr<T>(), s, threads_arg(num_threads), coord);
      },
      [&] {
        return ms_deform_attn_fwd_cuda(a.value.v.dtype, a.value.v.data, a.hw(), a.st(), a.loc.v.data,
                                       a.attn.v.data, out.v.data, s, reinterpret_cast<void*>(stream));
      });
}

int64_t ms_deform_attn_workspace_bytes(py::handle value, py::handle shapes, py::handle starts, py::handle loc,
                                       py::handle attn, bool deterministic) {
  MsdaArgs a(value, shapes, starts, loc, attn);
#ifdef DETRCORE_WITH_CUDA
  if (a.value.v.device == DeviceKind::cuda)
    return ms_deform_attn_bwd_cuda_workspace_bytes(a.value.v.dtype, a.s, deterministic);
#else
  (void)deterministic;
#endif
  return 0;
}

// grad_value: value's dtype on the CPU; on CUDA a float32 accumulation buffer (float64 for float64 value).
void ms_deform_attn_backward(py::handle value, py::handle shapes, py::handle starts, py::handle loc,
                             py::handle attn, py::handle grad_out_, py::handle grad_value_, py::handle grad_loc_,
                             py::handle grad_attn_, bool deterministic, py::handle workspace_, int num_threads,
                             uintptr_t stream, py::handle coord_shapes) {
  MsdaArgs a(value, shapes, starts, loc, attn);
  std::optional<Arg> coord_holder;
  const int64_t* coord = msda_coord_shapes(a, coord_shapes, coord_holder);
  Arg grad_out(grad_out_, "grad_output"), gv(grad_value_, "grad_value"), gl(grad_loc_, "grad_sampling_locations"),
      ga(grad_attn_, "grad_attention_weights");
  const MsdaShape& s = a.s;
  const View& v = a.value.v;
  check_same_device(v, grad_out.v);
  check_same_dtype(v, grad_out.v);
  check_contiguous(grad_out.v);
  check_ndim(grad_out.v, 3, "[B, Q, H * D]");
  check_size(grad_out.v, 0, s.B, "B");
  check_size(grad_out.v, 1, s.Q, "Q");
  check_size(grad_out.v, 2, s.H * s.D, "H * D");
  check_out(v, gl.v, {s.B, s.Q, s.H, s.L, s.P, 2});
  check_out(v, ga.v, {s.B, s.Q, s.H, s.L, s.P});
  if (v.device == DeviceKind::cpu) {
    check_out(v, gv.v, {s.B, s.S, s.H, s.D});
  } else {
    check_same_device(v, gv.v);
    const DType acc = v.dtype == DType::f64 ? DType::f64 : DType::f32;
    if (gv.v.dtype != acc) throw TypeError(arg(gv.v) + " must be " + dtype_name(acc) + " (the accumulation type)");
    check_contiguous(gv.v);
    check_writable(gv.v);
    if (gv.v.numel() != s.B * s.S * s.H * s.D) throw ValueError(arg(gv.v) + " must have value's shape");
  }
  dispatch(
      "ms_deform_attn_backward", v,
      [&](auto t) {
        using T = decltype(t);
        ms_deform_attn_bwd_cpu<T>(v.ptr<T>(), a.hw(), a.st(), a.loc.v.ptr<T>(), a.attn.v.ptr<T>(),
                                  grad_out.v.ptr<T>(), gv.v.ptr<T>(), gl.v.ptr<T>(), ga.v.ptr<T>(), s,
                                  threads_arg(num_threads), coord);
      },
      [&]() -> int {
#ifdef DETRCORE_WITH_CUDA
        void* ws = nullptr;
        const int64_t need = ms_deform_attn_bwd_cuda_workspace_bytes(v.dtype, s, deterministic);
        if (need > 0) {
          Arg w(workspace_, "workspace");
          check_same_device(v, w.v);
          check_contiguous(w.v);
          check_writable(w.v);
          if (w.v.dtype != DType::u8) throw TypeError("workspace must be a uint8 tensor");
          const int64_t bytes = w.v.numel();
          if (bytes < need)
            throw ValueError("workspace holds " + std::to_string(bytes) + " bytes, the backward needs " +
                             std::to_string(need));
          ws = w.v.data;
        }
        return ms_deform_attn_bwd_cuda(v.dtype, v.data, a.hw(), a.st(), a.loc.v.data, a.attn.v.data,
                                       grad_out.v.data, gv.v.data, gl.v.data, ga.v.data, s, deterministic, ws,
                                       reinterpret_cast<void*>(stream));
#else
        (void)workspace_;
        (void)deterministic;
        return 0;
#endif
      });
}

// ---------------------------------------------------------------------------------------------------------
// Multi-head attention with dropout on its weights (CPU; float32 / float64). q [B, Lq, E], k and v [B, Lk, E]
// (E = heads * D) with any batch and row strides and contiguous channels (slices of one projection's output pass as
// they are); key_padding_mask [B, Lk] uint8 (nonzero = padded) or None; attn [B, H, Lq, Lk] and the other outputs
// contiguous.
struct AttnCall {
  Arg q, k, v;
  std::optional<Arg> kpm;
  int64_t B = 0, Lq = 0, Lk = 0, E = 0, H = 0;

  AttnCall(py::handle q_, py::handle k_, py::handle v_, py::handle kpm_, int64_t heads)
      : q(q_, "query"), k(k_, "key"), v(v_, "value") {
    for (const View* t : {&q.v, &k.v, &v.v}) {
      if (t->device != DeviceKind::cpu) throw ValueError("attention: " + arg(*t) + " must be a CPU tensor");
      check_ndim(*t, 3, "[B, L, heads * D]");
    }
    check_float(q.v, false);
    check_same_dtype(q.v, k.v);
    check_same_dtype(q.v, v.v);
    B = q.v.size(0), Lq = q.v.size(1), E = q.v.size(2), Lk = k.v.size(1), H = heads;
    check_size(k.v, 0, B, "B");
    check_size(v.v, 0, B, "B");
    check_size(k.v, 2, E, "E");
    check_size(v.v, 2, E, "E");
    check_size(v.v, 1, Lk, "Lk (key length)");
    if (H < 1 || E % H != 0 || H > std::max<int64_t>(E, 1))
      throw ValueError("attention: num_heads = " + std::to_string(H) + " must be a positive divisor of the " +
                       "embedding size E = " + std::to_string(E) + " (E > 0 unless num_heads = 1)");
    for (const View* t : {&q.v, &k.v, &v.v})
      if (E > 1 && t->size(1) > 0 && t->stride(2) != 1)
        throw ValueError(arg(*t) + " must have contiguous channels (stride 1 in its last dimension)");
    if (!kpm_.is_none()) {
      kpm.emplace(kpm_, "key_padding_mask");
      if (kpm->v.device != DeviceKind::cpu || kpm->v.dtype != DType::u8)
        throw TypeError("key_padding_mask must be a uint8 CPU tensor (a bool mask viewed as uint8)");
      check_ndim(kpm->v, 2, "[B, Lk]");
      check_size(kpm->v, 0, B, "B");
      check_size(kpm->v, 1, Lk, "Lk");
      check_contiguous(kpm->v);
    }
  }

  template <typename T>
  AttnArgs<T> args(double scale, int64_t seed, double p) const {
    if (!(p >= 0.0 && p < 1.0)) throw ValueError("attention: dropout p must be in [0, 1), got " + std::to_string(p));
    const double t = p * 4294967296.0;  // drop when the 32-bit draw < t (as dropout)
    AttnArgs<T> a{};
    a.q = q.v.ptr<T>(), a.q_bs = q.v.stride(0), a.q_rs = q.v.stride(1);
    a.k = k.v.ptr<T>(), a.k_bs = k.v.stride(0), a.k_rs = k.v.stride(1);
    a.v = v.v.ptr<T>(), a.v_bs = v.v.stride(0), a.v_rs = v.v.stride(1);
    a.key_padding_mask = kpm ? kpm->v.ptr<uint8_t>() : nullptr;
    a.B = B, a.H = H, a.Lq = Lq, a.Lk = Lk, a.D = E / H;
    a.scale = scale, a.seed = static_cast<uint64_t>(seed);
    a.threshold = p == 0.0 ? 0u : (t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t + 0.5));
    a.keep_scale = 1.0 / (1.0 - p);
    return a;
  }
};

void attention_forward(py::handle q, py::handle k, py::handle v, py::handle kpm, int64_t heads, double scale,
                       int64_t seed, double p, py::handle out_, py::handle attn_, int num_threads) {
  AttnCall c(q, k, v, kpm, heads);
  Arg out(out_, "out"), attn(attn_, "attn");
  check_out(c.q.v, out.v, {c.B, c.Lq, c.E});
  check_out(c.q.v, attn.v, {c.B, c.H, c.Lq, c.Lk});
  py::gil_scoped_release nogil;
  if (c.q.v.dtype == DType::f32) {
    attention_fwd_cpu<float>(c.args<float>(scale, seed, p), out.v.ptr<float>(), attn.v.ptr<float>(),
                             threads_arg(num_threads));
  } else {
    attention_fwd_cpu<double>(c.args<double>(scale, seed, p), out.v.ptr<double>(), attn.v.ptr<double>(),
                              threads_arg(num_threads));
  }
}

void attention_backward(py::handle q, py::handle k, py::handle v, py::handle kpm, int64_t heads, double scale,
                        int64_t seed, double p, py::handle grad_out_, py::handle attn_, py::handle gq_,
                        py::handle gk_, py::handle gv_, int num_threads) {
  AttnCall c(q, k, v, kpm, heads);
  Arg grad_out(grad_out_, "grad_output"), attn(attn_, "attn"), gq(gq_, "grad_query"), gk(gk_, "grad_key"),
      gv(gv_, "grad_value");
  check_like(c.q.v, grad_out.v, {c.B, c.Lq, c.E});
  check_like(c.q.v, attn.v, {c.B, c.H, c.Lq, c.Lk});
  check_out(c.q.v, gq.v, {c.B, c.Lq, c.E});
  check_out(c.q.v, gk.v, {c.B, c.Lk, c.E});
  check_out(c.q.v, gv.v, {c.B, c.Lk, c.E});
  py::gil_scoped_release nogil;
  if (c.q.v.dtype == DType::f32) {
    attention_bwd_cpu<float>(c.args<float>(scale, seed, p), grad_out.v.ptr<float>(), attn.v.ptr<float>(),
                             gq.v.ptr<float>(), gk.v.ptr<float>(), gv.v.ptr<float>(), threads_arg(num_threads));
  } else {
    attention_bwd_cpu<double>(c.args<double>(scale, seed, p), grad_out.v.ptr<double>(), attn.v.ptr<double>(),
                              gq.v.ptr<double>(), gk.v.ptr<double>(), gv.v.ptr<double>(), threads_arg(num_threads));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Linear sum assignment (CPU). Any strides; float32 or float64 read in place.
struct LsaInput {
  Arg cost;
  int64_t k;
  py::array_t<int64_t> rows, cols;
  int64_t *rows_ptr, *cols_ptr;  // taken while the GIL is held
  LsaInput(py::handle obj, const char* name) : cost(obj, name) {
    const View& v = cost.v;
    if (v.device != DeviceKind::cpu) throw ValueError(arg(v) + " must be a CPU array or tensor");
    if (v.ndim != 2)
      throw ValueError(arg(v) + ": expected a matrix (2-D array), got a " + std::to_string(v.ndim) + "-D array");
    if (v.dtype != DType::f32 && v.dtype != DType::f64)
      throw TypeError(arg(v) + " must be float32 or float64, got " + dtype_name(v.dtype));
    k = std::min(v.size(0), v.size(1));
    rows = py::array_t<int64_t>(k);
    cols = py::array_t<int64_t>(k);
    rows_ptr = rows.mutable_data();
    cols_ptr = cols.mutable_data();
  }
  LsaStatus solve(bool maximize) {
    const View& v = cost.v;
    const int64_t nr = v.size(0), nc = v.size(1), sr = v.stride(0), sc = v.stride(1);
    if (v.dtype == DType::f32) return solve_lsa<float>(v.ptr<float>(), nr, nc, sr, sc, maximize, rows_ptr, cols_ptr);
    return solve_lsa<double>(v.ptr<double>(), nr, nc, sr, sc, maximize, rows_ptr, cols_ptr);
  }
};

void raise_lsa(LsaStatus s, const std::string& prefix) {
  if (s == LsaStatus::invalid) throw ValueError(prefix + "matrix contains invalid numeric entries");
  if (s == LsaStatus::infeasible) throw ValueError(prefix + "cost matrix is infeasible");
}

py::tuple linear_sum_assignment(py::handle cost, bool maximize) {
  LsaInput in(cost, "cost_matrix");
  LsaStatus s;
  {
    py::gil_scoped_release nogil;
    s = in.solve(maximize);
  }
  raise_lsa(s, "");
  return py::make_tuple(in.rows, in.cols);
}

py::list batched_linear_sum_assignment(const py::sequence& costs, bool maximize, int num_threads) {
  const size_t n = py::len(costs);
  std::vector<std::string> names(n);
  std::vector<std::unique_ptr<LsaInput>> inputs;
  inputs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    names[i] = "costs[" + std::to_string(i) + "]";
    inputs.emplace_back(new LsaInput(costs[i], names[i].c_str()));
  }
  std::vector<LsaStatus> status(n, LsaStatus::ok);
  {
    py::gil_scoped_release nogil;
    parallel_for_each(static_cast<int64_t>(n), threads_arg(num_threads),
                      [&](int64_t i) { status[i] = inputs[i]->solve(maximize); });
  }
  py::list out;
  for (size_t i = 0; i < n; ++i) {
    raise_lsa(status[i], names[i] + ": ");
    out.append(py::make_tuple(inputs[i]->rows, inputs[i]->cols));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
py::dict build_info() {
  py::dict d;
  d["version"] = DETRCORE_VERSION;
#ifdef DETRCORE_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(DETRCORE_CUDA_ARCHS);
  d["cuda_version"] = std::string(DETRCORE_CUDA_VERSION);
  d["cuda_runtime_version"] = cuda::runtime_version();
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_version"] = py::none();
  d["cuda_runtime_version"] = py::none();
#endif
  d["compiler"] = DETRCORE_COMPILER;
  d["openmp"] = parallel_uses_openmp();
  d["msda_cpu_simd"] = ms_deform_attn_cpu_simd(-1) ? "avx2+fma" : "none";
  return d;
}

int cuda_device_count() {
#ifdef DETRCORE_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

// For tests: what the native side sees of an argument (zero-copy and stride checks).
py::dict inspect(py::handle obj) {
  Arg a(obj, "obj");
  py::dict d;
  d["data_ptr"] = reinterpret_cast<uintptr_t>(a.v.data);
  d["device"] = a.v.device == DeviceKind::cpu ? "cpu" : (a.v.device == DeviceKind::cuda ? "cuda" : "other");
  d["dtype"] = dtype_name(a.v.dtype);
  d["contiguous"] = a.v.is_contiguous();
  d["readonly"] = a.v.readonly;
  py::list shape, strides;
  for (int i = 0; i < a.v.ndim; ++i) {
    shape.append(a.v.size(i));
    strides.append(a.v.stride(i));
  }
  d["shape"] = shape;
  d["strides"] = strides;
  d["path"] = a.from_numpy_path ? "numpy" : (a.keep ? "dlpack_capsule" : "exchange_api");
  return d;
}

}  // namespace
}  // namespace detrcore

PYBIND11_MODULE(_C, m) {
  using namespace detrcore;
  m.doc() = "detrcore native core: box ops, linear assignment (torch-free; tensors arrive through DLPack)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const detrcore::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const detrcore::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  const auto s = py::arg("stream") = 0;
  const auto nt = py::arg("num_threads") = 1;
  m.def("box_map", &box_map, py::arg("boxes"), py::arg("out"), py::arg("kind"), nt, s,
        "Linear box conversion (kind: 0 cxcywh->xyxy, 1 xyxy->cxcywh, 2 and 3 their input gradients).");
  m.def("box_pairwise", &box_pairwise, py::arg("boxes1"), py::arg("boxes2"), py::arg("out"), py::arg("giou"), nt, s,
        "Pairwise IoU or GIoU: boxes1 [B,N,4], boxes2 [B,M,4] -> out [B,N,M].");
  m.def("box_pairwise_backward", &box_pairwise_backward, py::arg("grad"), py::arg("boxes1"), py::arg("boxes2"),
        py::arg("grad_boxes1"), py::arg("grad_boxes2"), py::arg("giou"), nt, s);
  m.def("giou_loss", &giou_loss, py::arg("boxes1"), py::arg("boxes2"), py::arg("out"), nt, s,
        "Paired 1 - GIoU: boxes1 [N,4], boxes2 [N,4] -> out [N].");
  m.def("giou_loss_backward", &giou_loss_backward, py::arg("grad"), py::arg("boxes1"), py::arg("boxes2"),
        py::arg("grad_boxes1"), py::arg("grad_boxes2"), nt, s);
  m.def("inverse_sigmoid", &inverse_sigmoid, py::arg("x"), py::arg("out"), py::arg("eps"), nt, s);
  m.def("inverse_sigmoid_backward", &inverse_sigmoid_backward, py::arg("grad"), py::arg("x"), py::arg("grad_x"),
        py::arg("eps"), nt, s);
  m.def("dropout", &dropout, py::arg("input"), py::arg("out"), py::arg("seed"), py::arg("p"), py::arg("relu"), nt,
        "CPU dropout (optionally after ReLU) from a counter-based stream: out = keep * scale * input.");
  m.def("attention_forward", &attention_forward, py::arg("query"), py::arg("key"), py::arg("value"),
        py::arg("key_padding_mask"), py::arg("num_heads"), py::arg("scale"), py::arg("seed"), py::arg("p"),
        py::arg("out"), py::arg("attn"), nt,
        "CPU multi-head attention with dropout on its weights: out [B, Lq, E]; attn [B, H, Lq, Lk] gets the "
        "softmax (before dropout) for the backward.");
  m.def("attention_backward", &attention_backward, py::arg("query"), py::arg("key"), py::arg("value"),
        py::arg("key_padding_mask"), py::arg("num_heads"), py::arg("scale"), py::arg("seed"), py::arg("p"),
        py::arg("grad_output"), py::arg("attn"), py::arg("grad_query"), py::arg("grad_key"), py::arg("grad_value"),
        nt, "Gradients of attention_forward (the dropout mask regenerated from `seed`).");
  m.def("frozen_bn", &frozen_bn, py::arg("input"), py::arg("residual"), py::arg("scale"), py::arg("shift"),
        py::arg("out"), py::arg("relu"), nt,
        "Frozen batch norm over [N, C, ...]: out = act(input * scale[c] + shift[c] (+ residual)), act ReLU if relu.");
  m.def("frozen_bn_backward", &frozen_bn_backward, py::arg("grad"), py::arg("output"), py::arg("scale"),
        py::arg("grad_input"), py::arg("grad_residual"), py::arg("relu"), nt,
        "Gradients of frozen_bn from its output (read only with relu); grad_residual may be None.");
  m.def("dropout_backward", &dropout_backward, py::arg("grad"), py::arg("grad_input"), py::arg("seed"), py::arg("p"),
        nt, "The dropout mask regenerated from `seed`: grad_input = keep * scale * grad.");
  m.def("dropout_add", &dropout_add, py::arg("input"), py::arg("residual"), py::arg("out"), py::arg("seed"),
        py::arg("p"), nt, "out = residual + dropout(input) (the mask of dropout(input, out, seed, p)).");
  m.def("relu_dropout_backward", &relu_dropout_backward, py::arg("grad"), py::arg("output"), py::arg("grad_input"),
        py::arg("p"), nt, py::arg("column_sums") = py::none(),
        "grad_input = output > 0 ? scale * grad : 0; column_sums [cols] (optional): its sums over the rows.");
  const auto tile = py::arg("tile") = 2;
  m.def("winograd_weight", &winograd_weight, py::arg("weight"), py::arg("out"), nt, tile,
        "Winograd F(tile x tile, 3x3) weight transform (tile 2 or 4): weight [K, C, 3, 3] -> out [P, K, C] (G w G^T), "
        "P = (tile + 2)^2.");
  m.def("winograd_weight_adjoint", &winograd_weight_adjoint, py::arg("grad"), py::arg("grad_weight"), nt, tile,
        "Adjoint of winograd_weight: grad [P, K, C] -> grad_weight [K, C, 3, 3].");
  m.def("winograd_input", &winograd_input, py::arg("input"), py::arg("out"), nt, tile,
        "Winograd input transform of (tile + 2)^2 patches at stride tile, padding 1: input [N, C, H, W] -> out "
        "[P, C, T], T = N * ceil(H / tile) * ceil(W / tile).");
  m.def("winograd_input_adjoint", &winograd_input_adjoint, py::arg("grad"), py::arg("grad_input"), nt, tile,
        "Adjoint of winograd_input: grad [P, C, T] -> grad_input [N, C, H, W].");
  m.def("winograd_output", &winograd_output, py::arg("m"), py::arg("bias"), py::arg("out"), nt, tile,
        py::arg("residual") = py::none(), py::arg("relu") = false,
        "Winograd output transform: m [P, K, T] (+ bias [K] or None) -> out [N, K, H, W], then + residual "
        "[N, K, H, W] (a separate tensor) and max(out, 0) if given.");
  m.def("winograd_output_adjoint", &winograd_output_adjoint, py::arg("grad"), py::arg("grad_m"), nt, tile,
        "Adjoint of winograd_output: grad [N, K, H, W] -> grad_m [P, K, T].");
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward, py::arg("value"), py::arg("spatial_shapes"),
        py::arg("level_start_index"), py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("out"),
        nt, s, py::arg("coord_shapes") = py::none(),
        "Multi-scale deformable attention forward: out [B, Q, H*D]. coord_shapes (CPU): the sizes the locations are "
        "normalised by, when the stored maps are the top-left corners of larger zero-padded ones.");
  m.def("ms_deform_attn_workspace_bytes", &ms_deform_attn_workspace_bytes, py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("deterministic"));
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward, py::arg("value"), py::arg("spatial_shapes"),
        py::arg("level_start_index"), py::arg("sampling_locations"), py::arg("attention_weights"),
        py::arg("grad_output"), py::arg("grad_value"), py::arg("grad_sampling_locations"),
        py::arg("grad_attention_weights"), py::arg("deterministic") = false, py::arg("workspace") = py::none(), nt,
        s, py::arg("coord_shapes") = py::none());
  m.def("linear_sum_assignment", &linear_sum_assignment, py::arg("cost_matrix"), py::arg("maximize") = false,
        "Solve one assignment problem; returns (rows, cols) as int64 numpy arrays.");
  m.def("batched_linear_sum_assignment", &batched_linear_sum_assignment, py::arg("costs"),
        py::arg("maximize") = false, nt, "Solve many assignment problems in parallel threads, GIL released.");
  m.def("build_info", &build_info);
  m.def("_msda_cpu_simd", &ms_deform_attn_cpu_simd, py::arg("enable") = -1,
        "Turns the MSDA CPU kernels' AVX2 path on (1, where the CPU has it) or off (0); -1 only asks. Returns "
        "whether it was on. For tests and benchmarks.");
  m.def("cuda_device_count", &cuda_device_count);
  m.def("inspect", &inspect);
}
