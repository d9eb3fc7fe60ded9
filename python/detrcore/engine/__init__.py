"""Training loop, evaluation, checkpoints and plots.

Importing `detrcore.engine` is light (torch, numpy, Pillow): pycocotools is imported when a `CocoEvaluator` is
built, matplotlib when `plot_curves` runs.
"""
from .checkpoint import atomic_save, load_checkpoint
from .config import TrainConfig, make_config
from .evaluate import CocoEvaluator, format_table, save_json
from .plots import detection_grid, draw_detections, plot_curves

__all__ = ["TrainConfig", "make_config", "atomic_save", "load_checkpoint", "CocoEvaluator", "format_table", "save_json", "plot_curves", "draw_detections", "detection_grid"]
