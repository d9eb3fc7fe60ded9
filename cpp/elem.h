// Element access in a kernel's compute type: float for bfloat16 (round to nearest even on the way back, NaN kept
// quiet, as torch rounds), the type itself otherwise.
#pragma once
#include <cstdint>
#include <cstring>

namespace detrcore {

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
