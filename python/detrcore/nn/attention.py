"""nn.MultiheadAttention whose attention-weight dropout, in training on the CPU, is detrcore's native dropout (and
whose projections are detrcore.nn.linear: oneDNN for float32 on the CPU).

torch's own path draws that dropout mask with bernoulli_, which on the CPU costs more than the two attention
matmuls it sits between (8 ms for DETR's 2 x 8 x 300 x 300 decoder weights on 2 threads, vs < 1 ms). Parameters,
names and results are those of nn.MultiheadAttention (checkpoints load unchanged); everything this path does
not cover (need_weights, attn_mask, float padding masks, causal, bias_k/v, unequal q/k/v sizes, eval mode,
CUDA) is torch's forward.

Between the projections, float32 / float64 in eager mode run the native attention kernel (`_C.attention_forward`
/ `_backward`): scores, masked softmax, dropout and the weighted sum of values in one pass per query row, reading
q, k and v as the projections wrote them (no head transposes), the dropout mask regenerated in the backward from
the same counter-based stream as `detrcore.ops.dropout` (the same mask for the same seed). It keeps the softmax
[B, H, Lq, Lk] for the backward and nothing else. bfloat16 (autocast), torch.compile and torch.func transforms take
the torch ops below (`_torch_attention`), which compute the same function.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detrcore.ops import _lib, dropout
from detrcore.ops._lib import _C

from .onednn_linear import linear


class MultiheadAttention(nn.MultiheadAttention):
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not self._native_dropout_applies(query, key_padding_mask, need_weights, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        B, Lq, E = query.shape
        Lk, H = key.shape[1], self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention (DETR's q = k = tgt + pos): both projections in one product
            # One split of the packed parameters (its backward concatenates the two gradients; slicing and chunking
            # them separately zero-filled two full-size gradients and added them).
            (w_qk, wv), (b_qk, bv) = w.split([2 * E, E]), (None, None) if b is None else b.split([2 * E, E])
            q, k = linear(query, w_qk, b_qk).split(E, -1)
        else:
            (wq, wk, wv), (bq, bk, bv) = w.chunk(3), (None, None, None) if b is None else b.chunk(3)
            q, k = linear(query, wq, bq), linear(key, wk, bk)
        v = linear(value, wv, bv)
        if q.dtype in (torch.float32, torch.float64) and _lib.eager_fast_path(q, k, v):
            seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)  # as detrcore.ops.dropout draws it
            out = _NativeAttention.apply(q, k, v, key_padding_mask, H, float(self.dropout), int(seed))
        else:
            out = _torch_attention(q, k, v, key_padding_mask, H, self.dropout)
        return linear(out, self.out_proj.weight, self.out_proj.bias), None

    def _native_dropout_applies(self, query: Tensor, key_padding_mask: Tensor | None, need_weights: bool, attn_mask,
                                is_causal: bool) -> bool:
        return (self.training and self.dropout > 0.0 and not need_weights and attn_mask is None and not is_causal
                and (key_padding_mask is None or key_padding_mask.dtype == torch.bool) and self.batch_first
                and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
                and query.dim() == 3 and query.device.type == "cpu"
                and query.dtype in (torch.float32, torch.float64, torch.bfloat16))


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, heads: int, p: float,
                     seed: int | None = None) -> Tensor:
    """softmax((q * d^-0.5) k^T, padded keys -inf) with dropout p, times v, per head: [B, L, E] -> [B, Lq, E].
    With `seed`, the dropout mask the native kernel draws from it (differentiable to any order in q, k, v)."""
    B, Lq, E = q.shape
    Lk, d = k.shape[1], E // heads
    q = q.reshape(B, Lq, heads, d).transpose(1, 2)  # [B, H, Lq, d]
    k = k.reshape(B, Lk, heads, d).transpose(1, 2)
    v = v.reshape(B, Lk, heads, d).transpose(1, 2)
    logits = (q * (d**-0.5 if d else 1.0)) @ k.transpose(-2, -1)  # [B, H, Lq, Lk]
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if seed is None:
        attn = dropout(logits.softmax(-1), p, True)
    else:  # keep / (1 - p) or 0 per weight, from the native kernel's stream
        keep = logits.new_empty(logits.shape)
        _C.dropout(torch.ones_like(keep), keep, seed, p, False, num_threads=_lib.num_threads())
        attn = logits.softmax(-1) * keep
    return (attn @ v).transpose(1, 2).reshape(B, Lq, E)


def _channels_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


class _NativeAttention(torch.autograd.Function):
    """_torch_attention(q, k, v, mask, heads, p) through the native kernels; q, k, v [B, L, E] may be strided views
    (slices of one projection's output) as long as their channels are contiguous."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, heads: int, p: float,
                seed: int) -> Tensor:
        mask = None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)
        B, Lq, E = q.shape
        out = q.new_empty(B, Lq, E)
        attn = q.new_empty(B, heads, Lq, k.shape[1])
        scale = (E // heads) ** -0.5 if E else 1.0  # (no channels: nothing is scaled)
        _C.attention_forward(*(_channels_contiguous(t.detach()) for t in (q, k, v)), mask, heads, scale, seed, p, out,
                             attn, num_threads=_lib.num_threads())
        ctx.save_for_backward(q, k, v, attn)
        ctx.call = (mask, heads, scale, seed, p)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, attn = ctx.saved_tensors
        mask, heads, scale, seed, p = ctx.call
        if torch.is_grad_enabled():  # create_graph=True: the torch ops, differentiable (same function, same mask)
            out = _torch_attention(q, k, v, None if mask is None else mask.bool(), heads, p, seed)
            return _lib.create_graph_grads(out, (q, k, v), ctx.needs_input_grad[:3], grad) + (None, None, None, None)
        grad = grad.contiguous()
        gq, gk, gv = torch.empty_like(grad), k.new_empty(k.shape), v.new_empty(v.shape)
        _C.attention_backward(*(_channels_contiguous(t.detach()) for t in (q, k, v)), mask, heads, scale, seed, p,
                              grad, attn, gq, gk, gv, num_threads=_lib.num_threads())
        return gq, gk, gv, None, None, None, None
