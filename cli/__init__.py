"""The `detrcore` command line (click). Installed as detrcore.cli; the entry point is `detrcore`."""
from .main import main

__all__ = ["main"]
