// Multi-scale deformable attention (MSDA), the core of Deformable DETR: the contract shared by the CPU kernels
// (ms_deform_attn.cpp) and the CUDA kernels (cuda/ms_deform_attn.cu).
//
// Tensors (all contiguous, row-major):
//   value               [B, S, H, D]        S = sum over levels of h_l * w_l
//   spatial_shapes      [L, 2] int64        (h_l, w_l) of each level
//   level_start         [L] int64           offset of level l in S (the exclusive cumsum of h_l * w_l)
//   sampling_locations  [B, Q, H, L, P, 2]  normalised (x, y); 0 and 1 are the outer edges of the feature map
//   attention_weights   [B, Q, H, L, P]
//   out                 [B, Q, H, D]        (the caller views it as [B, Q, H * D])
//
// out[b,q,h,:] = sum_{l,p} attention_weights[b,q,h,l,p] * bilinear(value level l of head h, at
//                (x * w_l - 0.5, y * h_l - 0.5))
// with grid_sample(align_corners=False, padding_mode="zeros") semantics: each of the four corners that falls
// outside the map contributes zero. Metadata is trusted to be consistent by the kernels except that every
// value index is bounds-checked against S (the CPU entry point in bindings.cpp validates it fully).
//
// coord_shapes (CPU, optional, [L, 2] int64, each at least spatial_shapes'): the maps are the top-left corners of
// larger maps of these sizes whose other positions are zero (an image's valid region in a padded batch, stored
// without its padding). Sampling locations are then normalised by coord_shapes (x * cw_l - 0.5) while only the
// stored (h_l, w_l) corners are read; the result equals sampling the zero-padded maps (their padded rows' value
// gradients are not formed). nullptr: coord_shapes = spatial_shapes.
//
// Backward: given grad_out [B, Q, H, D], write grad_value [B, S, H, D], grad_sampling_locations
// [B, Q, H, L, P, 2] and grad_attention_weights [B, Q, H, L, P]. Accumulation happens in float (double for
// double). A sample exactly on a cell boundary takes the gradient of the cell it is floored into, as
// grid_sample does.
#pragma once
#include <cstdint>

#include "tensor.h"

namespace detrcore {

struct MsdaShape {
  int64_t B, S, H, D, Q, L, P;
};

// ---- CPU (T = float or double) ----
// Threads split (batch, query) pairs in the forward; in the backward they split (batch, head) pairs, so no two
// threads ever write the same grad_value element: deterministic, no atomics.
template <typename T>
void ms_deform_attn_fwd_cpu(const T* value, const int64_t* spatial_shapes, const int64_t* level_start,
                            const T* sampling_locations, const T* attention_weights, T* out, const MsdaShape& s,
                            int num_threads, const int64_t* coord_shapes = nullptr);
template <typename T>
void ms_deform_attn_bwd_cpu(const T* value, const int64_t* spatial_shapes, const int64_t* level_start,
                            const T* sampling_locations, const T* attention_weights, const T* grad_out,
                            T* grad_value, T* grad_sampling_locations, T* grad_attention_weights, const MsdaShape& s,
                            int num_threads, const int64_t* coord_shapes = nullptr);

// The CPU kernels' AVX2 + FMA path (float, D in {16, 32, 64}) where the CPU has it:
// enable = 1 / 0 turns it on / off (on only where supported), -1 only asks. Returns whether it was on.
bool ms_deform_attn_cpu_simd(int enable);

// ---- CUDA (dtype f16, bf16, f32 or f64 for value, sampling_locations, attention_weights, out, grad_out,
// grad_sampling_locations, grad_attention_weights; spatial_shapes / level_start are int64 device arrays).
// Launch on `stream` on the current device, never synchronise, return a cudaError_t (0 = success).
int ms_deform_attn_fwd_cuda(DType dt, const void* value, const int64_t* spatial_shapes, const int64_t* level_start,
                            const void* sampling_locations, const void* attention_weights, void* out,
                            const MsdaShape& s, void* stream);

// grad_value_acc: a float32 [B, S, H, D] buffer (float64 when dt is f64) that the call zero-fills and then
// accumulates into; the caller casts it to value's dtype. workspace: at least
// ms_deform_attn_bwd_cuda_workspace_bytes(s, deterministic) bytes of device memory (may be null when that is 0).
// With `deterministic`, the result is bitwise reproducible run to run (no floating-point atomics).
int64_t ms_deform_attn_bwd_cuda_workspace_bytes(DType dt, const MsdaShape& s, bool deterministic);
int ms_deform_attn_bwd_cuda(DType dt, const void* value, const int64_t* spatial_shapes, const int64_t* level_start,
                            const void* sampling_locations, const void* attention_weights, const void* grad_out,
                            void* grad_value_acc, void* grad_sampling_locations, void* grad_attention_weights,
                            const MsdaShape& s, bool deterministic, void* workspace, void* stream);

}  // namespace detrcore
