"""Building-block modules on top of detrcore.ops (the models package composes them)."""
from .attention import MultiheadAttention
from .dropout import Dropout
from .ms_deform_attn import MSDeformAttn, TokenPacking

__all__ = ["Dropout", "MSDeformAttn", "MultiheadAttention", "TokenPacking"]
