"""Position encodings of feature maps: normalised sine (DETR, Deformable DETR) and learned row/column tables."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of each position's (y, x), from the padding mask, `2 * num_pos_feats` channels.

    With `normalize`, coordinates are the cumulative count of valid pixels, shifted by `offset`, divided by the
    image's valid extent and scaled to [0, scale]: DETR uses offset 0 (y / (y_last + eps) * 2pi), Deformable DETR
    offset -0.5 ((y - 0.5) / (y_last + eps) * 2pi).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.num_pos_feats, self.temperature, self.normalize = num_pos_feats, temperature, normalize
        self.scale, self.offset, self.eps = scale, offset, eps

    def forward(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """mask [B, H, W] (True on padding) -> [B, 2 * num_pos_feats, H, W]."""
        not_mask = (~mask).to(torch.float32)
        y = not_mask.cumsum(1)  # [B, H, W]
        x = not_mask.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (i // 2) / self.num_pos_feats)  # [F]
        px, py = x[..., None] / dim_t, y[..., None] / dim_t  # [B, H, W, F]
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2).to(dtype)  # [B, 2F, H, W]


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: a table of `max_size` rows and columns, `2 * num_pos_feats` channels."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        B, H, W = mask.shape
        if H > self.row_embed.num_embeddings or W > self.col_embed.num_embeddings:
            raise ValueError(
                f"feature map {H}x{W} exceeds the learned position table ({self.row_embed.num_embeddings} "
                "positions per side): use the sine encoding or a larger max_size"
            )
        x = self.col_embed(torch.arange(W, device=mask.device))  # [W, F]
        y = self.row_embed(torch.arange(H, device=mask.device))  # [H, F]
        pos = torch.cat([x[None].expand(H, -1, -1), y[:, None].expand(-1, W, -1)], dim=-1)  # [H, W, 2F]
        return pos.permute(2, 0, 1)[None].expand(B, -1, -1, -1).to(dtype)
