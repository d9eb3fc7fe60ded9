"""The multi-scale deformable attention module of Deformable DETR, on detrcore's native op.

Parameter names (sampling_offsets, attention_weights, value_proj, output_proj) and initialisation follow the
paper's official implementation, so its checkpoints load as they are.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detrcore.ops import ms_deform_attn, ms_deform_attn_packed
from detrcore.ops._lib import eager_fast_path as _eager_fast_path

from .onednn_linear import Linear, linear


class TokenPacking:
    """The non-padded positions of a batch of flattened maps, packed in batch order.

    Deformable attention never reads a padded position (its value is zeroed) and nothing reads a padded query's
    output, so an encoder can run its layers on the valid tokens alone: [N, C] instead of [B, S, C]. With the
    padding of a typical detection batch (images of different sizes padded to the largest) that is a fifth to a
    third less work per layer, with the same results at every valid position.

    Args:
        padding_mask: [B, S], True on padding. Reading the per-image counts synchronises once with the device.
        spatial_shapes: the (h, w) of the levels S flattens, if known. Where every image's valid positions on every
            level are a top-left rectangle (an image padded at the bottom and right, as DETR batches are), a
            packed value needs no unpacking: `value_shapes` ([B, L, 2] int64, CPU) then holds those rectangles'
            (h, w), for `detrcore.ops.ms_deform_attn_packed`. Otherwise (or not given, or a mask not on the CPU)
            it is None.
    """

    def __init__(self, padding_mask: Tensor, spatial_shapes: list[tuple[int, int]] | None = None):
        if padding_mask.dim() != 2 or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be a [B, S] bool tensor, got {padding_mask.dtype} "
                             f"{tuple(padding_mask.shape)}")
        valid = ~padding_mask
        self.batch, self.length = padding_mask.shape
        self.index = valid.flatten().nonzero().squeeze(1)  # [N] positions in the flattened [B * S]
        self.padding = padding_mask.flatten().nonzero().squeeze(1)  # the others
        self.counts = valid.sum(1).tolist()  # valid positions per image
        self.num_valid = sum(self.counts)
        self.value_shapes = None
        if spatial_shapes is not None and padding_mask.device.type == "cpu":
            self.value_shapes = _valid_rectangles(valid, spatial_shapes)

    def pack(self, x: Tensor) -> Tensor:
        """[B, S, ...] -> [N, ...]: the valid positions."""
        if x.shape[:2] != (self.batch, self.length):
            raise ValueError(f"expected [B={self.batch}, S={self.length}, ...], got shape {tuple(x.shape)}")
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """[N, ...] -> [B, S, ...] with zeros at the padded positions."""
        if x.shape[0] != self.num_valid:
            raise ValueError(f"expected {self.num_valid} packed positions, got shape {tuple(x.shape)}")
        # Zeros written at the padded rows only (a zero-filled tensor would write the valid ones twice).
        full = x.new_empty(self.batch * self.length, *x.shape[1:]).index_fill_(0, self.padding, 0)
        return full.index_copy_(0, self.index, x).view(self.batch, self.length, *x.shape[1:])  # no clone


def _valid_rectangles(valid: Tensor, spatial_shapes: list[tuple[int, int]]) -> Tensor | None:
    """valid [B, S] (S: the levels of spatial_shapes, flattened) -> [B, L, 2] int64: the (h, w) of each image's
    valid region on each level where every one is a top-left rectangle, else None."""
    spatial_shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if sum(h * w for h, w in spatial_shapes) != valid.shape[1]:
        raise ValueError(f"spatial_shapes {spatial_shapes} do not cover the mask's {valid.shape[1]} positions")
    shapes, start = [], 0
    for h, w in spatial_shapes:
        level = valid[:, start : start + h * w].view(-1, h, w)
        rows, cols = level[:, :, 0].sum(1), level[:, 0, :].sum(1)  # [B]: the rectangle's height and width
        rect = (torch.arange(h)[None, :, None] < rows[:, None, None]) & (
            torch.arange(w)[None, None, :] < cols[:, None, None])
        if not torch.equal(rect, level):
            return None
        shapes.append(torch.stack([rows, cols], 1))
        start += h * w
    return torch.stack(shapes, 1).long() if shapes else None


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query attends to `n_points` sampled points per head and level.

    Args:
        d_model: channels of queries and values; must be divisible by `n_heads`.
        n_levels: feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        for name, v in (("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if v < 1:
                raise ValueError(f"{name} must be at least 1, got {v}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self.record_sampling = False  # keep the last call's (sampling_locations, attention_weights), for pictures
        self.last_sampling: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: offsets point outwards on a grid over heads (direction) and points
        (distance 1..P), attention starts uniform, value/output projections are Xavier-uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [H, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # onto the unit square's border
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)  # [H, L, P, 2]
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
        packing: TokenPacking | None = None,
    ) -> Tensor:
        """
        Args:
            query: `[B, Q, C]`.
            reference_points: `[B, Q, L, 2]` normalised (x, y), or `[B, Q, L, 4]` boxes (cx, cy, w, h): offsets
                are then relative to the box size (half the box spans P points).
            input_flatten: `[B, S, C]`, the flattened levels.
            input_spatial_shapes: `[L, 2]` (height, width) of each level.
            input_level_start_index: `[L]`.
            input_padding_mask: `[B, S]`, True on padding (those values are zeroed).
            packing: `input_flatten` holds only the valid positions `[N, C]` of this packing (the padding mask is
                then not needed); a packed `query` `[N, C]` with `reference_points` `[N, L, 2|4]` are the queries
                at those positions (an encoder on valid tokens only; returns `[N, C]`).
        Returns:
            `[B, Q, C]`, or `[N, C]` for packed queries.
        """
        if (packing is not None and packing.value_shapes is not None and input_flatten.device.type == "cpu"
                and input_flatten.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and _eager_fast_path(input_flatten)):
            # The valid positions are top-left rectangles: the native kernels read the packed value as it is. (Where
            # they would not run - half precision, autocast, torch.compile - the op would pad the value first: the
            # unpacking below is as fast; under bf16 autocast the padded fallback made the step 1.03x slower.)
            return self._forward_packed_value(query, reference_points, input_flatten, input_spatial_shapes,
                                              input_level_start_index, packing)
        value = self._value(query, input_flatten, input_padding_mask, packing)  # [B, S, H, D]
        if query.dim() == 2:  # packed queries: an encoder on the valid positions only
            self._check_packed_query(query, reference_points, packing)
            locations, weights = self._sampling(query[None], reference_points[None], input_spatial_shapes)
            # Image b's queries are the next counts[b] rows; each samples its own image's value.
            out = ms_deform_attn_packed(value, input_spatial_shapes, input_level_start_index, locations.squeeze(0),
                                        weights.squeeze(0), packing.counts)
            return self.output_proj(out.view(query.shape))
        locations, weights = self._sampling(query, reference_points, input_spatial_shapes)
        return self.output_proj(ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations,
                                               weights))

    @staticmethod
    def _check_packed_query(query: Tensor, reference_points: Tensor, packing: TokenPacking | None) -> None:
        if packing is None or query.shape[0] != packing.num_valid or reference_points.shape[:1] != query.shape[:1]:
            raise ValueError(f"packed query and reference_points need a packing and must have "
                             f"N={packing.num_valid if packing else '?'} rows, got shapes "
                             f"{tuple(query.shape)} and {tuple(reference_points.shape)}")

    @staticmethod
    def _check_packed_input(input_flatten: Tensor, packing: TokenPacking, C: int) -> None:
        if input_flatten.shape != (packing.num_valid, C):
            raise ValueError(f"with packing, input_flatten must be [N={packing.num_valid}, C={C}], "
                             f"got shape {tuple(input_flatten.shape)}")

    def _forward_packed_value(self, query, reference_points, input_flatten, input_spatial_shapes,
                              input_level_start_index, packing: TokenPacking) -> Tensor:
        """forward with the packed value [N, H, D] sampled in place (`ms_deform_attn_packed`'s value_shapes): no
        zero-padded [B, S, H, D] copy forward, no gather of its gradient backward."""
        C = query.shape[-1]
        self._check_packed_input(input_flatten, packing, C)
        value = self.value_proj(input_flatten).view(packing.num_valid, self.n_heads, C // self.n_heads)
        if query.dim() == 2:  # packed queries: image b's are the next counts[b] rows
            self._check_packed_query(query, reference_points, packing)
            locations, weights = self._sampling(query[None], reference_points[None], input_spatial_shapes)
            # squeeze, not [0]: a view backward too (indexing's backward zero-fills and copies a full-size gradient)
            locations, weights, counts = locations.squeeze(0), weights.squeeze(0), packing.counts
        else:  # [B, Q] queries: image b's are its Q
            locations, weights = self._sampling(query, reference_points, input_spatial_shapes)
            B, Q = query.shape[:2]
            locations, weights, counts = locations.flatten(0, 1), weights.flatten(0, 1), [Q] * B
        out = ms_deform_attn_packed(value, input_spatial_shapes, input_level_start_index, locations, weights, counts,
                                    value_shapes=packing.value_shapes)
        return self.output_proj(out.view(*query.shape[:-1], -1))

    def _value(self, query: Tensor, input_flatten: Tensor, padding_mask: Tensor | None,
               packing: TokenPacking | None) -> Tensor:
        """The projected values [B, S, H, D], zero at the padding."""
        C = query.shape[-1]
        if packing is not None:
            self._check_packed_input(input_flatten, packing, C)
            value = packing.unpack(self.value_proj(input_flatten))  # zeros at the padding
        else:
            if input_flatten.dim() != 3 or input_flatten.shape[0] != query.shape[0] or input_flatten.shape[2] != C:
                raise ValueError(f"input_flatten must be [B={query.shape[0]}, S, C={C}], "
                                 f"got shape {tuple(input_flatten.shape)}")
            value = self.value_proj(input_flatten)
            if padding_mask is not None:
                value = value.masked_fill(padding_mask[..., None], 0.0)
        return value.view(*value.shape[:2], self.n_heads, C // self.n_heads)

    def _sampling(self, query: Tensor, reference_points: Tensor, input_spatial_shapes: Tensor):
        """Sampling locations [B, Q, H, L, P, 2] and attention weights [B, Q, H, L, P] of queries [B, Q, C]."""
        B, Q, C = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        if input_spatial_shapes.shape != (L, 2):
            raise ValueError(f"input_spatial_shapes must be [{L}, 2], got shape {tuple(input_spatial_shapes.shape)}")
        if reference_points.dim() != 4 or reference_points.shape[:3] != (B, Q, L) or \
                reference_points.shape[3] not in (2, 4):
            raise ValueError(
                f"reference_points must be [B={B}, Q={Q}, L={L}, 2 or 4], got shape {tuple(reference_points.shape)}"
            )
        # Both projections of the query in one product ([C] -> H*L*P*2 + H*L*P: larger GEMMs run faster, and the
        # backward sums one input gradient instead of two); same parameters, results within float rounding.
        so, aw = self.sampling_offsets, self.attention_weights
        proj = None
        if so.bias is None or aw.bias is None:  # a bias removed by hand: the two products as written
            offsets, weights = so(query), aw(query)
        else:  # [B, Q, H*L*P*2 + H*L*P]
            proj = linear(query, torch.cat([so.weight, aw.weight]), torch.cat([so.bias, aw.bias]))
        # locations = reference + offsets x scale, per (h, l, p, xy) slot: scale = 1 / (w, h) of the level, or half
        # the reference box's (w, h) / P. Reference and scale are spread over the slots with a gather along the
        # last dimension (on the CPU 3x faster than index_select there: 0.20 vs 0.62 ms for an encoder's
        # [1, 2660, 8] -> [1, 2660, 256]) and combined in one addcmul over a contiguous [B, Q, H*L*P*2] (as a
        # broadcast over [B, Q, H, L, P, 2] torch runs 3x slower, and dividing by the int64 shapes rounded
        # half-precision offsets first).
        slot = torch.arange(L * 2, device=query.device).view(1, L, 1, 2).expand(H, L, P, 2).reshape(-1)
        if reference_points.shape[-1] == 2:
            wh = input_spatial_shapes.flip(-1).to(device=query.device, dtype=torch.float32)  # [L, 2] (w, h)
            base = reference_points.reshape(B, Q, L * 2)
            scale = wh.reciprocal().reshape(L * 2)
        else:
            base = reference_points[..., :2].reshape(B, Q, L * 2)
            scale = (reference_points[..., 2:] * (0.5 / P)).reshape(B, Q, L * 2)
        spread = slot.expand(B, Q, -1)
        base = base.gather(-1, spread)
        scale = scale.gather(-1, spread) if scale.dim() == 3 else scale.index_select(-1, slot)
        if (proj is not None and proj.requires_grad and torch.is_grad_enabled() and not base.requires_grad
                and not scale.requires_grad and proj.dtype in (torch.float32, torch.float64)
                and _eager_fast_path(proj)):
            # One node for the split, the softmax and the addcmul: its backward writes both gradients into one
            # [B, Q, H*L*P*3] tensor for the projection (no concatenation; five autograd nodes fewer). Same values.
            locations, weights = _Sampling.apply(proj, base, scale, so.out_features, H)
            weights = weights.view(B, Q, H, L, P)
        else:
            if proj is not None:
                offsets, weights = proj.split([so.out_features, aw.out_features], -1)
            weights = weights.view(B, Q, H, L * P)
            # The softmax in float32 (under autocast torch would run it in bfloat16: 8-bit weights, and on the CPU 5x
            # slower than in float32 over rows of L * P = 16).
            weights = weights.to(torch.promote_types(weights.dtype, torch.float32)).softmax(-1).view(B, Q, H, L, P)
            locations = torch.addcmul(base, offsets, scale)
        locations = locations.view(B, Q, H, L, P, 2)
        if self.record_sampling:
            self.last_sampling = (locations.detach(), weights.detach())
        # Under autocast the projections may run in half precision while the reference points, the locations and
        # the softmax stay float32: the op takes float32 locations and weights with a half-precision value, so the
        # sampling positions are not rounded to 8 bits (steps of 0.4 pixel on a 100-pixel-wide level).
        loc_dtype = torch.float32 if locations.dtype in (torch.float16, torch.bfloat16) else locations.dtype
        return locations.to(loc_dtype), weights.to(loc_dtype)


class _Sampling(torch.autograd.Function):
    """(locations, weights) = (base + proj[..., :n] * scale, softmax over the last L*P of proj[..., n:] per head), from
    the sampling projection proj [B, Q, n + H*L*P] (n = H*L*P*2); base and scale [B, Q, n] | [n] without gradient."""

    @staticmethod
    def forward(ctx, proj: Tensor, base: Tensor, scale: Tensor, n: int, H: int):
        B, Q, _ = proj.shape
        locations = torch.addcmul(base, proj[..., :n], scale)
        weights = proj[..., n:].reshape(B, Q, H, -1).softmax(-1)
        ctx.save_for_backward(scale, weights)
        ctx.n = n
        return locations, weights

    @staticmethod
    def backward(ctx, grad_locations: Tensor | None, grad_weights: Tensor | None):
        scale, weights = ctx.saved_tensors
        B, Q, H, LP = weights.shape
        grad = weights.new_empty(B, Q, ctx.n + H * LP)
        if grad_locations is None:
            grad[..., : ctx.n].zero_()
        else:
            torch.mul(grad_locations, scale, out=grad[..., : ctx.n])
        if grad_weights is None:
            grad[..., ctx.n :].zero_()
        else:
            grad[..., ctx.n :].view(B, Q, H, LP).copy_(
                torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype))
        return grad, None, None, None, None
