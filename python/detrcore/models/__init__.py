"""DETR-family models, the Hungarian matcher, the set criterion and post-processing."""
from .backbone import FrozenBatchNorm2d, ResNetBackbone
from .config import ModelConfig, build_model
from .criterion import LossWeights, SetCriterion, sigmoid_focal_loss
from .detr import DETR, DeformableDETR
from .matcher import HungarianMatcher, MatchCost
from .official import load_official
from .postprocess import PostProcess

__all__ = [
    "ModelConfig", "build_model", "load_official", "DETR", "DeformableDETR", "ResNetBackbone", "FrozenBatchNorm2d",
    "HungarianMatcher", "MatchCost", "SetCriterion", "LossWeights", "sigmoid_focal_loss", "PostProcess",
]
