"""Packaging contract: build_info, cuda_available, and what `import detrcore.ops` pulls in."""
import json
import subprocess
import sys

import pytest
import torch

from detrcore import ops
from detrcore import _C


def test_build_info_fields():
    info = ops.build_info()
    for key in ("version", "cuda", "cuda_archs", "cuda_version", "openmp"):
        assert key in info
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    import detrcore

    assert info["version"] == detrcore.__version__
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_version"]
    else:
        assert info["cuda_version"] is None


def test_cuda_available_is_consistent():
    avail = ops.cuda_available()
    assert isinstance(avail, bool)
    assert avail == (ops.build_info()["cuda"] and torch.cuda.is_available() and _C.cuda_device_count() > 0)


def test_import_ops_pulls_only_torch_and_numpy():
    code = (
        "import sys, json; import detrcore.ops; "
        "print(json.dumps(sorted(m for m in ('scipy', 'click', 'matplotlib', 'pycocotools', 'PIL') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []


def test_native_module_imports_without_gpu_driver_dependency():
    # The module is loaded already; on a machine without a driver cuda_device_count() must answer 0, not fail.
    assert _C.cuda_device_count() >= 0


def test_dlpack_is_zero_copy_and_sees_strides():
    # torch tensors arrive through DLPack (the C exchange API where torch has it), numpy arrays directly
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, 1::2]
    seen = _C.inspect(x)
    assert seen["data_ptr"] == x.data_ptr()
    assert seen["shape"] == [4, 3] and seen["strides"] == [6, 2]
    assert seen["contiguous"] is False and seen["dtype"] == "float32" and seen["device"] == "cpu"
    import numpy as np

    a = np.arange(12.0).reshape(3, 4).T
    seen = _C.inspect(a)
    assert seen["data_ptr"] == a.ctypes.data and seen["strides"] == [1, 4] and seen["path"] == "numpy"


def test_a_second_build_loads_as_a_distinct_module():
    # The in-process A/B tool (benchmarks/ab_builds.py): a build loaded under a name of its own is its own module,
    # not the imported detrcore._C (which a second load under that name would silently return).
    from detrcore import _C
    from detrcore.bench.ab import load_build

    other = load_build(_C.__file__, "detrcore_test_build")
    assert other is not _C and other.__name__ == "detrcore_test_build._C"
    assert other.build_info()["version"] == _C.build_info()["version"]
    for taken in ("detrcore", "detrcore_test_build"):
        with pytest.raises(ValueError, match="taken"):
            load_build(_C.__file__, taken)
