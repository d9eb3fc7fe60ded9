"""Building-block modules on top of detrcore.ops (the models package composes them)."""
from .attention import MultiheadAttention
from .dropout import Dropout
from .conv import Conv2d
from .ffn import feed_forward
from .onednn_linear import Linear, linear
from .ms_deform_attn import MSDeformAttn, TokenPacking
from .residual import dropout_add_norm

__all__ = ["Conv2d", "Dropout", "Linear", "MSDeformAttn", "MultiheadAttention", "TokenPacking", "dropout_add_norm",
           "feed_forward", "linear"]
