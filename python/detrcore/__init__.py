"""detrcore: end-to-end object detection with the DETR family, with native hot paths.

`detrcore.ops` (box ops, linear assignment) imports only torch and numpy and can be used on its own.
"""
from importlib.metadata import PackageNotFoundError as _NotFound
from importlib.metadata import version as _version

try:
    __version__ = _version("detrcore")
except _NotFound:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from ._allocator import tune_cpu_allocator

__all__ = ["__version__", "tune_cpu_allocator"]
