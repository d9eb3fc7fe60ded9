"""Loads the native module and answers what was built; shared helpers of the op wrappers."""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    from detrcore import _C
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "detrcore's native module detrcore._C failed to load. Install the package with `pip install .` "
        f"from the source tree (a plain copy of python/ has no compiled core). Cause: {e}"
    ) from e


def build_info() -> dict[str, Any]:
    """What the native core was built with.

    Returns a dict with `version`, `cuda` (True when CUDA kernels are compiled in), `cuda_archs` (e.g.
    "80-real,90-real,90-virtual"), `cuda_version` (of the compiler, None without CUDA),
    `cuda_runtime_version` (of the statically linked runtime), `compiler` and `openmp` (True when CPU kernels run
    on OpenMP threads, torch's own runtime, rather than on detrcore's std::thread pool).
    """
    return dict(_C.build_info())


@functools.lru_cache(maxsize=None)
def _cuda_devices() -> int:
    return int(_C.cuda_device_count())


def cuda_available() -> bool:
    """True when the CUDA kernels are built in and torch sees a CUDA device."""
    return bool(_C.build_info()["cuda"]) and torch.cuda.is_available() and _cuda_devices() > 0


def stream_of(t: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on t's device (0 on the CPU)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def num_threads() -> int:
    """The CPU thread count native kernels use: torch's own setting."""
    return torch.get_num_threads()


def under_torch_func() -> bool:
    """Inside a torch.func transform (grad, vmap, jacrev, ...) in eager mode. The native ops' autograd (plain
    autograd.Functions and torch.library's) has no functorch rules, so there the ops compute their pure-PyTorch
    twins (`detrcore.ops.reference`): the same function, differentiable and batchable by torch.func, slow."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """True when an op may call its native kernels through a plain autograd.Function instead of its torch custom op:
    plain tensors (no FakeTensor or other subclass), no torch.compile / torch.export / torch.jit tracing, no dispatch
    mode, no torch.func transform. Same kernels, same results; it skips the custom op's Python dispatch layers,
    ~70 µs per forward + backward on this project's CPU (a small MSDA call: 431 -> 361 µs). Everything else goes
    through the custom op (opcheck, compile, export, fake tensors)."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and all(type(t) is torch.Tensor for t in tensors)
            and _get_current_dispatch_mode() is None and torch._C._functorch.peek_interpreter_stack() is None)


def create_graph_grads(out: torch.Tensor, leaves, needs, grad: torch.Tensor) -> tuple:
    """For a fused node's double-backward path: d out / d leaves (weighted by grad) through the differentiable ops that
    recomputed `out`, with create_graph; None for the leaves whose `needs` is False."""
    wanted = [t for t, need in zip(leaves, needs) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True) if wanted else ())
    return tuple(next(grads) if need else None for need in needs)
