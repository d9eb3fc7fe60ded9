"""Multi-scale deformable attention (MSDA), the operator at the heart of Deformable DETR, as a PyTorch custom op
over native CPU and CUDA kernels, with a native backward for value, sampling locations and attention weights.

The function is Deformable DETR's `MSDeformAttnFunction` / `ms_deform_attn_core_pytorch`: bilinear sampling with
zero padding under `grid_sample(..., align_corners=False)`'s convention; `reference.ms_deform_attn` is its
readable twin. Unlike the original there is no `im2col_step` or batch-divisibility limit, any head dimension
works, the CPU path is real and threaded, CUDA runs float16/bfloat16/float32/float64 (float32 accumulation), and
bad input raises instead of printing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _lib, reference
from ._lib import _C

__all__ = ["ms_deform_attn", "ms_deform_attn_packed"]


def _native(t: Tensor) -> Tensor:
    return t.detach().contiguous()


def _forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
             attention_weights: Tensor) -> Tensor:
    v, ss, ls = _native(value), _native(spatial_shapes), _native(level_start_index)
    loc, aw = _native(sampling_locations), _native(attention_weights)
    B, _, H, D = v.shape
    out = v.new_empty((B, loc.shape[1], H * D))
    if v.is_cuda:
        with torch.cuda.device(v.device):
            _C.ms_deform_attn_forward(v, ss, ls, loc, aw, out, stream=_lib.stream_of(v))
    else:
        _C.ms_deform_attn_forward(v, ss, ls, loc, aw, out, num_threads=_lib.num_threads())
    return out


@torch.library.custom_op("detrcore::ms_deform_attn", mutates_args=(), device_types=("cpu", "cuda"))
def _ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    return _forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, _, H, D = value.shape
    return value.new_empty((B, sampling_locations.shape[1], H * D))


def _backward_native(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                     sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    g, v, ss, ls = _native(grad_output), _native(value), _native(spatial_shapes), _native(level_start_index)
    loc, aw = _native(sampling_locations), _native(attention_weights)
    grad_loc, grad_aw = loc.new_empty(loc.shape), aw.new_empty(aw.shape)
    if v.is_cuda:
        deterministic = torch.are_deterministic_algorithms_enabled()
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        grad_value = torch.empty(v.shape, dtype=acc, device=v.device)  # zero-filled by the kernel
        need = _C.ms_deform_attn_workspace_bytes(v, ss, ls, loc, aw, deterministic)
        workspace = torch.empty(need, dtype=torch.uint8, device=v.device) if need else None
        with torch.cuda.device(v.device):
            _C.ms_deform_attn_backward(v, ss, ls, loc, aw, g, grad_value, grad_loc, grad_aw, deterministic,
                                       workspace, stream=_lib.stream_of(v))
        grad_value = grad_value.to(v.dtype)
    else:
        grad_value = v.new_empty(v.shape)
        _C.ms_deform_attn_backward(v, ss, ls, loc, aw, g, grad_value, grad_loc, grad_aw,
                                   num_threads=_lib.num_threads())
    return grad_value, grad_loc, grad_aw


@torch.library.custom_op("detrcore::ms_deform_attn_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _ms_deform_attn_backward(
    grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
    sampling_locations: Tensor, attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_native(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights)


@_ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_aw = _ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_loc, grad_aw


_ms_deform_attn.register_autograd(_backward, setup_context=_setup_context)


class _EagerMsda(torch.autograd.Function):
    """The custom op's eager twin (see `_lib.eager_fast_path`): the same native forward and backward."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return _forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the custom op: no double backward
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_aw = _backward_native(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grad_value, None, None, grad_loc, grad_aw


def _call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> Tensor:
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _lib.under_torch_func():  # the grid_sample twin (see _lib.under_torch_func)
        return reference.ms_deform_attn(*args)
    if _lib.eager_fast_path(value, sampling_locations, attention_weights):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations, attention_weights)):
            return _EagerMsda.apply(*args)
        return _forward(*args)
    return _ms_deform_attn(*args)


_HALF = (torch.float16, torch.bfloat16)


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    named = {
        "value": value, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
        "sampling_locations": sampling_locations, "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ranks = {"value": 4, "spatial_shapes": 2, "level_start_index": 1, "sampling_locations": 6,
             "attention_weights": 5}
    layouts = {"value": "[B, S, H, D]", "spatial_shapes": "[L, 2]", "level_start_index": "[L]",
               "sampling_locations": "[B, Q, H, L, P, 2]", "attention_weights": "[B, Q, H, L, P]"}
    for name, rank in ranks.items():
        if named[name].dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layouts[name]}, got shape {tuple(named[name].shape)}")
    if not value.is_floating_point():
        raise TypeError(f"value must be a floating-point tensor, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].dtype != value.dtype and not (value.dtype in _HALF and named[name].dtype == torch.float32):
            allowed = f"{value.dtype} or torch.float32" if value.dtype in _HALF else str(value.dtype)
            raise TypeError(f"{name} must have value's dtype ({allowed}), got {named[name].dtype}")
    if sampling_locations.dtype != attention_weights.dtype:
        raise TypeError(f"sampling_locations ({sampling_locations.dtype}) and attention_weights "
                        f"({attention_weights.dtype}) must share one dtype")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer (int64) tensor, got {named[name].dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].device != value.device:
            raise ValueError(f"{name} must be on value's device {value.device}, got {named[name].device}")
    B, S, H, _ = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be [L, 2] (height, width), got shape {tuple(spatial_shapes.shape)}")
    if level_start_index.shape[0] != L:
        raise ValueError(f"level_start_index has {level_start_index.shape[0]} levels, spatial_shapes has {L}")
    loc, aw = sampling_locations, attention_weights
    if loc.shape[0] != B or loc.shape[2] != H or loc.shape[3] != L or loc.shape[5] != 2:
        raise ValueError(
            f"sampling_locations must be [B={B}, Q, H={H}, L={L}, P, 2], got shape {tuple(loc.shape)}"
        )
    if aw.shape != loc.shape[:5]:
        raise ValueError(
            f"attention_weights must be [B, Q, H, L, P] = {tuple(loc.shape[:5])}, got shape {tuple(aw.shape)}"
        )


def ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention.

    Args:
        value: `[B, S, H, D]`, S = sum of h * w over the levels (flattened row-major, level after level).
        spatial_shapes: `[L, 2]` int64, (height, width) of each level.
        level_start_index: `[L]` int64, where each level starts in S.
        sampling_locations: `[B, Q, H, L, P, 2]`, normalised (x, y) in [0, 1]; outside samples zeros.
        attention_weights: `[B, Q, H, L, P]` (normally softmax-normalised over L * P).
    Returns:
        `[B, Q, H * D]`.

    value, sampling_locations and attention_weights share one device and one dtype (float16/bfloat16/float32/
    float64; the CPU computes half precision in float32), except that a float16/bfloat16 value may come with float32
    locations and weights (what the models pass under autocast: sampling positions are not rounded to 8 bits; the
    output and value's gradient keep value's dtype, computed in float32). On the CPU, and when the level metadata
    is passed as CPU tensors for CUDA values, S = sum(h * w) and the level starts are checked; metadata already on
    the GPU is not read back (that would synchronise), but every index the kernels touch is bounds-checked. The
    CUDA backward is bitwise deterministic when `torch.use_deterministic_algorithms(True)` is set.
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    spatial_shapes = spatial_shapes.long()
    level_start_index = level_start_index.long()
    if value.is_cuda and not spatial_shapes.is_cuda:
        _check_levels_on_host(spatial_shapes, level_start_index, value.shape[1])
        spatial_shapes = spatial_shapes.to(value.device, non_blocking=True)
        level_start_index = level_start_index.to(value.device, non_blocking=True)
    elif spatial_shapes.device != value.device or level_start_index.device != value.device:
        raise ValueError(
            f"spatial_shapes and level_start_index must be on value's device {value.device} (or on the CPU)"
        )
    if value.dtype in _HALF and (value.device.type == "cpu" or sampling_locations.dtype == torch.float32):
        # The CPU kernels run float32/float64: half precision (e.g. under CPU autocast) is computed in float32.
        # CUDA with float32 locations and weights (as the models pass them under autocast): value is widened
        # and the float32 kernels run.
        out = _call(value.float(), spatial_shapes, level_start_index, sampling_locations.float(),
                    attention_weights.float())
        return out.to(value.dtype)
    return _call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def ms_deform_attn_packed(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor, counts: list[int],
                          value_shapes: Tensor | None = None) -> Tensor:
    """`ms_deform_attn` for images whose queries are packed one after another (an encoder on the valid positions
    only, `detrcore.nn.TokenPacking`): image b's queries are the next `counts[b]` rows of sampling_locations
    `[N, H, L, P, 2]` and attention_weights `[N, H, L, P]` and sample value[b] (`[B, S, H, D]`); returns `[N, H*D]`.

    value_shapes: `[B, L, 2]` int64 on the CPU, or None. Given, `value` is packed too, `[N_v, H, D]`: image b's map of
    level l is only its top-left value_shapes[b, l] = (h, w) corner (the valid region of a padded image; the rest of
    its spatial_shapes[l] map is zero and not stored), the corners row-major, level after level, image after image.
    The results are those of sampling the zero-padded maps.

    The same as calling `ms_deform_attn` per image and concatenating. On the CPU for float32/float64 in eager mode it
    is one autograd node whose kernels write each image's rows of the output and of the gradients in place: no
    concatenation of the output forward, none of the location, weight and value gradients backward (on the
    Deformable DETR benchmark batch 2.7 MB per encoder layer forward, 7.6 MB backward); with value_shapes the
    kernels read the packed value as it is (no padded copy, 3400 -> 2660 rows per layer there). Elsewhere (CUDA,
    half precision, torch.compile) the per-image calls, on a zero-padded copy of a packed value."""
    counts = [int(c) for c in counts]
    loc, aw = sampling_locations, attention_weights
    packed_value = value_shapes is not None
    if not isinstance(value, Tensor) or value.dim() != (3 if packed_value else 4):
        layout = "[N_v, H, D] (value_shapes given)" if packed_value else "[B, S, H, D]"
        raise ValueError(f"value must be a {layout} tensor, got {getattr(value, 'shape', type(value))}")
    images = None
    if packed_value:
        images = _packed_images(value, spatial_shapes, value_shapes)
        batch = len(images)
    else:
        batch = value.shape[0]
    if len(counts) != batch or any(c < 0 for c in counts):
        raise ValueError(f"counts must give a query count >= 0 for each of value's {batch} images, got {counts}")
    if loc.dim() != 5 or aw.dim() != 4 or loc.shape[0] != sum(counts):
        raise ValueError(f"sampling_locations [N, H, L, P, 2] and attention_weights [N, H, L, P] with "
                         f"N = sum(counts) = {sum(counts)}, got shapes {tuple(loc.shape)} and {tuple(aw.shape)}")
    if not counts:  # no images, no queries
        if packed_value:  # (and no value rows)
            return value.reshape(0, value.shape[1] * value.shape[2])
        return ms_deform_attn(value, spatial_shapes, level_start_index, loc[None][:0], aw[None][:0]).reshape(
            0, value.shape[2] * value.shape[3])
    # One image's [1, S, H, D] (a stand-in without memory for a packed value) against the per-query arrays.
    S = int(spatial_shapes.long().prod(1).sum()) if packed_value else value.shape[1]
    _check(value.new_zeros(()).expand(1, S, *value.shape[-2:]) if packed_value else value[:1], spatial_shapes,
           level_start_index, loc[None], aw[None])
    if (value.device.type == "cpu" and value.dtype in (torch.float32, torch.float64) and loc.dtype == value.dtype
            and aw.dtype == value.dtype and spatial_shapes.device.type == "cpu"
            and level_start_index.device.type == "cpu" and _lib.eager_fast_path(value, loc, aw)):
        if images is None:
            ss, ls = _native(spatial_shapes.long()), _native(level_start_index.long())
            images = [(b, b + 1, ss, ls) for b in range(batch)]
            coord = None
        else:
            coord = _native(spatial_shapes.long())
        args = (value, loc, aw, images, coord, counts)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (value, loc, aw)):
            return _EagerMsdaPacked.apply(*args)
        return _packed_forward(*args)
    full = _padded_value(value, spatial_shapes, level_start_index, images) if packed_value else value
    return torch.cat([ms_deform_attn(v, spatial_shapes, level_start_index, l, w)
                      for v, l, w in zip(full.split(1), loc[None].split(counts, 1), aw[None].split(counts, 1))],
                     1)[0]


def _packed_images(value: Tensor, spatial_shapes: Tensor, value_shapes: Tensor) -> list[tuple]:
    """Per image of a packed value (`ms_deform_attn_packed`'s value_shapes): (first row, end row, its
    spatial_shapes [L, 2], its level starts [L]), after checking value_shapes against spatial_shapes and value."""
    if not isinstance(value_shapes, Tensor) or value_shapes.dim() != 3 or value_shapes.shape[1:] != (
            spatial_shapes.shape[0], 2) or value_shapes.device.type != "cpu" or value_shapes.is_floating_point():
        raise ValueError(f"value_shapes must be a [B, L={spatial_shapes.shape[0]}, 2] integer CPU tensor, got "
                         f"{getattr(value_shapes, 'dtype', type(value_shapes))} "
                         f"{tuple(getattr(value_shapes, 'shape', ()))}")
    shapes = value_shapes.long().contiguous()
    full = spatial_shapes.tolist()
    images, row = [], 0
    for b, levels in enumerate(shapes.tolist()):
        if any(h < 0 or w < 0 or h > fh or w > fw for (h, w), (fh, fw) in zip(levels, full)):
            raise ValueError(f"value_shapes[{b}] = {levels}: every (h, w) must lie within spatial_shapes {full}")
        sizes = [h * w for h, w in levels]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        images.append((row, row + sum(sizes), shapes[b], torch.tensor(starts, dtype=torch.long)))
        row += sum(sizes)
    if value.shape[0] != row:
        raise ValueError(f"value holds {value.shape[0]} rows but value_shapes describes {row}")
    return images


def _padded_value(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, images: list[tuple]) -> Tensor:
    """A packed value ([N_v, H, D], `_packed_images`) as the zero-padded [B, S, H, D] it stands for
    (differentiable)."""
    full = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    S = sum(h * w for h, w in full)
    out = value.new_zeros((len(images), S, *value.shape[1:]))
    for b, (row, _, shapes, _) in enumerate(images):
        for (h, w), (fh, fw), start in zip(shapes.tolist(), full, starts):
            if h * w:
                level = out[b, start : start + fh * fw].view(fh, fw, *value.shape[1:])
                level[:h, :w] = value[row : row + h * w].view(h, w, *value.shape[1:])
            row += h * w
    return out


def _image_values(v: Tensor, images: list[tuple]) -> list[Tensor]:
    """Image b's value as a [1, S_b, H, D] view: of a [B, S, H, D] value, or of a packed [N_v, H, D] one."""
    if v.dim() == 4:
        return [v[r0:r1] for r0, r1, _, _ in images]
    return [v[r0:r1][None] for r0, r1, _, _ in images]


def _packed_forward(value, loc, aw, images, coord, counts) -> Tensor:
    v, loc, aw = _native(value), _native(loc), _native(aw)
    out = v.new_empty((1, loc.shape[0], v.shape[-2] * v.shape[-1]))
    start = 0
    for vb, (_, _, ss, ls), n in zip(_image_values(v, images), images, counts):
        if n:
            _C.ms_deform_attn_forward(vb, ss, ls, loc[None, start : start + n], aw[None, start : start + n],
                                      out[:, start : start + n], num_threads=_lib.num_threads(), coord_shapes=coord)
        start += n
    return out[0]


class _EagerMsdaPacked(torch.autograd.Function):
    """`ms_deform_attn_packed`'s CPU node: per image the native kernels on views of the packed tensors."""

    @staticmethod
    def forward(ctx, value, loc, aw, images, coord, counts):
        ctx.save_for_backward(value, loc, aw)
        ctx.images, ctx.coord, ctx.counts = images, coord, counts
        return _packed_forward(value, loc, aw, images, coord, counts)

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the custom op: no double backward
    def backward(ctx, grad_output):
        v, loc, aw = (_native(t) for t in ctx.saved_tensors)
        g = _native(grad_output)
        grad_value, grad_loc, grad_aw = v.new_empty(v.shape), loc.new_empty(loc.shape), aw.new_empty(aw.shape)
        start = 0
        for vb, gvb, (_, _, ss, ls), n in zip(_image_values(v, ctx.images), _image_values(grad_value, ctx.images),
                                              ctx.images, ctx.counts):
            if n:
                rows = slice(start, start + n)
                _C.ms_deform_attn_backward(vb, ss, ls, loc[None, rows], aw[None, rows], g[None, rows], gvb,
                                           grad_loc[None, rows], grad_aw[None, rows], num_threads=_lib.num_threads(),
                                           coord_shapes=ctx.coord)
            else:  # no queries: nothing sampled this image
                gvb.zero_()
            start += n
        return grad_value, grad_loc, grad_aw, None, None, None


def _check_levels_on_host(spatial_shapes: Tensor, level_start_index: Tensor, S: int) -> None:
    if level_start_index.device.type != "cpu":
        raise ValueError("level_start_index must be on the CPU when spatial_shapes is")
    sizes = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
    starts = level_start_index.tolist()
    if (spatial_shapes < 0).any():
        raise ValueError("spatial_shapes: a level has a negative size")
    expected = [sum(sizes[:i]) for i in range(len(sizes))]
    if starts != expected:
        raise ValueError(f"level_start_index {starts} does not match spatial_shapes (expected {expected})")
    if sum(sizes) != S:
        raise ValueError(f"value has S = {S} positions but spatial_shapes sums to {sum(sizes)}")


def level_start_index_of(spatial_shapes: Tensor) -> Tensor:
    """`[L, 2] -> [L]`: the exclusive cumulative sum of h * w."""
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
