"""Building-block modules on top of detrcore.ops (the models package composes them)."""
from .attention import MultiheadAttention
from .dropout import Dropout
from .conv import Conv2d
from .ffn import feed_forward
from .onednn_linear import Linear, linear
from .ms_deform_attn import MSDeformAttn, TokenPacking

__all__ = ["Conv2d", "Dropout", "Linear", "MSDeformAttn", "MultiheadAttention", "TokenPacking", "feed_forward", "linear"]
