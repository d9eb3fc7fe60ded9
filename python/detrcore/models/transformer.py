"""DETR's encoder-decoder transformer (post-LN as in the paper, or pre-LN), batch-first.

Module names follow the official implementation (self_attn, multihead_attn, linear1/2, norm1/2/3, decoder.norm)
so its checkpoints map onto this one directly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrcore.nn import Dropout, Linear, MultiheadAttention, dropout_add_norm, feed_forward, linear
from detrcore.ops._lib import eager_fast_path


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (DETR's box head).

    In training on the CPU its backward runs over the rows whose output gradient is nonzero only (`_RowSparseMLP`):
    a box head's outputs reach the loss only at the queries matched to a target (L1 and GIoU terms), and its
    refined boxes are detached, so of Deformable DETR's 6 x 2 x 300 decoder rows (and a two-stage model's encoder
    rows, one per position) a handful get a gradient; the dense backward would run its products over all of them.
    Same gradients (the few rows' activations are recomputed); a double backward recomputes every row. Elsewhere
    (CUDA, where finding the rows would synchronise with the device; torch.compile, tracing, torch.func transforms,
    tensor subclasses; no gradient) the plain layers.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        params = [t for layer in self.layers for t in (layer.weight, layer.bias)]
        if (torch.is_grad_enabled() and x.device.type == "cpu"
                and (x.requires_grad or any(t is not None and t.requires_grad for t in params))
                and eager_fast_path(x)):  # not compiled, traced, under a torch.func transform or dispatch mode
            return _RowSparseMLP.apply(self, x, *params)
        return self._forward(x)

    def _forward(self, x: Tensor, params: list[Tensor | None] | None = None) -> Tensor:
        """The layers, with `params` (weight, bias per layer) in place of the modules' own when given."""
        for i, layer in enumerate(self.layers):
            w, b = (layer.weight, layer.bias) if params is None else params[2 * i : 2 * i + 2]
            x = linear(x, w, b)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _RowSparseMLP(torch.autograd.Function):
    """MLP forward without saved activations; backward over the rows whose output gradient has a nonzero (or NaN)
    element, their activations recomputed from the saved input under the forward's CPU autocast state (a backward
    called outside the autocast block recomputes in the forward's precision, as torch.utils.checkpoint does). Rows
    with an all-zero output gradient contribute exactly zero to every gradient, so the results are the dense
    backward's up to float summation order (one difference: a skipped row's non-finite activations cannot spread
    NaN through 0 x inf)."""

    @staticmethod
    def forward(ctx, mlp: MLP, x: Tensor, *params: Tensor | None) -> Tensor:
        ctx.mlp = mlp
        ctx.autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        ctx.save_for_backward(x, *params)
        return mlp._forward(x, list(params))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *params = ctx.saved_tensors
        wants = ctx.needs_input_grad[1:]  # x, then the parameters
        rows = None
        if torch.is_grad_enabled():  # create_graph=True: every row, differentiable through the saved tensors
            leaves, g = [x, *params], grad
        else:
            x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
            rows = g2.ne(0).any(1).nonzero().squeeze(1)  # NaN != 0: a NaN gradient propagates
            leaves = [x2.index_select(0, rows)] + [None if p is None else p.detach() for p in params]
            leaves = [None if t is None else t.requires_grad_(w) for t, w in zip(leaves, wants)]
            g = g2.index_select(0, rows)
        with torch.enable_grad(), torch.autocast("cpu", enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
            out = ctx.mlp._forward(leaves[0], leaves[1:])
        need = [t is not None and w for t, w in zip(leaves, wants)]
        got = iter(torch.autograd.grad(out, [t for t, n in zip(leaves, need) if n], g, create_graph=rows is None,
                                       allow_unused=True))
        grads = []
        for t, n in zip(leaves, need):
            gt = next(got) if n else None
            grads.append(torch.zeros_like(t) if n and gt is None else gt)
        if rows is not None and grads[0] is not None:
            grads[0] = x2.new_zeros(x2.shape).index_copy_(0, rows, grads[0]).view(x.shape)
        return (None, *grads)


def residual(x: Tensor, a: Tensor, dropout: Dropout, norm: nn.LayerNorm, pre_norm: bool) -> Tensor:
    """A sublayer's residual step: x + dropout(a) (pre-norm: the norm comes before the next sublayer), or post-norm
    norm(x + dropout(a)) (one fused node in CPU training: `detrcore.nn.dropout_add_norm`)."""
    return x + dropout(a) if pre_norm else dropout_add_norm(x, a, dropout, norm)


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
        src = residual(src, self.self_attn(q, k, x, key_padding_mask=padding_mask, need_weights=False)[0],
                       self.dropout1, self.norm1, self.pre_norm)
        x = self.norm2(src) if self.pre_norm else src
        return residual(src, feed_forward(x, self.linear1, self.act_dropout, self.linear2), self.dropout2, self.norm2,
                        self.pre_norm)


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
        tgt = residual(tgt, self.self_attn(q, k, x, need_weights=False)[0], self.dropout1, self.norm1, self.pre_norm)
        x = self.norm2(tgt) if self.pre_norm else tgt
        attn = self.multihead_attn(with_pos(x, query_pos), with_pos(memory, pos), memory,
                                   key_padding_mask=memory_padding_mask, need_weights=False)[0]
        tgt = residual(tgt, attn, self.dropout2, self.norm2, self.pre_norm)
        x = self.norm3(tgt) if self.pre_norm else tgt
        return residual(tgt, feed_forward(x, self.linear1, self.act_dropout, self.linear2), self.dropout3, self.norm3,
                        self.pre_norm)


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
