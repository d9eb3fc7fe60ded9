"""Multi-scale deformable attention: detrcore's kernels vs the grid_sample reference (and, on a GPU, the
original Deformable-DETR CUDA kernel when its extension `MultiScaleDeformableAttention` is importable), same run.
On CUDA each time is also given as a fraction of the memory-bandwidth bound: compulsory bytes / measured copy
bandwidth."""
from __future__ import annotations

import statistics

import torch

from detrcore import ops
from detrcore.ops import reference
from detrcore.ops.deform_attn import level_start_index_of

from ._common import machine, print_table, ratio, time_call, time_interleaved

H, D, P = 8, 32, 4
CPU_LEVELS = [(64, 64), (32, 32), (16, 16), (8, 8)]
CUDA_LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]  # Deformable DETR at ~800x1200 input


def reference_points(levels, batch: int, queries: int | None, generator) -> torch.Tensor:
    """[B, Q, 2]: the encoder's queries sit at the centres of every position of every level (Q = S); the
    decoder's `queries` are spread uniformly."""
    if queries is not None:
        return torch.rand(batch, queries, 2, generator=generator)
    centres = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    return torch.cat(centres).expand(batch, -1, -1)


def make_case(levels, batch: int, queries: int | None, device: str, dtype: torch.dtype, seed: int = 0):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights); queries=None: Q = S.

    Locations are what a trained Deformable DETR produces: each query samples every level around its reference
    point, offsets of a couple of pixels of that level (normal, sd 2 px), so neighbouring queries read
    neighbouring memory, as in real use (uniform random locations would only measure cache misses).
    """
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(levels, dtype=torch.int64)
    S = int((ss[:, 0] * ss[:, 1]).sum())
    ref = reference_points(levels, batch, queries, g)  # [B, Q, 2]
    Q, L = ref.shape[1], len(levels)
    wh = ss.flip(-1).float()  # [L, 2] (w, h)
    offsets = 2.0 * torch.randn(batch, Q, H, L, P, 2, generator=g) / wh[:, None, :]  # [B, Q, H, L, P, 2]
    loc = ref[:, :, None, None, None, :] + offsets
    value = torch.randn(batch, S, H, D, generator=g)
    aw = torch.rand(batch, Q, H, L, P, generator=g).flatten(-2).softmax(-1).view(batch, Q, H, L, P)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(value), ss.to(device), level_start_index_of(ss).to(device), to(loc), to(aw)


def compulsory_bytes(case, backward: bool) -> int:
    """Bytes every implementation must move: inputs read once, outputs written once."""
    value, _, _, loc, aw = case
    e = value.element_size()
    B, Q = loc.shape[:2]
    out = B * Q * H * D * e
    fwd = value.numel() * e + loc.numel() * e + aw.numel() * e + out
    if not backward:
        return fwd
    # backward: read value, locations, weights, grad_out; write grad_value, grad_locations, grad_weights
    return fwd + out + value.numel() * e + loc.numel() * e + aw.numel() * e


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = time_call(lambda: y.copy_(x), repeats=5, sync=True)
    return 2 * x.numel() * 4 / t


def _original_kernel():
    try:
        import MultiScaleDeformableAttention as msda  # the original extension, built on the GPU machine

        return msda
    except ImportError:
        return None


def _no_grad(fn, case):
    def call():
        with torch.no_grad():
            fn(*case)

    return call


def _fwd_bwd(fn, case):
    value, ss, ls, loc, aw = case
    ins = [t.clone().requires_grad_() for t in (value, loc, aw)]
    grad = torch.randn(value.shape[0], loc.shape[1], H * D, device=value.device, dtype=value.dtype)

    def step():
        torch.autograd.grad(fn(ins[0], ss, ls, ins[1], ins[2]), ins, grad)

    return step


def run(device: str = "cpu", dtypes=(torch.float32,), repeats: int = 5, batch: int | None = None) -> dict:
    cuda = device.startswith("cuda")
    levels = CUDA_LEVELS if cuda else CPU_LEVELS
    batch = batch or (2 if cuda else 1)
    bandwidth = copy_bandwidth(device) if cuda else None
    original = _original_kernel() if cuda else None
    rows, records = [], []
    for dtype in dtypes:
        for name, queries in (("encoder", None), ("decoder", 300)):
            case = make_case(levels, batch, queries, device, dtype)
            impls = {"detrcore": ops.ms_deform_attn, "grid_sample reference": reference.ms_deform_attn}
            if original is not None and dtype in (torch.float32, torch.float64):
                impls["original CUDA"] = _original_fn(original)
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":
                    calls = {impl: _no_grad(fn, case) for impl, fn in impls.items()}
                else:
                    calls = {impl: _fwd_bwd(fn, case) for impl, fn in impls.items()}
                samples = time_interleaved(calls, repeats=repeats, sync=cuda)
                times = {k: statistics.median(v) for k, v in samples.items()}
                rec = {"shape": name, "batch": batch, "queries": case[3].shape[1], "S": case[0].shape[1],
                       "dtype": str(dtype), "mode": mode, "us": {k: v * 1e6 for k, v in times.items()},
                       "speedup_vs_reference": ratio(samples["grid_sample reference"], samples["detrcore"])}
                if "original CUDA" in times:
                    rec["speedup_vs_original"] = ratio(samples["original CUDA"], samples["detrcore"])
                if bandwidth:
                    bound = compulsory_bytes(case, mode == "fwd+bwd") / bandwidth
                    rec["bandwidth_bound_us"] = bound * 1e6
                    rec["fraction_of_bound"] = bound / times["detrcore"]
                records.append(rec)
                rows.append([name, str(dtype)[6:], mode, rec["us"]["grid_sample reference"],
                             rec["us"].get("original CUDA", ""), rec["us"]["detrcore"], rec["speedup_vs_reference"],
                             rec.get("speedup_vs_original", ""), rec.get("fraction_of_bound", "")])
    print(f"\nms_deform_attn on {device}, B={batch}, levels {levels}, H={H}, D={D}, P={P}, "
          f"{torch.get_num_threads()} threads, interleaved, median of {repeats} rounds (µs; speed-ups: median of the "
          f"per-round ratios)")
    table = print_table(["shape", "dtype", "mode", "reference µs", "original µs", "ours µs", "vs reference",
                         "vs original", "of bound"], rows)
    return {"benchmark": "ms_deform_attn", "device": device, "levels": levels, "heads": H, "head_dim": D,
            "points": P, "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None, "machine": machine(),
            "results": records, "table": table}


def _original_fn(msda):
    """The original autograd function around the original kernel (im2col_step 64, as the official code uses)."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, ss, ls, loc, aw):
            ctx.save_for_backward(value, ss, ls, loc, aw)
            return msda.ms_deform_attn_forward(value, ss, ls, loc, aw, 64)

        @staticmethod
        def backward(ctx, grad):
            value, ss, ls, loc, aw = ctx.saved_tensors
            gv, gl, ga = msda.ms_deform_attn_backward(value, ss, ls, loc, aw, grad.contiguous(), 64)
            return gv, None, None, gl, ga

    return Fn.apply
