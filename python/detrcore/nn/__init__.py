"""Building-block modules on top of detrcore.ops (the models package composes them)."""
from .ms_deform_attn import MSDeformAttn

__all__ = ["MSDeformAttn"]
