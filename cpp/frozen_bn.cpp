#include "frozen_bn.h"

#include <type_traits>

#include "parallel.h"

namespace detrcore {
namespace {

// Planes [p0, p1) of the N * C planes of HW elements.
template <typename T, bool kRelu, bool kResidual>
DETRCORE_ELEMENTWISE_CLONES void forward_planes(const T* __restrict x, const T* __restrict r,
                                                const typename Elem<T>::C* __restrict scale,
                                                const typename Elem<T>::C* __restrict shift, T* __restrict y,
                                                int64_t p0, int64_t p1, int64_t C, int64_t HW) {
  using S = typename Elem<T>::C;
  for (int64_t p = p0; p < p1; ++p) {
    const S a = scale[p % C], b = shift[p % C];
    const int64_t o = p * HW;
    for (int64_t i = o; i < o + HW; ++i) {
      S v = Elem<T>::load(x[i]) * a + b;
      if (kResidual) v += Elem<T>::load(r[i]);
      if (kRelu) v = v > S(0) ? v : S(0);
      y[i] = Elem<T>::store(v);
    }
  }
}

template <typename T, bool kRelu, bool kResidual>
DETRCORE_ELEMENTWISE_CLONES void backward_planes(const T* __restrict g, const T* __restrict y,
                                                 const typename Elem<T>::C* __restrict scale, T* __restrict gx,
                                                 T* __restrict gr, int64_t p0, int64_t p1, int64_t C, int64_t HW) {
  using S = typename Elem<T>::C;
  for (int64_t p = p0; p < p1; ++p) {
    const S a = scale[p % C];
    const int64_t o = p * HW;
    for (int64_t i = o; i < o + HW; ++i) {
      S v = Elem<T>::load(g[i]);
      if (kRelu) v = Elem<T>::load(y[i]) > S(0) ? v : S(0);
      if (kResidual) gr[i] = Elem<T>::store(v);
      gx[i] = Elem<T>::store(v * a);
    }
  }
}

// fn(p0, p1, relu, residual) over chunks of the N * C planes, with relu / residual as compile-time constants.
template <typename Fn>
void by_plane(int64_t N, int64_t C, int64_t HW, bool relu, bool residual, int num_threads, Fn&& fn) {
  const int64_t grain = HW >= kElementwiseGrain ? 1 : kElementwiseGrain / HW;
  parallel_for(N * C, grain, num_threads, [&](int64_t p0, int64_t p1) {
    if (relu && residual) {
      fn(p0, p1, std::true_type{}, std::true_type{});
    } else if (relu) {
      fn(p0, p1, std::true_type{}, std::false_type{});
    } else if (residual) {
      fn(p0, p1, std::false_type{}, std::true_type{});
    } else {
      fn(p0, p1, std::false_type{}, std::false_type{});
    }
  });
}

}  // namespace

template <typename T>
void frozen_bn_cpu(const T* x, const T* r, const typename Elem<T>::C* scale, const typename Elem<T>::C* shift, T* y,
                   int64_t N, int64_t C, int64_t HW, bool relu, int num_threads) {
  if (N <= 0 || C <= 0 || HW <= 0) return;
  by_plane(N, C, HW, relu, r != nullptr, num_threads, [&](int64_t p0, int64_t p1, auto kRelu, auto kResidual) {
    forward_planes<T, decltype(kRelu)::value, decltype(kResidual)::value>(x, r, scale, shift, y, p0, p1, C, HW);
  });
}

template <typename T>
void frozen_bn_bwd_cpu(const T* grad, const T* y, const typename Elem<T>::C* scale, T* grad_x, T* grad_r, int64_t N,
                       int64_t C, int64_t HW, bool relu, int num_threads) {
  if (N <= 0 || C <= 0 || HW <= 0) return;
  by_plane(N, C, HW, relu, grad_r != nullptr, num_threads, [&](int64_t p0, int64_t p1, auto kRelu, auto kResidual) {
    backward_planes<T, decltype(kRelu)::value, decltype(kResidual)::value>(grad, y, scale, grad_x, grad_r, p0, p1, C,
                                                                           HW);
  });
}

#define DETRCORE_INSTANTIATE(T)                                                                                   \
  template void frozen_bn_cpu<T>(const T*, const T*, const Elem<T>::C*, const Elem<T>::C*, T*, int64_t, int64_t, \
                                 int64_t, bool, int);                                                             \
  template void frozen_bn_bwd_cpu<T>(const T*, const T*, const Elem<T>::C*, T*, T*, int64_t, int64_t, int64_t,    \
                                     bool, int);
DETRCORE_INSTANTIATE(float)
DETRCORE_INSTANTIATE(double)
DETRCORE_INSTANTIATE(BFloat16)
#undef DETRCORE_INSTANTIATE

}  // namespace detrcore
