// Dropout on the CPU from a counter-based random stream: element i of a call keeps its value unless the
// 32-bit draw u_i = high32(splitmix64(seed + (i + 1) * golden)) falls below `threshold` (= round(p * 2^32)),
// i.e. the i-th output of the SplitMix64 generator started at `seed`. Any element's decision can be recomputed
// on its own, so the backward regenerates the mask instead of storing it, results do not depend on the thread
// count, and the forward is one pass over memory (torch's bernoulli_ + mul are three).
//   dropout:            y = relu ? max(x, 0) * keep * scale : x * keep * scale
//   dropout_bwd:        grad_x = grad * keep * scale                  (the mask regenerated from `seed`)
//   relu_dropout_bwd:   grad_x = y > 0 ? grad * scale : 0             (y > 0 exactly where x > 0 and kept)
// All pointers address contiguous memory; T = float, double, or BFloat16 (bfloat16 bits, computed in float and
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
void relu_dropout_bwd_cpu(const T* grad, const T* y, T* grad_x, int64_t n, double scale, int num_threads);

// The i-th draw of the stream (exposed for tests).
inline uint32_t dropout_draw(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

}  // namespace detrcore
