"""Shared test parameters: devices (CUDA tests carry the `cuda` marker and skip without a GPU) and dtypes."""
import pytest
import torch

from detrcore import ops

HAS_CUDA = ops.cuda_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]
CPU_DTYPES = [torch.float32, torch.float64]
CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def device_dtypes():
    """(device, dtype) pairs the native kernels run in: float32/float64 on the CPU, all four on CUDA."""
    pairs = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in CPU_DTYPES]
    marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
    pairs += [pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=marks) for dt in CUDA_DTYPES]
    return pairs


def tolerances(dtype):
    """(rtol, atol) for comparing a native result in `dtype` with a float64 reference."""
    return {
        torch.float16: (1e-2, 2e-3),
        torch.bfloat16: (4e-2, 1e-2),
        torch.float32: (1e-5, 1e-5),
        torch.float64: (1e-10, 1e-12),
    }[dtype]
