"""ModelConfig and build_model: every variant of the family from one typed config."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from torch import nn

from .backbone import Backbone, ResNetBackbone
from .deformable_transformer import DeformableTransformer
from .detr import DETR, DeformableDETR
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .transformer import Transformer

ARCHS = ("detr", "deformable_detr")
BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet_lite0")


@dataclass
class ModelConfig:
    """Configuration of a DETR-family detector. Defaults are Deformable DETR's (ResNet-50, 300 queries)."""

    arch: str = "deformable_detr"  # "detr" | "deformable_detr"
    # Object classes, NOT counting "no object". DETR adds one logit for it (the last); Deformable DETR uses
    # sigmoid scores and has none. COCO checkpoints use 91 (the largest category id + 1).
    num_classes: int = 91
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | efficientnet_lite0
    backbone_weights: str | None = None  # a local file; "package" = the weights shipped by the backbone's package
    dilation: bool = False  # DC5: dilated last stage (stride 16), DETR only
    train_backbone: bool = True  # ResNet: train layer2..4 (conv1/layer1 stay frozen); EfficientNet: train all
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int | None = None  # None: 2048 for DETR, 1024 for Deformable DETR
    dropout: float = 0.1
    num_queries: int | None = None  # None: 100 for DETR, 300 for Deformable DETR
    pre_norm: bool = False  # DETR: pre-LN transformer layers (the paper uses post-LN)
    position_embedding: str = "sine"  # "sine" | "learned"
    num_feature_levels: int = 4  # Deformable: backbone levels (strides 8/16/32) + extra stride-2 convs
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False  # implies with_box_refine (the original crashes without it)
    box_reparam: bool = False  # LW-DETR / Plain-DETR box parameterisation; needs two_stage
    neck: str | None = None  # None | "pan"
    aux_loss: bool = True
    # Deformable: the encoder computes only the non-padded positions (nothing reads the others; same results,
    # less work on padded batches). False computes every position, as the original code does.
    skip_padding: bool = True

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes counts object classes and must be >= 1, got {self.num_classes}")
        if self.hidden_dim % self.nheads or self.hidden_dim % 32:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads}) and 32")
        if self.position_embedding not in ("sine", "learned"):
            raise ValueError(f"position_embedding must be 'sine' or 'learned', got {self.position_embedding!r}")
        if self.arch == "detr" and (self.two_stage or self.with_box_refine or self.box_reparam or self.neck):
            raise ValueError("with_box_refine, two_stage, box_reparam and neck are Deformable DETR options")
        if self.arch == "deformable_detr" and self.dilation:
            raise ValueError("dilation (DC5) is a DETR option")
        if self.box_reparam and not self.two_stage:
            raise ValueError("box_reparam needs two_stage (box references)")
        if self.two_stage:
            self.with_box_refine = True

    @property
    def ffn(self) -> int:
        return self.dim_feedforward or (2048 if self.arch == "detr" else 1024)

    @property
    def queries(self) -> int:
        return self.num_queries or (100 if self.arch == "detr" else 300)

    @property
    def focal(self) -> bool:
        """Sigmoid focal classification (Deformable DETR) rather than softmax with a no-object class (DETR)."""
        return self.arch == "deformable_detr"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(**d)


def build_backbone(cfg: ModelConfig) -> Backbone:
    multi = cfg.arch == "deformable_detr"
    if cfg.backbone == "efficientnet_lite0":
        from .efficientnet import EfficientNetLite0Backbone

        weights = cfg.backbone_weights
        return EfficientNetLite0Backbone(weights=weights, freeze=not cfg.train_backbone)
    return ResNetBackbone(cfg.backbone, return_stages=(2, 3, 4) if multi else (4,), dilate_c5=cfg.dilation,
                          train_stages=(2, 3, 4) if cfg.train_backbone else (), weights=cfg.backbone_weights)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The detector described by cfg (random initialisation, backbone weights from cfg.backbone_weights)."""
    backbone = build_backbone(cfg)
    half = cfg.hidden_dim // 2
    if cfg.arch == "detr":
        pos = (PositionEmbeddingSine(half, normalize=True) if cfg.position_embedding == "sine"
               else PositionEmbeddingLearned(half))
        transformer = Transformer(cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.ffn, cfg.dropout,
                                  cfg.pre_norm)
        return DETR(backbone, pos, transformer, cfg.num_classes, cfg.queries, cfg.aux_loss)
    pos = (PositionEmbeddingSine(half, normalize=True, offset=-0.5, scale=2 * math.pi)
           if cfg.position_embedding == "sine" else PositionEmbeddingLearned(half))
    transformer = DeformableTransformer(cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.ffn,
                                        cfg.dropout, cfg.num_feature_levels, cfg.dec_n_points, cfg.enc_n_points,
                                        cfg.two_stage, cfg.queries, cfg.box_reparam,
                                        cfg.skip_padding)
    return DeformableDETR(backbone, pos, transformer, cfg.num_classes, cfg.queries, cfg.num_feature_levels,
                          cfg.aux_loss, cfg.with_box_refine, cfg.two_stage, cfg.box_reparam, cfg.neck)
