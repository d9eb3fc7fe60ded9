"""DETR's encoder-decoder transformer (post-LN as in the paper, or pre-LN), batch-first.

Module names follow the official implementation (self_attn, multihead_attn, linear1/2, norm1/2/3, decoder.norm)
so its checkpoints map onto this one directly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrcore.nn import Dropout, Linear, MultiheadAttention


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = Linear(d_model, dim_feedforward), Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.act_dropout, self.dropout1, self.dropout2 = Dropout(dropout, relu=True), Dropout(dropout), Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        x = self.norm1(src) if self.pre_norm else src
        q = k = with_pos(x, pos)
        src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=padding_mask, need_weights=False)[0])
        if not self.pre_norm:
            src = self.norm1(src)
        x = self.norm2(src) if self.pre_norm else src
        src = src + self.dropout2(self.linear2(self.act_dropout(self.linear1(x))))
        return src if self.pre_norm else self.norm2(src)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = Linear(d_model, dim_feedforward), Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.act_dropout, self.dropout1 = Dropout(dropout, relu=True), Dropout(dropout)
        self.dropout2, self.dropout3 = Dropout(dropout), Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_padding_mask: Tensor | None) -> Tensor:
        x = self.norm1(tgt) if self.pre_norm else tgt
        q = k = with_pos(x, query_pos)
        tgt = tgt + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
        if not self.pre_norm:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if self.pre_norm else tgt
        attn = self.multihead_attn(with_pos(x, query_pos), with_pos(memory, pos), memory,
                                   key_padding_mask=memory_padding_mask, need_weights=False)[0]
        tgt = tgt + self.dropout2(attn)
        if not self.pre_norm:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout3(self.linear2(self.act_dropout(self.linear1(x))))
        return tgt if self.pre_norm else self.norm3(tgt)


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.Module | None):
        super().__init__()
        self.layers, self.norm = clones(layer, num_layers), norm

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, padding_mask)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    """Returns every layer's output after the final LayerNorm: `[num_layers, B, Q, C]` (as the official code,
    which normalises the intermediate outputs too)."""

    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers, self.norm = clones(layer, num_layers), nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos, memory_padding_mask) -> Tensor:
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, memory_padding_mask)
            outs.append(self.norm(tgt))
        return torch.stack(outs)


class Transformer(nn.Module):
    """DETR's transformer: `forward(src [B,C,H,W], mask [B,H,W], query_embed [Q,C], pos [B,C,H,W])` returns the
    decoder outputs `[num_decoder_layers, B, Q, C]`."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, pre_norm: bool = False):
        super().__init__()
        self.encoder = Encoder(EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm), num_encoder_layers,
                               nn.LayerNorm(d_model) if pre_norm else None)
        self.decoder = Decoder(DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm), num_decoder_layers,
                               d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        B = src.shape[0]
        src = src.flatten(2).transpose(1, 2)  # [B, HW, C]
        pos = pos.flatten(2).transpose(1, 2)  # [B, HW, C]
        mask = mask.flatten(1)  # [B, HW]
        query_pos = query_embed[None].expand(B, -1, -1)  # [B, Q, C]
        memory = self.encoder(src, pos, mask)
        return self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos, mask)  # [L, B, Q, C]
