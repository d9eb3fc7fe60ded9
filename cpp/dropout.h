// Dropout on the CPU from a counter-based random stream: element i of a call keeps its value unless its 32-bit
// draw u_i falls below `threshold` (= round(p * 2^32)). The draws come from the SplitMix64 generator started at
// `seed`, two per output: its k-th 64-bit output z_k = splitmix64(seed + (k + 1) * golden) gives u_2k = high32(z_k)
// and u_2k+1 = low32(z_k) (half the hashing of one output per element; the halves of SplitMix64's output are
// independent uniform 32-bit values). Any element's decision can be recomputed on its own, so the backward
// regenerates the mask instead of storing it, results do not depend on the thread count, and the forward is one
// pass over memory (torch's bernoulli_ + mul are three).
//   dropout:            y = relu ? max(x, 0) * keep * scale : x * keep * scale
//   dropout_bwd:        grad_x = grad * keep * scale                  (the mask regenerated from `seed`)
//   dropout_add:        s = x + a * keep * scale                      (a residual connection's dropout and sum; the
//                       dropped term rounded to T first, as the two separate ops would)
//   relu_dropout_bwd:   grad_x = y > 0 ? grad * scale : 0             (y > 0 exactly where x > 0 and kept)
//   relu_dropout_bwd_colsum: the same over a [rows, cols] matrix, and colsum[j] = sum over rows of grad_x[:, j]
//                       (a linear layer's bias gradient, formed in the same pass; summed in double per thread chunk,
//                       the chunks added in order: deterministic for a given thread count)
// All pointers address contiguous memory; the output may be the input (y == x, grad_x == grad: in place), y of
// relu_dropout_bwd not. T = float, double, or BFloat16 (bfloat16 bits, computed in float and
// rounded once to nearest-even, as torch does: the dtype CPU autocast produces).
#pragma once
#include <cstdint>

#include "elem.h"

namespace detrcore {

template <typename T>
void dropout_cpu(const T* x, T* y, int64_t n, uint64_t seed, uint32_t threshold, double scale, bool relu,
                 int num_threads);
template <typename T>
void dropout_bwd_cpu(const T* grad, T* grad_x, int64_t n, uint64_t seed, uint32_t threshold, double scale,
                     int num_threads);
template <typename T>
void dropout_add_cpu(const T* a, const T* x, T* s, int64_t n, uint64_t seed, uint32_t threshold, double scale,
                     int num_threads);
template <typename T>
void relu_dropout_bwd_cpu(const T* grad, const T* y, T* grad_x, int64_t n, double scale, int num_threads);
template <typename T>
void relu_dropout_bwd_colsum_cpu(const T* grad, const T* y, T* grad_x, int64_t rows, int64_t cols, double scale,
                                 T* colsum, int num_threads);

// The k-th 64-bit output of SplitMix64 started at `seed`.
inline uint64_t splitmix64_output(uint64_t seed, uint64_t k) {
  uint64_t z = seed + (k + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Element i's draw u_i (exposed for tests).
inline uint32_t dropout_draw(uint64_t seed, uint64_t i) {
  const uint64_t z = splitmix64_output(seed, i >> 1);
  return static_cast<uint32_t>(i & 1 ? z : z >> 32);
}

// fn(i, keep) for i in [i0, i1), in order: one SplitMix64 output per pair of elements (above). For the kernels that
// apply or regenerate a mask (dropout.cpp, attention.cpp).
template <typename Fn>
inline __attribute__((always_inline)) void for_each_keep(int64_t i0, int64_t i1, uint64_t seed,
                                                         uint32_t threshold, Fn&& fn) {
  int64_t i = i0;
  if ((i & 1) && i < i1) {
    fn(i, dropout_draw(seed, static_cast<uint64_t>(i)) >= threshold);
    ++i;
  }
  for (; i + 1 < i1; i += 2) {
    const uint64_t z = splitmix64_output(seed, static_cast<uint64_t>(i) >> 1);
    fn(i, static_cast<uint32_t>(z >> 32) >= threshold);
    fn(i + 1, static_cast<uint32_t>(z) >= threshold);
  }
  if (i < i1) fn(i, dropout_draw(seed, static_cast<uint64_t>(i)) >= threshold);
}

}  // namespace detrcore
