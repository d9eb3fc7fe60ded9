#include "dropout.h"

#include "parallel.h"

namespace detrcore {
namespace {

// The loops, always inlined into the kernels below: out-of-place ones, whose pointers are __restrict (disjoint), and
// in-place ones, whose one pointer is both input and output (element i is read, then written).
template <typename T, bool kRelu>
inline __attribute__((always_inline)) void forward_loop(const T* x, T* y, int64_t i0, int64_t i1, uint64_t seed,
                                                        uint32_t threshold, typename Elem<T>::C scale) {
  using C = typename Elem<T>::C;
  for_each_keep(i0, i1, seed, threshold, [&](int64_t i, bool keep) {
    C v = Elem<T>::load(x[i]);
    if (kRelu) v = v > C(0) ? v : C(0);
    y[i] = Elem<T>::store(keep ? v * scale : C(0));
  });
}
template <typename T, bool kRelu>
DETRCORE_ELEMENTWISE_CLONES void forward_range(const T* __restrict x, T* __restrict y, int64_t i0, int64_t i1,
                                               uint64_t seed, uint32_t threshold, typename Elem<T>::C scale) {
  forward_loop<T, kRelu>(x, y, i0, i1, seed, threshold, scale);
}
template <typename T, bool kRelu>
DETRCORE_ELEMENTWISE_CLONES void forward_range_inplace(T* __restrict xy, int64_t i0, int64_t i1, uint64_t seed,
                                                       uint32_t threshold, typename Elem<T>::C scale) {
  forward_loop<T, kRelu>(xy, xy, i0, i1, seed, threshold, scale);
}

template <typename T>
inline __attribute__((always_inline)) void backward_loop(const T* g, T* gx, int64_t i0, int64_t i1, uint64_t seed,
                                                         uint32_t threshold, typename Elem<T>::C scale) {
  using C = typename Elem<T>::C;
  for_each_keep(i0, i1, seed, threshold, [&](int64_t i, bool keep) {
    const C v = Elem<T>::load(g[i]);  // read whether kept or not: branch-free
    gx[i] = Elem<T>::store(keep ? v * scale : C(0));
  });
}
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void backward_range(const T* __restrict g, T* __restrict gx, int64_t i0, int64_t i1,
                                                uint64_t seed, uint32_t threshold, typename Elem<T>::C scale) {
  backward_loop<T>(g, gx, i0, i1, seed, threshold, scale);
}
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void backward_range_inplace(T* __restrict g, int64_t i0, int64_t i1, uint64_t seed,
                                                        uint32_t threshold, typename Elem<T>::C scale) {
  backward_loop<T>(g, g, i0, i1, seed, threshold, scale);
}

template <typename T>
inline __attribute__((always_inline)) void relu_backward_loop(const T* g, const T* __restrict y, T* gx, int64_t i0,
                                                              int64_t i1, typename Elem<T>::C scale) {
  using C = typename Elem<T>::C;
  for (int64_t i = i0; i < i1; ++i) {
    gx[i] = Elem<T>::store(Elem<T>::load(y[i]) > C(0) ? Elem<T>::load(g[i]) * scale : C(0));
  }
}
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void relu_backward_range(const T* __restrict g, const T* __restrict y, T* __restrict gx,
                                                     int64_t i0, int64_t i1, typename Elem<T>::C scale) {
  relu_backward_loop<T>(g, y, gx, i0, i1, scale);
}
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void relu_backward_range_inplace(T* __restrict g, const T* __restrict y, int64_t i0,
                                                             int64_t i1, typename Elem<T>::C scale) {
  relu_backward_loop<T>(g, y, g, i0, i1, scale);
}

}  // namespace

template <typename T>
void dropout_cpu(const T* x, T* y, int64_t n, uint64_t seed, uint32_t threshold, double scale, bool relu,
                 int num_threads) {
  using C = typename Elem<T>::C;
  parallel_for(n, kElementwiseGrain, num_threads, [&](int64_t i0, int64_t i1) {
    if (x == y) {
      relu ? forward_range_inplace<T, true>(y, i0, i1, seed, threshold, static_cast<C>(scale))
           : forward_range_inplace<T, false>(y, i0, i1, seed, threshold, static_cast<C>(scale));
    } else {
      relu ? forward_range<T, true>(x, y, i0, i1, seed, threshold, static_cast<C>(scale))
           : forward_range<T, false>(x, y, i0, i1, seed, threshold, static_cast<C>(scale));
    }
  });
}

template <typename T>
void dropout_bwd_cpu(const T* grad, T* grad_x, int64_t n, uint64_t seed, uint32_t threshold, double scale,
                     int num_threads) {
  using C = typename Elem<T>::C;
  parallel_for(n, kElementwiseGrain, num_threads, [&](int64_t i0, int64_t i1) {
    grad == grad_x ? backward_range_inplace<T>(grad_x, i0, i1, seed, threshold, static_cast<C>(scale))
                   : backward_range<T>(grad, grad_x, i0, i1, seed, threshold, static_cast<C>(scale));
  });
}

template <typename T>
void relu_dropout_bwd_cpu(const T* grad, const T* y, T* grad_x, int64_t n, double scale, int num_threads) {
  using C = typename Elem<T>::C;
  parallel_for(n, kElementwiseGrain, num_threads, [&](int64_t i0, int64_t i1) {
    grad == grad_x ? relu_backward_range_inplace<T>(grad_x, y, i0, i1, static_cast<C>(scale))
                   : relu_backward_range<T>(grad, y, grad_x, i0, i1, static_cast<C>(scale));
  });
}

#define DETRCORE_INSTANTIATE(T)                                                                 \
  template void dropout_cpu<T>(const T*, T*, int64_t, uint64_t, uint32_t, double, bool, int);   \
  template void dropout_bwd_cpu<T>(const T*, T*, int64_t, uint64_t, uint32_t, double, int);     \
  template void relu_dropout_bwd_cpu<T>(const T*, const T*, T*, int64_t, double, int);
DETRCORE_INSTANTIATE(float)
DETRCORE_INSTANTIATE(double)
DETRCORE_INSTANTIATE(BFloat16)
#undef DETRCORE_INSTANTIATE

}  // namespace detrcore
