"""DETR and Deformable DETR: backbone + position encoding + transformer + prediction heads.

Both take `images [B, 3, H, W]` (already normalised) and `mask [B, H, W]` (True on padding; None: no padding)
and return a dict with `pred_logits [B, Q, C']`, `pred_boxes [B, Q, 4]` (normalised cxcywh), `aux_outputs` (one
dict per earlier decoder layer) and, for two-stage, `enc_outputs`. C' = num_classes + 1 for DETR (the last logit is
"no object"), num_classes for Deformable DETR (sigmoid classification).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detrcore.nn import Conv2d, Linear

from .backbone import Backbone, mask_at
from .deformable_transformer import DeformableTransformer, refine_boxes
from .neck import PAN
from .transformer import MLP, Transformer, clones


def _default_mask(images: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
    if mask.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"mask must be [B, H, W] = {(images.shape[0], *images.shape[-2:])}, got {tuple(mask.shape)}")
    return mask


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")


class DETR(nn.Module):
    def __init__(self, backbone: Backbone, position_encoding: nn.Module, transformer: Transformer, num_classes: int,
                 num_queries: int = 100, aux_loss: bool = True):
        super().__init__()
        d = transformer.decoder.norm.normalized_shape[0]
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.backbone, self.position_encoding, self.transformer = backbone, position_encoding, transformer
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], d, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = Linear(d, num_classes + 1)  # + the no-object class, always last
        self.bbox_embed = MLP(d, d, 4, 3)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict:
        _check_images(images)
        mask = _default_mask(images, mask)
        feat, m = self.backbone(images, mask)[-1]
        pos = self.position_encoding(m, feat.dtype)
        hs = self.transformer(self.input_proj(feat), m, self.query_embed.weight, pos)  # [L, B, Q, C]
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        out["aux_outputs"] = ([{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
                              if self.aux_loss else [])
        return out


class DeformableDETR(nn.Module):
    """Deformable DETR with optional iterative box refinement, two-stage proposals, the LW-DETR box
    reparameterisation and a PAN neck.

    Without refinement the per-layer heads are one shared module (as the paper); with it each decoder layer has
    its own heads and the decoder refines its references with them. Two-stage turns refinement on (the original
    code crashes without it) and adds one more head pair for the encoder proposals.
    """

    def __init__(self, backbone: Backbone, position_encoding: nn.Module, transformer: DeformableTransformer,
                 num_classes: int, num_queries: int = 300, num_feature_levels: int = 4, aux_loss: bool = True,
                 with_box_refine: bool = False, two_stage: bool = False, box_reparam: bool = False,
                 neck: str | None = None):
        super().__init__()
        d = transformer.d_model
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.with_box_refine = with_box_refine or two_stage
        self.two_stage, self.box_reparam = two_stage, box_reparam
        self.backbone, self.position_encoding, self.transformer = backbone, position_encoding, transformer
        channels = list(backbone.num_channels)
        self.neck = PAN(channels) if neck == "pan" else None
        if neck not in (None, "pan"):
            raise ValueError(f"unknown neck {neck!r}; choose None or 'pan'")
        if num_feature_levels < len(channels):
            raise ValueError(f"num_feature_levels ({num_feature_levels}) < backbone levels ({len(channels)})")
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in channels]
        in_ch = channels[-1]
        for _ in range(num_feature_levels - len(channels)):  # extra levels: 3x3 stride-2 convs on raw C5
            # detrcore's Conv2d: as unfold + matmul when the output is small and the weight large (C5 -> d)
            proj.append(nn.Sequential(Conv2d(in_ch, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * d)  # [query position | target]

        class_embed, bbox_embed = Linear(d, num_classes), MLP(d, d, 4, 3)
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)
        num_layers = len(transformer.decoder.layers)
        num_pred = num_layers + 1 if two_stage else num_layers
        if self.with_box_refine:
            self.class_embed, self.bbox_embed = clones(class_embed, num_pred), clones(bbox_embed, num_pred)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed, self.bbox_embed = class_embed, bbox_embed  # shared by every decoder layer
        if two_stage:
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])
        if box_reparam:  # heads predict (delta_c, log wh ratio): start at the reference box
            for head in (self.bbox_embed if self.with_box_refine else [self.bbox_embed]):
                nn.init.zeros_(head.layers[-1].bias)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict:
        _check_images(images)
        mask = _default_mask(images, mask)
        features = self.backbone(images, mask)  # [(feature, mask)] at strides 8, 16, 32
        feats = [f for f, _ in features]
        if self.neck is not None:
            feats = self.neck(feats)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        masks = [m for _, m in features]
        raw = features[-1][0]  # the extra levels start from the raw last backbone map (as the original)
        for proj in list(self.input_proj)[len(features):]:
            src = proj(raw)
            srcs.append(src)
            masks.append(mask_at(mask, src.shape[-2:]))
            raw = src
        pos = [self.position_encoding(m, s.dtype) for s, m in zip(srcs, masks)]

        out = self.transformer(srcs, masks, pos, None if self.two_stage else self.query_embed.weight,
                               bbox_embed=self.bbox_embed if self.with_box_refine else None,
                               class_embed=self.class_embed if self.two_stage else None)
        if self.with_box_refine:  # a head per decoder layer; the decoder already ran the box heads
            logits = [self.class_embed[lvl](hs) for lvl, hs in enumerate(out["hs"])]
            deltas = out["box_deltas"]
        else:  # heads shared by every layer: one product over all layers' [L, B, Q, C] (larger GEMMs)
            logits, deltas = list(self.class_embed(out["hs"]).unbind(0)), self.bbox_embed(out["hs"]).unbind(0)
        boxes = [refine_boxes(delta, ref, self.box_reparam) for delta, ref in zip(deltas, out["references"])]
        result = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        result["aux_outputs"] = ([{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
                                 if self.aux_loss else [])
        if self.two_stage:
            result["enc_outputs"] = {"pred_logits": out["enc_logits"], "pred_boxes": out["enc_boxes_unact"].sigmoid()}
        return result
