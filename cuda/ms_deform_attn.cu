// CUDA kernels of multi-scale deformable attention (contract in cpp/ms_deform_attn.h).
//
// Storage may be half, bfloat16, float or double; accumulation is float (double for double).
//
// Forward: one thread per (b, q, h, channel group). A group is one channel (any D), or, when D is a multiple of
// 16 / sizeof(T) and value / out are 16-byte aligned, 16 bytes of channels loaded and stored as one uint4. The
// thread loops over the L * P samples, computes each sample's footprint (the up to four in-range corners) and
// accumulates attention x corner weight x value into registers; one store at the end.
//
// Backward: one warp per (b, q, h). For every sample all lanes compute the same footprint (uniform control flow),
// lane k handles channels k, k + 32, ...: it accumulates its share of sum_d grad_out * (bilinear value, d/dlx,
// d/dly), a shuffle butterfly reduces the three partials in a fixed order and lane 0 writes the attention and
// location gradients (deterministic). grad_value receives attn x corner weight x grad_out per corner and channel:
//  - default: floating-point atomicAdd into grad_value_acc (run-to-run order dependent);
//  - deterministic: fixed-point int64 atomicAdd into the workspace (integer addition is associative), with a
//    power-of-two scale chosen on the device from M = max|grad_out| * max|attention_weights| so that the sum of
//    at most C = 4 * Q * L * P contributions (each |.| <= M) stays below 2^62; a last kernel converts back into
//    grad_value_acc, or writes NaN everywhere when M is not finite (NaN / inf among the inputs).
//
// Level metadata (spatial_shapes, level_start) is read from device memory by the kernels (staged in shared
// memory when L <= kMaxSharedLevels). Every value index is checked against [0, S); sample positions are
// range-tested in floating point before any float -> int conversion, which also rejects NaN / inf.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "check.cuh"
#include "ms_deform_attn.h"
#include "types.cuh"

namespace detrcore {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int64_t kMaxSharedLevels = 1024;  // 3 * 8 bytes per level: at most 24 KiB of shared memory
constexpr unsigned int kMaxReduceBlocks = 1024;
constexpr int64_t kFixedHeaderBytes = 16;  // two uint64 maxima in front of the fixed-point accumulators
constexpr int64_t kWorkspaceAlign = 16;    // slack so that an unaligned workspace pointer can be aligned up

// ---- loads through the read-only cache, converted to the accumulation type ----
__device__ __forceinline__ float ldg_acc(const float* p) { return __ldg(p); }
__device__ __forceinline__ double ldg_acc(const double* p) { return __ldg(p); }
__device__ __forceinline__ float ldg_acc(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float ldg_acc(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

// Round-to-nearest multiply that the compiler may not contract into an FMA with the following subtraction, so
// the sample position is computed exactly as on the CPU.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float floor_acc(float x) { return floorf(x); }
__device__ __forceinline__ double floor_acc(double x) { return ::floor(x); }

__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add(double* p, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  unsigned long long* q = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = *q, assumed;
  do {
    assumed = old;
    old = atomicCAS(q, assumed, __double_as_longlong(__longlong_as_double(assumed) + v));
  } while (assumed != old);
#else
  atomicAdd(p, v);
#endif
}

// The level table: (h, w) pairs and start offsets, in shared memory or straight from global memory. Must be
// called by every thread of the block (it may synchronise). Plain loads only: the pointers may be shared.
struct Levels {
  const int64_t* hw;
  const int64_t* start;
};

__device__ __forceinline__ Levels level_table(const int64_t* shapes, const int64_t* starts, int64_t L,
                                              bool in_shared) {
  if (!in_shared) return {shapes, starts};
  extern __shared__ int64_t level_smem[];  // 3 * L entries: hw[0 .. 2L), start[2L .. 3L)
  for (int64_t i = threadIdx.x; i < 3 * L; i += blockDim.x) level_smem[i] = i < 2 * L ? shapes[i] : starts[i - 2 * L];
  __syncthreads();
  return {level_smem, level_smem + 2 * L};
}

// The bilinear footprint of one sample: corner weights and value rows, (y0,x0), (y0,x1), (y1,x0), (y1,x1).
template <typename A>
struct Footprint {
  A lx, ly, hx, hy;
  A cw[4];
  int64_t row[4];  // value row in [0, S), or -1 when the corner is outside the map (or outside [0, S))
};

// Returns false (no contribution, zero gradients) unless -1 < x < w and -1 < y < h; false for NaN / inf too.
// Inside that range floor(x) lies in [-1, w) and converts to int64 exactly (float(w) <= 2^63, x < float(w)).
template <typename A>
__device__ __forceinline__ bool footprint(A loc_x, A loc_y, int64_t h, int64_t w, int64_t start, int64_t S,
                                          Footprint<A>& f) {
  const A fw = static_cast<A>(w), fh = static_cast<A>(h);
  const A x = mul_rn(loc_x, fw) - A(0.5);
  const A y = mul_rn(loc_y, fh) - A(0.5);
  if (!(x > A(-1) && y > A(-1) && x < fw && y < fh)) return false;
  const A fx = floor_acc(x), fy = floor_acc(y);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  f.lx = x - fx;
  f.ly = y - fy;
  f.hx = A(1) - f.lx;
  f.hy = A(1) - f.ly;
  f.cw[0] = f.hy * f.hx;
  f.cw[1] = f.hy * f.lx;
  f.cw[2] = f.ly * f.hx;
  f.cw[3] = f.ly * f.lx;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1}, ys[4] = {y0, y0, y0 + 1, y0 + 1};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const bool inside = xs[c] >= 0 && xs[c] < w && ys[c] >= 0 && ys[c] < h;
    // Unsigned arithmetic: wraps (no UB) on absurd metadata, and the bound check below still holds.
    const uint64_t r = static_cast<uint64_t>(start) + static_cast<uint64_t>(ys[c]) * static_cast<uint64_t>(w) +
                       static_cast<uint64_t>(xs[c]);
    f.row[c] = inside && r < static_cast<uint64_t>(S) ? static_cast<int64_t>(r) : -1;
  }
  return true;
}

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));  // channels per 16-byte vector
}

// ---------------------------------------------------------------------------------------------------------
// Forward. kVec: D % vec_width<T>() == 0 and value / out 16-byte aligned.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    msda_fwd_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const T* __restrict__ loc, const T* __restrict__ attn,
                    T* __restrict__ out, MsdaShape s, bool levels_in_shared) {
  using A = acc_t<T>;
  constexpr int kG = kVec ? vec_width<T>() : 1;
  const Levels lv = level_table(shapes, starts, s.L, levels_in_shared);
  const int64_t groups = s.D / kG;
  const int64_t total = s.B * s.Q * s.H * groups, HD = s.H * s.D, LP = s.L * s.P;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bqh = i / groups, c0 = (i - bqh * groups) * kG;
    const int64_t h = bqh % s.H, b = bqh / (s.Q * s.H);
    const T* vb = value + b * s.S * HD + h * s.D + c0;  // (row r, channel c0 + k) at vb + r * HD + k
    const T* sl = loc + bqh * LP * 2;
    const T* aw = attn + bqh * LP;
    A acc[kG];
#pragma unroll
    for (int k = 0; k < kG; ++k) acc[k] = A(0);
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t hl = lv.hw[2 * l], wl = lv.hw[2 * l + 1], st = lv.start[l];
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t lp = l * s.P + p;
        Footprint<A> f;
        if (!footprint<A>(ldg_acc(sl + 2 * lp), ldg_acc(sl + 2 * lp + 1), hl, wl, st, s.S, f)) continue;
        const A a = ldg_acc(aw + lp);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (f.row[c] < 0) continue;
          const A wc = a * f.cw[c];
          const T* vp = vb + f.row[c] * HD;
          if constexpr (kVec) {
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(vp));
            T v[kG];
            memcpy(v, &raw, sizeof(raw));
#pragma unroll
            for (int k = 0; k < kG; ++k) acc[k] += wc * load<A>(v + k);
          } else {
            acc[0] += wc * ldg_acc(vp);
          }
        }
      }
    }
    T* o = out + bqh * s.D + c0;
    if constexpr (kVec) {
      T v[kG];
#pragma unroll
      for (int k = 0; k < kG; ++k) store(v + k, acc[k]);
      uint4 raw;
      memcpy(&raw, v, sizeof(raw));
      *reinterpret_cast<uint4*>(o) = raw;
    } else {
      store(o, acc[0]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic backward: fixed-point scale.
//
// maxima[0] / maxima[1]: bit patterns of max|grad_out| / max|attention_weights| as non-negative doubles (their
// order is the order of the unsigned bit patterns; NaN patterns sort above +inf). Returns false when the
// contributions may not be finite in the accumulation type A (then grad_value is NaN); otherwise *e is the
// exponent of the scale 2^e <= 2^(62 - bits) / M, bits = ceil(log2(C + 1)), so that the sum of C contributions,
// each |.| <= M (a corner weight is <= 1), rounded, stays below 2^63.
template <typename A>
__device__ __forceinline__ bool fixed_point_exponent(const unsigned long long* maxima, int bits, int* e) {
  const double M = __longlong_as_double(static_cast<long long>(maxima[0])) *
                   __longlong_as_double(static_cast<long long>(maxima[1]));
  const double limit = sizeof(A) == sizeof(double) ? DBL_MAX : static_cast<double>(FLT_MAX);
  *e = 0;
  if (!(M <= limit)) return false;  // NaN or inf (or beyond float for float accumulation)
  if (M == 0) return true;          // every contribution is zero
  int em = 0;
  frexp(M, &em);  // M < 2^em
  const int x = 62 - bits - em;
  *e = x < 1000 ? x : 1000;  // keep 2^e finite for tiny M (a smaller scale only loosens the bound)
  return true;
}

__device__ __forceinline__ unsigned long long abs_bits(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
}

__device__ __forceinline__ unsigned long long umax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// maxima[0] = max over grad_out, maxima[1] = max over attention_weights (as abs_bits); maxima zeroed beforehand.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    absmax_kernel(const T* __restrict__ grad_out, int64_t ng, const T* __restrict__ attn, int64_t na,
                  unsigned long long* __restrict__ maxima) {
  __shared__ unsigned long long red[2][kThreads / kWarp];
  unsigned long long mg = 0, ma = 0;
  const int64_t n = ng > na ? ng : na;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (i < ng) mg = umax(mg, abs_bits(static_cast<double>(ldg_acc(grad_out + i))));
    if (i < na) ma = umax(ma, abs_bits(static_cast<double>(ldg_acc(attn + i))));
  }
  for (int off = kWarp / 2; off > 0; off /= 2) {
    mg = umax(mg, __shfl_xor_sync(0xffffffffu, mg, off));
    ma = umax(ma, __shfl_xor_sync(0xffffffffu, ma, off));
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) red[0][warp] = mg, red[1][warp] = ma;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / kWarp; ++w) mg = umax(mg, red[0][w]), ma = umax(ma, red[1][w]);
    atomicMax(maxima, mg);
    atomicMax(maxima + 1, ma);
  }
}

// grad_value_acc[i] = fixed[i] / 2^e, or NaN when the scale is invalid.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    fixed_to_float_kernel(const unsigned long long* __restrict__ fixed, const unsigned long long* __restrict__ maxima,
                          int bits, A* __restrict__ out, int64_t n) {
  int e = 0;
  const bool ok = fixed_point_exponent<A>(maxima, bits, &e);
  const double nan = __longlong_as_double(0x7ff8000000000000ll);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<A>(ok ? ldexp(static_cast<double>(static_cast<long long>(fixed[i])), -e) : nan);
}

// ---------------------------------------------------------------------------------------------------------
// Backward: one warp per (b, q, h); kDet picks fixed-point (grad_value_fixed) or float (grad_value) atomics.
template <typename T, bool kDet>
__global__ void __launch_bounds__(kThreads)
    msda_bwd_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const T* __restrict__ loc, const T* __restrict__ attn,
                    const T* __restrict__ grad_out, acc_t<T>* __restrict__ grad_value,
                    unsigned long long* __restrict__ grad_value_fixed, const unsigned long long* __restrict__ maxima,
                    int fixed_bits, T* __restrict__ grad_loc, T* __restrict__ grad_attn, MsdaShape s,
                    bool levels_in_shared) {
  using A = acc_t<T>;
  const Levels lv = level_table(shapes, starts, s.L, levels_in_shared);
  bool accumulate = true;
  double scale = 1;
  if constexpr (kDet) {
    int e = 0;
    accumulate = fixed_point_exponent<A>(maxima, fixed_bits, &e);  // false: the last kernel writes NaN
    scale = ldexp(1.0, e);
  }
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  const int64_t total = s.B * s.Q * s.H, HD = s.H * s.D, LP = s.L * s.P;
  // bqh is the same in all lanes of a warp, and so is every footprint: the shuffles see full warps.
  for (int64_t bqh = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; bqh < total; bqh += warps) {
    const int64_t h = bqh % s.H, b = bqh / (s.Q * s.H);
    const int64_t vofs = b * s.S * HD + h * s.D;  // (row r, channel d) at vofs + r * HD + d
    const T* vb = value + vofs;
    const T* g = grad_out + bqh * s.D;
    const T* sl = loc + bqh * LP * 2;
    const T* aw = attn + bqh * LP;
    T* gl = grad_loc + bqh * LP * 2;
    T* ga = grad_attn + bqh * LP;
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t hl = lv.hw[2 * l], wl = lv.hw[2 * l + 1], st = lv.start[l];
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t lp = l * s.P + p;
        Footprint<A> f;
        if (!footprint<A>(ldg_acc(sl + 2 * lp), ldg_acc(sl + 2 * lp + 1), hl, wl, st, s.S, f)) {
          if (lane == 0) {
            store(gl + 2 * lp, A(0));
            store(gl + 2 * lp + 1, A(0));
            store(ga + lp, A(0));
          }
          continue;
        }
        const A a = ldg_acc(aw + lp);
        A wc[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) wc[c] = a * f.cw[c];
        A s_attn = 0, s_x = 0, s_y = 0;
        for (int64_t d = lane; d < s.D; d += kWarp) {
          const A gd = ldg_acc(g + d);
          A v[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) v[c] = f.row[c] >= 0 ? ldg_acc(vb + f.row[c] * HD + d) : A(0);
          s_attn += gd * (f.cw[0] * v[0] + f.cw[1] * v[1] + f.cw[2] * v[2] + f.cw[3] * v[3]);
          s_x += gd * (f.hy * (v[1] - v[0]) + f.ly * (v[3] - v[2]));
          s_y += gd * (f.hx * (v[2] - v[0]) + f.lx * (v[3] - v[1]));
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (f.row[c] < 0) continue;
            const int64_t idx = vofs + f.row[c] * HD + d;
            const A contrib = wc[c] * gd;
            if constexpr (kDet) {
              if (accumulate)  // |contrib * scale| <= ~2^(62 - bits): llrint cannot overflow
                atomicAdd(grad_value_fixed + idx,
                          static_cast<unsigned long long>(llrint(static_cast<double>(contrib) * scale)));
            } else {
              atomic_add(grad_value + idx, contrib);
            }
          }
        }
        for (int off = kWarp / 2; off > 0; off /= 2) {
          s_attn += __shfl_xor_sync(0xffffffffu, s_attn, off);
          s_x += __shfl_xor_sync(0xffffffffu, s_x, off);
          s_y += __shfl_xor_sync(0xffffffffu, s_y, off);
        }
        if (lane == 0) {
          store(ga + lp, s_attn);
          store(gl + 2 * lp, a * s_x * static_cast<A>(wl));
          store(gl + 2 * lp + 1, a * s_y * static_cast<A>(hl));
        }
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Levels in shared memory when few enough; the dynamic shared-memory size to launch with.
bool levels_in_shared(const MsdaShape& s) { return s.L > 0 && s.L <= kMaxSharedLevels; }
size_t level_smem_bytes(const MsdaShape& s) {
  return levels_in_shared(s) ? static_cast<size_t>(3 * s.L) * sizeof(int64_t) : 0;
}

// bits = ceil(log2(C + 1)) with C = 4 * Q * L * P, the most contributions one grad_value element receives.
int fixed_point_bits(const MsdaShape& s) {
  const double C = 4.0 * static_cast<double>(s.Q) * static_cast<double>(s.L) * static_cast<double>(s.P);
  int k = 0;
  while (k < 62 && std::ldexp(1.0, k) < C + 1) ++k;
  return k;
}

}  // namespace
}  // namespace cuda

int ms_deform_attn_fwd_cuda(DType dt, const void* value, const int64_t* spatial_shapes, const int64_t* level_start,
                            const void* sampling_locations, const void* attention_weights, void* out,
                            const MsdaShape& s, void* stream) {
  using namespace cuda;
  if (s.B == 0 || s.Q == 0 || s.H == 0 || s.D == 0) return 0;
  const bool shared = levels_in_shared(s);
  const size_t smem = level_smem_bytes(s);
  return dispatch_floating(dt, [&](auto tag) -> int {
    using T = decltype(tag);
    const int64_t bqh = s.B * s.Q * s.H;
    if (s.D % vec_width<T>() == 0 && aligned16(value) && aligned16(out)) {
      msda_fwd_kernel<T, true><<<blocks_for(bqh * (s.D / vec_width<T>())), kThreads, smem, st(stream)>>>(
          cp<T>(value), spatial_shapes, level_start, cp<T>(sampling_locations), cp<T>(attention_weights),
          mp<T>(out), s, shared);
    } else {
      msda_fwd_kernel<T, false><<<blocks_for(bqh * s.D), kThreads, smem, st(stream)>>>(
          cp<T>(value), spatial_shapes, level_start, cp<T>(sampling_locations), cp<T>(attention_weights),
          mp<T>(out), s, shared);
    }
    DETRCORE_CUDA_CHECK_LAUNCH();
    return 0;
  });
}

// Deterministic: [alignment slack][maxima: 2 x uint64][fixed-point accumulators: B*S*H*D x int64]. Nothing is
// needed when grad_value is empty (there is nothing to accumulate) or without `deterministic`.
int64_t ms_deform_attn_bwd_cuda_workspace_bytes(DType dt, const MsdaShape& s, bool deterministic) {
  (void)dt;
  const int64_t n = s.B * s.S * s.H * s.D;
  if (!deterministic || n == 0) return 0;
  return cuda::kWorkspaceAlign + cuda::kFixedHeaderBytes + n * static_cast<int64_t>(sizeof(unsigned long long));
}

int ms_deform_attn_bwd_cuda(DType dt, const void* value, const int64_t* spatial_shapes, const int64_t* level_start,
                            const void* sampling_locations, const void* attention_weights, const void* grad_out,
                            void* grad_value_acc, void* grad_sampling_locations, void* grad_attention_weights,
                            const MsdaShape& s, bool deterministic, void* workspace, void* stream) {
  using namespace cuda;
  const int64_t n_val = s.B * s.S * s.H * s.D, n_bqh = s.B * s.Q * s.H, LP = s.L * s.P;
  // With an empty grad_value no corner is ever accumulated, so both paths coincide (and are deterministic).
  const bool det = deterministic && n_val > 0;
  if (det && workspace == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const bool shared = levels_in_shared(s);
  const size_t smem = level_smem_bytes(s);
  const int bits = fixed_point_bits(s);
  return dispatch_floating(dt, [&](auto tag) -> int {
    using T = decltype(tag);
    using A = acc_t<T>;
    const cudaStream_t strm = st(stream);
    unsigned long long* maxima = nullptr;
    unsigned long long* fixed = nullptr;
    if (det) {
      const uintptr_t base = (reinterpret_cast<uintptr_t>(workspace) + (kWorkspaceAlign - 1)) &
                             ~static_cast<uintptr_t>(kWorkspaceAlign - 1);
      maxima = reinterpret_cast<unsigned long long*>(base);
      fixed = maxima + kFixedHeaderBytes / sizeof(unsigned long long);
      DETRCORE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
          maxima, 0, static_cast<size_t>(kFixedHeaderBytes) + static_cast<size_t>(n_val) * sizeof(unsigned long long),
          strm));
      // Without samples there are no contributions: the maxima stay 0 and grad_value comes out zero.
      const int64_t ng = n_bqh * s.D, na = n_bqh * LP, n = ng > na ? ng : na;
      if (n_bqh > 0 && LP > 0) {
        const unsigned int blocks = blocks_for(n) < kMaxReduceBlocks ? blocks_for(n) : kMaxReduceBlocks;
        absmax_kernel<T><<<blocks, kThreads, 0, strm>>>(cp<T>(grad_out), ng, cp<T>(attention_weights), na, maxima);
        DETRCORE_CUDA_CHECK_LAUNCH();
      }
    } else if (n_val > 0) {
      DETRCORE_CUDA_RETURN_IF_ERROR(
          cudaMemsetAsync(grad_value_acc, 0, static_cast<size_t>(n_val) * sizeof(A), strm));
    }
    if (n_bqh > 0 && LP > 0) {
      const auto kernel = det ? msda_bwd_kernel<T, true> : msda_bwd_kernel<T, false>;
      kernel<<<blocks_for(n_bqh * kWarp), kThreads, smem, strm>>>(
          cp<T>(value), spatial_shapes, level_start, cp<T>(sampling_locations), cp<T>(attention_weights),
          cp<T>(grad_out), mp<A>(grad_value_acc), fixed, maxima, bits, mp<T>(grad_sampling_locations),
          mp<T>(grad_attention_weights), s, shared);
      DETRCORE_CUDA_CHECK_LAUNCH();
    }
    if (det) {
      fixed_to_float_kernel<A><<<blocks_for(n_val), kThreads, 0, strm>>>(fixed, maxima, bits, mp<A>(grad_value_acc),
                                                                         n_val);
      DETRCORE_CUDA_CHECK_LAUNCH();
    }
    return 0;
  });
}

}  // namespace detrcore
