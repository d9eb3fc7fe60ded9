"""Linear sum assignment (the Hungarian matching of DETR's matcher) on the native solver.

`linear_sum_assignment` is a drop-in for `scipy.optimize.linear_sum_assignment`: same signature, result
convention (rows ascending), errors and messages. It reads float32/float64 numpy arrays and CPU tensors in
place, whatever their strides; other real dtypes are converted (half precision to float32, the rest to
float64, as scipy does). `batched_linear_sum_assignment` solves a list of matrices in parallel native
threads with the GIL released.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import _lib
from ._lib import _C

__all__ = ["linear_sum_assignment", "batched_linear_sum_assignment"]

_NATIVE_NP = (np.dtype(np.float32), np.dtype(np.float64))


def _as_native(cost, name: str):
    """Returns (an object the native solver reads in place, the torch device to return results on or None)."""
    if isinstance(cost, torch.Tensor):
        t = cost.detach()
        device = t.device
        if t.is_complex():
            raise TypeError(f"{name}: complex cost matrices are not supported")
        if device.type != "cpu":
            t = t.cpu()  # one device->host copy (and a sync) for a CUDA matrix
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        elif t.dtype not in (torch.float32, torch.float64):
            t = t.double()
        return t, device
    a = np.asarray(cost)
    if a.dtype not in _NATIVE_NP:
        a = a.astype(np.float32 if a.dtype == np.float16 else np.float64, casting="safe")
    if not a.dtype.isnative or any(s < 0 or s % a.itemsize for s in a.strides):
        a = np.ascontiguousarray(a)  # byte-swapped or oddly strided: DLPack cannot describe it
    return a, None


def _wrap(rows: np.ndarray, cols: np.ndarray, device):
    if device is None:
        return rows, cols
    return torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)


def linear_sum_assignment(cost_matrix, maximize: bool = False):
    """Solve the linear sum assignment problem, as `scipy.optimize.linear_sum_assignment`.

    cost_matrix: a 2-D numpy array, torch tensor or array-like (`[nr, nc]`, any real dtype, any strides);
        `+inf` marks a forbidden pair (`-inf` when maximize).
    Returns `(rows, cols)`: int64 arrays (numpy for numpy/array-like input, torch tensors on the input's
        device for tensors) of length min(nr, nc), rows ascending, minimising (or maximising) the total cost.
    Raises ValueError "matrix contains invalid numeric entries" (NaN, or -inf / +inf when maximize) and
        "cost matrix is infeasible" when no complete matching avoids the forbidden pairs.
    """
    if type(cost_matrix) is np.ndarray and cost_matrix.dtype.char in "fd" and cost_matrix.dtype.isnative:
        # the common case: read in place, whatever the strides
        return _C.linear_sum_assignment(cost_matrix, bool(maximize))
    native, device = _as_native(cost_matrix, "cost_matrix")
    rows, cols = _C.linear_sum_assignment(native, bool(maximize))
    return _wrap(rows, cols, device)


def batched_linear_sum_assignment(costs: Sequence, maximize: bool = False, num_threads: int | None = None):
    """Solve many assignment problems (matrices of any sizes) in parallel native threads.

    costs: a sequence of 2-D matrices, each as accepted by `linear_sum_assignment`.
    num_threads: defaults to torch.get_num_threads().
    Returns a list of `(rows, cols)`, one per matrix. An error names the matrix: "costs[3]: ...".
    """
    if isinstance(costs, (np.ndarray, torch.Tensor)) and costs.ndim == 3:
        costs = list(costs)  # a [B, nr, nc] stack: B matrices
    natives, devices = [], []
    for i, c in enumerate(costs):
        n, d = _as_native(c, f"costs[{i}]")
        natives.append(n)
        devices.append(d)
    threads = _lib.num_threads() if num_threads is None else int(num_threads)
    results = _C.batched_linear_sum_assignment(natives, bool(maximize), num_threads=threads)
    return [_wrap(r, c, d) for (r, c), d in zip(results, devices)]
