// Multi-head scaled dot-product attention with dropout on the attention weights, on the CPU, forward and backward
// in one kernel each (what nn.MultiheadAttention computes between its projections, in training):
//
//   a[b,h,i,:] = softmax_j(scale * <q[b,i,h,:], k[b,j,h,:]>, key j masked to -inf where kpm[b,j])
//   out[b,i,h,:] = sum_j keep(b,h,i,j) * a[b,h,i,j] / (1 - p) * v[b,j,h,:]
//
// keep(b,h,i,j) is the dropout decision of element ((b*H + h)*Lq + i)*Lk + j of the [B, H, Lq, Lk] weights drawn
// as detrcore's dropout draws it (dropout.h): the same mask `dropout(softmax(...), p)` with the same seed gives.
// The forward stores a (the softmax, before dropout) for the backward, which regenerates the mask. A row whose keys
// are all masked gives NaN, as torch's softmax does.
//
// Layout: q [B, Lq, H*D], k and v [B, Lk, H*D] with any batch and row strides (in elements) and head h's D channels
// contiguous at offset h*D: the projections' outputs as they are, slices of one [B, L, 3E] product included.
// out, grad_out, grad_q [B, Lq, H*D] and grad_k, grad_v [B, Lk, H*D] contiguous; attn [B, H, Lq, Lk] contiguous.
// T = float or double. Deterministic whatever the thread count (threads split (b, h) pairs; each owns its rows).
#pragma once
#include <cstdint>

namespace detrcore {

template <typename T>
struct AttnArgs {
  const T* q;
  int64_t q_bs, q_rs;
  const T* k;
  int64_t k_bs, k_rs;
  const T* v;
  int64_t v_bs, v_rs;
  const uint8_t* key_padding_mask;  // [B, Lk], nonzero = padded key; or null
  int64_t B, H, Lq, Lk, D;
  double scale;
  uint64_t seed;
  uint32_t threshold;  // drop when the 32-bit draw < threshold (0: no dropout)
  double keep_scale;   // 1 / (1 - p)
};

template <typename T>
void attention_fwd_cpu(const AttnArgs<T>& a, T* out, T* attn, int num_threads);

template <typename T>
void attention_bwd_cpu(const AttnArgs<T>& a, const T* grad_out, const T* attn, T* grad_q, T* grad_k, T* grad_v,
                       int num_threads);

}  // namespace detrcore
