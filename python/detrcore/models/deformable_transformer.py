"""Deformable DETR's transformer: multi-scale deformable attention in the encoder and in the decoder's
cross-attention, iterative box refinement and two-stage query selection as small named functions.

Module names follow the official implementation (self_attn / cross_attn, norm1..3, level_embed,
reference_points, enc_output, pos_trans, ...) so its checkpoints map onto this one directly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detrcore.nn import (Dropout, Linear, MSDeformAttn, MultiheadAttention, TokenPacking, dropout_add_norm,
                         feed_forward)
from detrcore.ops import inverse_sigmoid

from .transformer import clones, with_pos


def valid_ratio(mask: Tensor) -> Tensor:
    """mask [B, H, W] -> [B, 2]: the (w, h) fraction of the map that is not padding."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
    valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
    return torch.stack([valid_w / W, valid_h / H], -1)


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """The centres of every position of every level, normalised by the valid extent of its own level, then
    expressed on every level: [B, S, L, 2]."""
    refs = []
    device = valid_ratios.device
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
        ry = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # [B, hw]
        rx = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((rx, ry), -1))  # [B, hw, 2]
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]


def proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of unnormalised (pre-sigmoid) proposal boxes [B, K, 4] -> [B, K, 4 * num_pos_feats]."""
    i = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * (i // 2) / num_pos_feats)
    pos = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t  # [B, K, 4, F]
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


def proposal_boxes(padding_mask: Tensor, spatial_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Two-stage proposals: one box per encoder position (its cell centre, size 0.05 * 2^level), in
    inverse-sigmoid space. Returns (proposals [B, S, 4], +inf at padded or near-border positions; keep [B, S],
    False at those positions)."""
    B = padding_mask.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        m = padding_mask[:, start : start + h * w].view(B, h, w)
        valid_h, valid_w = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=torch.float32, device=m.device),
                                torch.linspace(0, w - 1, w, dtype=torch.float32, device=m.device), indexing="ij")
        grid = torch.stack([xs, ys], -1)  # [h, w, 2]
        scale = torch.stack([valid_w, valid_h], 1).view(B, 1, 1, 2)
        grid = (grid[None].expand(B, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)  # [B, S, 4]
    keep = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask
    return torch.log(proposals / (1 - proposals)).masked_fill(~keep[..., None], float("inf")), keep


def refine_boxes(delta: Tensor, reference: Tensor, box_reparam: bool) -> Tensor:
    """Iterative refinement: the new box from a head's output `delta` and the current `reference` (normalised
    cxcywh, or (x, y) for the first two-point references).

    Standard: sigmoid(delta + inverse_sigmoid(reference)) (only the centre is refined from a point).
    box_reparam (LW-DETR / Plain-DETR): centre = delta_c * ref_wh + ref_c, wh = exp(delta_wh) * ref_wh, no sigmoid.
    """
    if box_reparam:
        if reference.shape[-1] != 4:
            raise ValueError("box_reparam needs box references (two-stage or box queries)")
        centre = delta[..., :2] * reference[..., 2:] + reference[..., :2]
        wh = delta[..., 2:].exp() * reference[..., 2:]
        return torch.cat([centre, wh], -1)
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1, self.linear2 = Linear(d_model, d_ffn), Linear(d_ffn, d_model)
        self.act_dropout, self.dropout3 = Dropout(dropout, relu=True), Dropout(dropout)  # act_dropout: ReLU + dropout
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, packing=None):
        """src, pos [B, S, C] and reference_points [B, S, L, 2]; or with `packing`, the valid positions only:
        [N, C] and [N, L, 2]."""
        attn = self.self_attn(with_pos(src, pos), reference_points, src, spatial_shapes, level_start_index,
                              padding_mask, packing)
        src = dropout_add_norm(src, attn, self.dropout1, self.norm1)  # norm1(src + dropout1(attn))
        return dropout_add_norm(src, feed_forward(src, self.linear1, self.act_dropout, self.linear2), self.dropout3,
                                self.norm2)


class DeformableDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = Dropout(dropout), nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2, self.norm2 = Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1, self.linear2 = Linear(d_model, d_ffn), Linear(d_ffn, d_model)
        self.act_dropout, self.dropout4 = Dropout(dropout, relu=True), Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask,
                packing=None):
        """src: the encoder's memory [B, S, C], or with `packing` its valid positions [N, C]."""
        q = k = with_pos(tgt, query_pos)
        tgt = dropout_add_norm(tgt, self.self_attn(q, k, tgt, need_weights=False)[0], self.dropout2, self.norm2)
        attn = self.cross_attn(with_pos(tgt, query_pos), reference_points, src, spatial_shapes, level_start_index,
                               padding_mask, packing)
        tgt = dropout_add_norm(tgt, attn, self.dropout1, self.norm1)
        return dropout_add_norm(tgt, feed_forward(tgt, self.linear1, self.act_dropout, self.linear2), self.dropout4,
                                self.norm3)


class DeformableTransformer(nn.Module):
    """forward(srcs, masks, pos_embeds, query_embed, bbox_embed, class_embed) with per-level srcs [B, C, h, w],
    masks [B, h, w], pos_embeds [B, C, h, w]; query_embed [Q, 2C] (None for two-stage); bbox_embed: the per-layer
    box heads for refinement (None: no refinement); class_embed: the heads (two-stage uses the last for proposals).

    Returns a dict: hs [L, B, Q, C] (decoder outputs), references [L, B, Q, 2|4] (the reference each layer's head
    refines: the initial one, then each layer's refined boxes), and for two-stage enc_logits / enc_boxes_unact.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 dec_n_points: int = 4, enc_n_points: int = 4, two_stage: bool = False,
                 two_stage_num_proposals: int = 300, box_reparam: bool = False, skip_padding: bool = True):
        super().__init__()
        self.d_model, self.two_stage, self.num_proposals = d_model, two_stage, two_stage_num_proposals
        self.box_reparam = box_reparam
        # Run the encoder on the non-padded positions only (TokenPacking): nothing reads what it computes at a
        # padded one, so the results are the same with less work; False computes every position, as the original.
        self.skip_padding = skip_padding
        self.encoder = nn.Module()
        self.encoder.layers = clones(DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                            nhead, enc_n_points), num_encoder_layers)
        self.decoder = nn.Module()
        self.decoder.layers = clones(DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                            nhead, dec_n_points), num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output, self.enc_output_norm = Linear(d_model, d_model), nn.LayerNorm(d_model)
            self.pos_trans, self.pos_trans_norm = Linear(2 * d_model, 2 * d_model), nn.LayerNorm(2 * d_model)
        else:
            self.reference_points = Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs, masks, pos_embeds, query_embed, bbox_embed=None, class_embed=None) -> dict:
        # flatten the levels: [B, S, C]
        spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) for p in pos_embeds], 1)  # [B, S, C], + level_embed below
        shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=src.device)  # [L, 2]
        sizes = shapes.prod(1)
        level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)  # [B, L, 2]

        enc_refs = encoder_reference_points(spatial_shapes, valid_ratios).to(src.dtype)
        packing = TokenPacking(mask, spatial_shapes) if self.skip_padding and bool(mask.any()) else None
        # Each position's level embedding added by its level index: its gradient is summed straight into the [L, C]
        # table (added to the [B, S, C] positions and packed, it took a zero-filled [B * S, C] scatter and per-level
        # sums over the batch). Same values.
        level = torch.repeat_interleave(torch.arange(len(spatial_shapes), device=src.device), sizes)  # [S]
        if packing is not None:  # memory: [N, C], the valid positions
            memory, pos, enc_refs = packing.pack(src), packing.pack(pos), packing.pack(enc_refs)
            pos = pos + self.level_embed.index_select(0, packing.pack(level.expand(src.shape[0], -1)))
        else:
            memory = src
            pos = pos + self.level_embed.index_select(0, level)
        for layer in self.encoder.layers:
            memory = layer(memory, pos, enc_refs, shapes, level_start, mask, packing)

        B, C = src.shape[0], src.shape[2]
        out = {}
        if self.two_stage:
            tgt, query_pos, reference = self._select_proposals(memory, mask, spatial_shapes, bbox_embed, class_embed,
                                                               out, packing)
        else:
            query_pos, tgt = torch.split(query_embed, C, dim=1)
            query_pos, tgt = query_pos[None].expand(B, -1, -1), tgt[None].expand(B, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]

        hs, references, deltas = [], [], []
        output = tgt
        for lid, layer in enumerate(self.decoder.layers):
            ratios = torch.cat([valid_ratios, valid_ratios], -1) if reference.shape[-1] == 4 else valid_ratios
            output = layer(output, query_pos, reference[:, :, None] * ratios[:, None], memory, shapes, level_start,
                           mask, packing)
            references.append(reference)
            hs.append(output)
            if bbox_embed is not None:  # iterative refinement: the next layer starts from this layer's boxes
                deltas.append(bbox_embed[lid](output))
                reference = refine_boxes(deltas[-1], reference, self.box_reparam).detach()
        out["hs"] = torch.stack(hs)
        out["references"] = references
        if bbox_embed is not None:  # the box head's outputs per layer, for the predictions (not recomputed)
            out["box_deltas"] = deltas
        return out

    def _select_proposals(self, memory, mask, spatial_shapes, bbox_embed, class_embed, out, packing=None):
        """Two-stage: score every encoder position, keep the top-k as the decoder's reference boxes and queries.
        memory: [B, S, C], or the packed [N, C] of `packing`."""
        proposals, keep = proposal_boxes(mask, spatial_shapes)
        n = len(self.decoder.layers)
        if packing is None or memory.device.type != "cpu":  # (on a GPU the row lists below would synchronise)
            full = memory if packing is None else packing.unpack(memory)
            output_memory = self.enc_output_norm(self.enc_output(full.masked_fill(~keep[..., None], 0.0)))
            enc_logits, enc_deltas = class_embed[n](output_memory), bbox_embed[n](output_memory)
        else:
            # The heads on the kept positions only: every other one (padding, or too near the border) has zeroed
            # memory, so its outputs are those of a zero row, computed once and broadcast (its gradient is their
            # sum). The same values as over [B, S]; a padded batch skips the heads' work on its padding.
            B, S = mask.shape
            rows = packing.pack(keep).nonzero().squeeze(1)  # kept rows of the packed memory, in [B * S] order
            heads_in = torch.cat([memory.index_select(0, rows), memory.new_zeros(1, memory.shape[1])])
            output_memory = self.enc_output_norm(self.enc_output(heads_in))
            at = keep.flatten().nonzero().squeeze(1)  # their positions in [B * S]

            def spread(y):  # [R + 1, k] -> [B, S, k]: the zero row's outputs everywhere, the kept rows' at theirs
                return y[-1:].expand(B * S, -1).index_copy(0, at, y[:-1]).view(B, S, -1)

            enc_logits, enc_deltas = spread(class_embed[n](output_memory)), spread(bbox_embed[n](output_memory))
        enc_boxes_unact = enc_deltas + proposals
        topk = torch.topk(enc_logits[..., 0], self.num_proposals, dim=1)[1]  # ranked by the class-0 logit
        coords = torch.gather(enc_boxes_unact, 1, topk[..., None].expand(-1, -1, 4)).detach()
        reference = coords.sigmoid()
        query_pos, tgt = torch.split(self.pos_trans_norm(self.pos_trans(proposal_pos_embed(coords, self.d_model // 2))),
                                     self.d_model, dim=2)
        out["enc_logits"], out["enc_boxes_unact"] = enc_logits, enc_boxes_unact
        return tgt, query_pos, reference
