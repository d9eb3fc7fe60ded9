// Shared by the CPU elementwise kernels (dropout, frozen batch norm, box ops): element access in a kernel's compute
// type (float for bfloat16, rounded to nearest even on the way back, NaN kept quiet, as torch rounds; the type
// itself otherwise), the per-thread grain and the ISA clones.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
// x86-64-v4 has a vector 64-bit multiply (vpmullq, for dropout's mixer); v3 emulates it with 32-bit multiplies.
#define DETRCORE_ELEMENTWISE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DETRCORE_ELEMENTWISE_CLONES
#endif

namespace detrcore {

constexpr int64_t kElementwiseGrain = 32768;  // elements per thread: smaller work is not worth a wake-up

struct BFloat16 {
  uint16_t bits;
};

template <typename T>
struct Elem {
  using C = T;
  static C load(T v) { return v; }
  static T store(C v) { return v; }
};
template <>
struct Elem<BFloat16> {
  using C = float;
  static float load(BFloat16 v) {
    const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static BFloat16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
  }
};

}  // namespace detrcore
