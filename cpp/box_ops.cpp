// CPU box kernels. The math lives in box_math.h (shared with CUDA); this file only lays out the loops.
#include "box_ops.h"

#include <algorithm>
#include <vector>

#include "elem.h"
#include "parallel.h"

namespace detrcore {
namespace {
// The pairwise backward splits each image's N rows into at most this many fixed chunks, each with its own
// grad_b partial sum, reduced in chunk order: deterministic whatever the thread count, no atomics.
constexpr int64_t kMaxRowChunks = 8;
constexpr int64_t kRowsPerChunk = 64;

template <typename T>
void load4(const T* p, T* q) {
  q[0] = p[0], q[1] = p[1], q[2] = p[2], q[3] = p[3];
}
}  // namespace

template <typename T>
void box_map_cpu(const T* in, T* out, int64_t n, int kind, int num_threads) {
  parallel_for(n, kElementwiseGrain / 4, num_threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) boxmath::box_map<T>(kind, in + 4 * i, out + 4 * i);
  });
}

template <typename T, bool kGiou>
void pairwise_rows(const T* a, const T* b, T* out, int64_t N, int64_t M, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* ar = a + 4 * r;
    const T* bb = b + 4 * M * (r / N);
    T* o = out + M * r;
    for (int64_t m = 0; m < M; ++m) o[m] = boxmath::pair_forward<T, kGiou>(ar, bb + 4 * m).giou;
  }
}

template <typename T>
void box_pairwise_cpu(const T* a, const T* b, T* out, int64_t B, int64_t N, int64_t M, bool giou, int num_threads) {
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(M, 1));
  parallel_for(B * N, grain, num_threads, [&](int64_t r0, int64_t r1) {
    if (giou)
      pairwise_rows<T, true>(a, b, out, N, M, r0, r1);
    else
      pairwise_rows<T, false>(a, b, out, N, M, r0, r1);
  });
}

// Rows [n0, n1) of image bi: writes their grad_a rows and adds their contributions into gb[M, 4].
template <typename T, bool kGiou>
void pairwise_bwd_rows(const T* grad, const T* a, const T* b, T* grad_a, T* gb, int64_t bi, int64_t N, int64_t M,
                       int64_t n0, int64_t n1) {
  const T* bb = b + 4 * M * bi;
  std::vector<T> per_pair(static_cast<size_t>(4 * M));  // row n's gradient terms, summed after the loop
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r = bi * N + n;
    const T* ar = a + 4 * r;
    const T* g = grad + M * r;
    T* ga_m = per_pair.data();
    std::fill(per_pair.begin(), per_pair.end(), T(0));
    for (int64_t m = 0; m < M; ++m) {  // no loop-carried dependence: vectorises
      auto p = boxmath::pair_forward<T, kGiou>(ar, bb + 4 * m);
      boxmath::pair_backward<T, kGiou>(ar, bb + 4 * m, p, g[m], ga_m + 4 * m, gb + 4 * m);
    }
    T ga[4] = {0, 0, 0, 0};
    for (int64_t m = 0; m < M; ++m)
      for (int k = 0; k < 4; ++k) ga[k] += ga_m[4 * m + k];
    load4(ga, grad_a + 4 * r);
  }
}

template <typename T>
void box_pairwise_bwd_cpu(const T* grad, const T* a, const T* b, T* grad_a, T* grad_b, int64_t B, int64_t N,
                          int64_t M, bool giou, int num_threads) {
  const int64_t K = std::max<int64_t>(1, std::min(kMaxRowChunks, N / kRowsPerChunk));
  std::vector<T> partial(static_cast<size_t>(B * K * M * 4), T(0));  // [B, K, M, 4]
  parallel_for(B * K, 1, num_threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / K, k = t % K, n0 = chunk_begin(N, K, k), n1 = chunk_begin(N, K, k + 1);
      T* gb = partial.data() + 4 * M * t;
      if (giou)
        pairwise_bwd_rows<T, true>(grad, a, b, grad_a, gb, bi, N, M, n0, n1);
      else
        pairwise_bwd_rows<T, false>(grad, a, b, grad_a, gb, bi, N, M, n0, n1);
    }
  });
  parallel_for(B * M, 256, num_threads, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t bi = j / M, m = j % M;
      T s[4] = {0, 0, 0, 0};
      for (int64_t k = 0; k < K; ++k) {
        const T* p = partial.data() + 4 * ((bi * K + k) * M + m);
        s[0] += p[0], s[1] += p[1], s[2] += p[2], s[3] += p[3];
      }
      load4(s, grad_b + 4 * j);
    }
  });
}

template <typename T>
void giou_loss_cpu(const T* a, const T* b, T* out, int64_t n, int num_threads) {
  parallel_for(n, kElementwiseGrain / 16, num_threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = T(1) - boxmath::pair_forward<T, true>(a + 4 * i, b + 4 * i).giou;
  });
}

template <typename T>
void giou_loss_bwd_cpu(const T* grad, const T* a, const T* b, T* grad_a, T* grad_b, int64_t n, int num_threads) {
  parallel_for(n, kElementwiseGrain / 16, num_threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T ga[4] = {0, 0, 0, 0}, gb[4] = {0, 0, 0, 0};
      auto p = boxmath::pair_forward<T, true>(a + 4 * i, b + 4 * i);
      boxmath::pair_backward<T, true>(a + 4 * i, b + 4 * i, p, -grad[i], ga, gb);
      load4(ga, grad_a + 4 * i);
      load4(gb, grad_b + 4 * i);
    }
  });
}

template <typename T>
void inverse_sigmoid_cpu(const T* x, T* out, int64_t n, double eps, int num_threads) {
  parallel_for(n, kElementwiseGrain, num_threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = boxmath::inverse_sigmoid<T>(x[i], T(eps));
  });
}

template <typename T>
void inverse_sigmoid_bwd_cpu(const T* grad, const T* x, T* grad_x, int64_t n, double eps, int num_threads) {
  parallel_for(n, kElementwiseGrain, num_threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) grad_x[i] = boxmath::inverse_sigmoid_grad<T>(x[i], T(eps), grad[i]);
  });
}

#define DETRCORE_INSTANTIATE(T)                                                                                  \
  template void box_map_cpu<T>(const T*, T*, int64_t, int, int);                                                 \
  template void box_pairwise_cpu<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, bool, int);               \
  template void box_pairwise_bwd_cpu<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, bool,   \
                                        int);                                                                    \
  template void giou_loss_cpu<T>(const T*, const T*, T*, int64_t, int);                                          \
  template void giou_loss_bwd_cpu<T>(const T*, const T*, const T*, T*, T*, int64_t, int);                        \
  template void inverse_sigmoid_cpu<T>(const T*, T*, int64_t, double, int);                                      \
  template void inverse_sigmoid_bwd_cpu<T>(const T*, const T*, T*, int64_t, double, int);
DETRCORE_INSTANTIATE(float)
DETRCORE_INSTANTIATE(double)
#undef DETRCORE_INSTANTIATE

}  // namespace detrcore
