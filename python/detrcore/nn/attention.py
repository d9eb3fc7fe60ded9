"""nn.MultiheadAttention whose attention-weight dropout, in training on the CPU, is detrcore's native dropout (and
whose projections are detrcore.nn.linear: oneDNN for float32 on the CPU).

torch's own path draws that dropout mask with bernoulli_, which on the CPU costs more than the two attention
matmuls it sits between (8 ms for DETR's 2 x 8 x 300 x 300 decoder weights on 2 threads, vs < 1 ms). Parameters,
names and results are those of nn.MultiheadAttention (checkpoints load unchanged); everything this path does
not cover (need_weights, attn_mask, float padding masks, causal, bias_k/v, unequal q/k/v sizes, eval mode,
CUDA) is torch's forward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detrcore.ops import dropout

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
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        wq, wk, wv = w.chunk(3)
        if query is key:  # self-attention (DETR's q = k = tgt + pos): both projections in one product
            q, k = linear(query, w[: 2 * E], None if b is None else b[: 2 * E]).split(E, -1)
        else:
            q, k = linear(query, wq, bq), linear(key, wk, bk)
        q = q.view(B, Lq, H, -1).transpose(1, 2)  # [B, H, Lq, d]
        k = k.view(B, Lk, H, -1).transpose(1, 2)
        v = linear(value, wv, bv).view(B, Lk, H, -1).transpose(1, 2)
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, Lq, Lk]
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = dropout(logits.softmax(-1), self.dropout, True)
        out = (attn @ v).transpose(1, 2).reshape(B, Lq, E)
        return linear(out, self.out_proj.weight, self.out_proj.bias), None

    def _native_dropout_applies(self, query: Tensor, key_padding_mask: Tensor | None, need_weights: bool, attn_mask,
                                is_causal: bool) -> bool:
        return (self.training and self.dropout > 0.0 and not need_weights and attn_mask is None and not is_causal
                and (key_padding_mask is None or key_padding_mask.dtype == torch.bool) and self.batch_first
                and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
                and query.dim() == 3 and query.device.type == "cpu"
                and query.dtype in (torch.float32, torch.float64, torch.bfloat16))
