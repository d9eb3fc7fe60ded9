"""nn.Dropout over `detrcore.ops.dropout` (native on the CPU), with an optional fused ReLU in front."""
from __future__ import annotations

from torch import Tensor, nn

from detrcore.ops import dropout


class Dropout(nn.Module):
    """`nn.Dropout(p)`; with `relu=True`, `nn.Dropout(p)(F.relu(x))` in one pass. No parameters or buffers."""

    def __init__(self, p: float = 0.5, relu: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p, self.relu = float(p), relu

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, relu=self.relu)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", relu=True" if self.relu else "")
