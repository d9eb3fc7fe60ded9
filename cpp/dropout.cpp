#include "dropout.h"

#include <algorithm>
#include <vector>

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
inline __attribute__((always_inline)) void add_loop(const T* a, const T* x, T* s, int64_t i0, int64_t i1,
                                                    uint64_t seed, uint32_t threshold, typename Elem<T>::C scale) {
  using C = typename Elem<T>::C;
  for_each_keep(i0, i1, seed, threshold, [&](int64_t i, bool keep) {
    const C v = Elem<T>::load(a[i]);  // read whether kept or not: branch-free (vectorised)
    const T d = Elem<T>::store(keep ? v * scale : C(0));
    s[i] = Elem<T>::store(Elem<T>::load(x[i]) + Elem<T>::load(d));
  });
}
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void add_range(const T* __restrict a, const T* __restrict x, T* __restrict s, int64_t i0,
                                           int64_t i1, uint64_t seed, uint32_t threshold, typename Elem<T>::C scale) {
  add_loop<T>(a, x, s, i0, i1, seed, threshold, scale);
}

template <typename T>
inline __attribute__((always_inline)) void relu_backward_loop(const T* g, const T* __restrict y, T* gx, int64_t i0,
                                                              int64_t i1, typename Elem<T>::C scale) {
  using C = typename Elem<T>::C;
  for (int64_t i = i0; i < i1; ++i) {
    const C v = Elem<T>::load(g[i]);  // read whether kept or not: branch-free (vectorised)
    gx[i] = Elem<T>::store(Elem<T>::load(y[i]) > C(0) ? v * scale : C(0));
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

// Rows [r0, r1) of a [rows, cols] relu_dropout_bwd, their column sums added into acc[cols] (double): summed in the
// compute type over blocks of kSumBlock rows (vectorised), each block's sums then added in double. blk: cols scratch.
constexpr int64_t kSumBlock = 64;
template <typename T>
inline __attribute__((always_inline)) void relu_backward_rows(const T* g, const T* __restrict y, T* gx, int64_t r0,
                                                              int64_t r1, int64_t cols, typename Elem<T>::C scale,
                                                              double* __restrict acc,
                                                              typename Elem<T>::C* __restrict blk) {
  using C = typename Elem<T>::C;
  for (int64_t b0 = r0; b0 < r1; b0 += kSumBlock) {
    for (int64_t j = 0; j < cols; ++j) blk[j] = C(0);
    for (int64_t r = b0; r < std::min(r1, b0 + kSumBlock); ++r) {
      const int64_t o = r * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const C gv = Elem<T>::load(g[o + j]);  // read whether kept or not: branch-free (vectorised)
        const T v = Elem<T>::store(Elem<T>::load(y[o + j]) > C(0) ? gv * scale : C(0));
        gx[o + j] = v;
        blk[j] += Elem<T>::load(v);
      }
    }
    for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<double>(blk[j]);
  }
}
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void relu_backward_rows_range(const T* __restrict g, const T* __restrict y,
                                                          T* __restrict gx, int64_t r0, int64_t r1, int64_t cols,
                                                          typename Elem<T>::C scale, double* __restrict acc,
                                                          typename Elem<T>::C* __restrict blk) {
  relu_backward_rows<T>(g, y, gx, r0, r1, cols, scale, acc, blk);
}
template <typename T>
DETRCORE_ELEMENTWISE_CLONES void relu_backward_rows_range_inplace(T* __restrict g, const T* __restrict y, int64_t r0,
                                                                  int64_t r1, int64_t cols, typename Elem<T>::C scale,
                                                                  double* __restrict acc,
                                                                  typename Elem<T>::C* __restrict blk) {
  relu_backward_rows<T>(g, y, g, r0, r1, cols, scale, acc, blk);
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
void dropout_add_cpu(const T* a, const T* x, T* s, int64_t n, uint64_t seed, uint32_t threshold, double scale,
                     int num_threads) {
  using C = typename Elem<T>::C;
  parallel_for(n, kElementwiseGrain, num_threads, [&](int64_t i0, int64_t i1) {
    add_range<T>(a, x, s, i0, i1, seed, threshold, static_cast<C>(scale));
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

template <typename T>
void relu_dropout_bwd_colsum_cpu(const T* grad, const T* y, T* grad_x, int64_t rows, int64_t cols, double scale,
                                 T* colsum, int num_threads) {
  using C = typename Elem<T>::C;
  const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, cols));
  const int64_t chunks = parallel_chunks(rows, grain, num_threads);
  std::vector<double> partial(static_cast<size_t>(chunks * cols), 0.0);  // one row of sums per chunk
  parallel_for(chunks, 1, num_threads, [&](int64_t c0, int64_t c1) {
    std::vector<C> blk(static_cast<size_t>(cols));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = chunk_begin(rows, chunks, c), r1 = chunk_begin(rows, chunks, c + 1);
      double* acc = partial.data() + c * cols;
      grad == grad_x
          ? relu_backward_rows_range_inplace<T>(grad_x, y, r0, r1, cols, static_cast<C>(scale), acc, blk.data())
          : relu_backward_rows_range<T>(grad, y, grad_x, r0, r1, cols, static_cast<C>(scale), acc, blk.data());
    }
  });
  for (int64_t j = 0; j < cols; ++j) {
    double sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * cols + j];
    colsum[j] = Elem<T>::store(static_cast<C>(sum));
  }
}

#define DETRCORE_INSTANTIATE(T)                                                                           \
  template void dropout_cpu<T>(const T*, T*, int64_t, uint64_t, uint32_t, double, bool, int);             \
  template void dropout_bwd_cpu<T>(const T*, T*, int64_t, uint64_t, uint32_t, double, int);               \
  template void relu_dropout_bwd_cpu<T>(const T*, const T*, T*, int64_t, double, int);                    \
  template void dropout_add_cpu<T>(const T*, const T*, T*, int64_t, uint64_t, uint32_t, double, int);     \
  template void relu_dropout_bwd_colsum_cpu<T>(const T*, const T*, T*, int64_t, int64_t, double, T*, int);
DETRCORE_INSTANTIATE(float)
DETRCORE_INSTANTIATE(double)
DETRCORE_INSTANTIATE(BFloat16)
#undef DETRCORE_INSTANTIATE

}  // namespace detrcore
