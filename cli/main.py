"""`detrcore` commands. Each turns flags into plain arguments and calls the library; no logic lives here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

BENCHMARKS = ("boxes", "assignment", "msda", "conv")

# --model presets for small data on a CPU: the default backbone (frozen, pretrained EfficientNet-Lite0) and sizes,
# one architecture switch each. Anything else: --set model.KEY=VALUE.
MODEL_PRESETS = {
    "deformable-refine": {},  # the default
    "deformable": {"with_box_refine": False},
    "deformable-two-stage": {"two_stage": True},
    "detr": {"arch": "detr", "with_box_refine": False, "num_queries": 50, "dropout": 0.1},
    "detr-dc5": {"arch": "detr", "with_box_refine": False, "num_queries": 50, "dropout": 0.1,
                 "backbone": "resnet18", "backbone_weights": None, "dilation": True, "train_backbone": True},
}


def _fail(e: Exception) -> None:
    raise click.ClickException(f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, FileNotFoundError))
                               else str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="detrcore")
def main() -> None:
    """detrcore: DETR-family object detection with native deformable attention, box ops and matching."""
    from detrcore._allocator import tune_cpu_allocator

    tune_cpu_allocator()  # fault-free steady-state steps on the CPU (DETRCORE_MALLOC_TUNING=0: off)


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A JSON/TOML/YAML file of TrainConfig values.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, dotted for nested ones (model.hidden_dim=128). Repeatable.")
@click.option("--data", type=click.Path(), default=None,
              help="A COCO-format dataset (Roboflow train/valid/test or COCO layout). Default: the bundled data.")
@click.option("--model", "preset", type=click.Choice(sorted(MODEL_PRESETS)), default=None,
              help="Architecture preset (default: deformable-refine).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output directory (default runs/train).")
@click.option("--epochs", type=click.IntRange(1), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def train(config_file, overrides, data, preset, out, epochs, batch_size, device, resume) -> None:
    """Train a detector. With no arguments: a small Deformable DETR with box refinement on the pretrained
    EfficientNet-Lite0 backbone, on the bundled tree-crown data (about 10 minutes on 2 CPU cores).

    Writes checkpoints (last.pt, best.pt), metrics.csv / metrics.jsonl, eval.json, curves.png and
    predictions.png to --out.
    """
    from detrcore.engine.config import make_config
    from detrcore.engine.train import NonFiniteLoss, fit

    try:
        model_overrides = [f"model.{k}={json.dumps(v)}" for k, v in MODEL_PRESETS.get(preset or "", {}).items()]
        cfg = make_config(config_file, [*model_overrides, *overrides], data=data, out=out, epochs=epochs,
                          batch_size=batch_size, device=device)
        if resume and not (Path(cfg.out) / "last.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint {Path(cfg.out) / 'last.pt'} to continue from")
        fit(cfg, resume=resume, log=click.echo)
    except (ValueError, FileNotFoundError, NonFiniteLoss, OSError) as e:
        _fail(e)


def _load_run(checkpoint: str):
    """(model in eval mode, config, checkpoint dict) from a training checkpoint."""
    from detrcore.engine.checkpoint import load_checkpoint
    from detrcore.engine.config import TrainConfig
    from detrcore.models import build_model

    ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{checkpoint} is not a detrcore training checkpoint (no config/model)")
    cfg = TrainConfig.from_dict(ckpt["config"])
    cfg.model.backbone_weights = None  # the checkpoint holds every weight
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    # Inference only: frozen (no parameter needs a gradient), so the backbone runs its convolutions with the frozen
    # BN folded in (detrcore.models.backbone.conv_bn).
    return model.eval().requires_grad_(False), cfg, ckpt


def _image_batch(path: str, cfg):
    """(the image [3, H, W] in [0, 1], the model's input batch [1, 3, h, w], its mask) for one image file."""
    import torch

    from detrcore.data import collate, eval_transforms, load_image
    from detrcore.engine.data_setup import backbone_normalization

    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    raw = load_image(path)
    transform = eval_transforms(backbone_normalization(cfg.model.backbone), cfg.eval_size, cfg.max_size)
    x, _ = transform(raw, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    batch, mask, _ = collate([(x, {})])
    return raw, batch, mask


@main.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), default=None, help="Dataset to evaluate (default: the run's own data).")
@click.option("--split", type=click.Choice(["val", "test", "train"]), default="val", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results JSON here.")
@click.option("--batch-size", type=click.IntRange(1), default=2, show_default=True)
def eval_cmd(checkpoint, data, split, out, batch_size) -> None:
    """Evaluate a checkpoint with pycocotools: AP, AP50, AP75, AP by size, AR and per-class AP."""

    from detrcore.data import CocoDetection, eval_transforms
    from detrcore.engine.data_setup import backbone_normalization, make_loader, resolve_splits
    from detrcore.engine.evaluate import CocoEvaluator, format_table, save_json
    from detrcore.engine.train import evaluate, resolve_device
    from detrcore.models import PostProcess

    try:
        model, cfg, _ = _load_run(checkpoint)
        splits = resolve_splits(data if data is not None else cfg.data, log=click.echo)
        if split not in splits:
            raise FileNotFoundError(f"the dataset has no {split!r} split (found: {', '.join(sorted(splits))})")
        norm = backbone_normalization(cfg.model.backbone)
        ds = CocoDetection(*splits[split], transforms=eval_transforms(norm, cfg.eval_size, cfg.max_size))
        if ds.num_classes != cfg.model.num_classes:
            raise ValueError(f"the dataset has {ds.num_classes} classes, the checkpoint {cfg.model.num_classes}")
        cfg.batch_size = batch_size
        device = resolve_device(cfg.device)
        model.to(device)
        evaluator = CocoEvaluator(ds.coco_gt, ds.label_to_category_id)
        summary, _ = evaluate(model, make_loader(ds, cfg, train=False), PostProcess(focal=cfg.model.focal),
                              evaluator, device, cfg)
        click.echo(format_table(summary))
        if out:
            save_json(summary, out)
            click.echo(f"wrote {out}")
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="predictions", show_default=True)
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True)
def predict(checkpoint, images, out, threshold) -> None:
    """Detect objects in IMAGES: one PNG per image with the boxes drawn, and detections.json."""
    import torch

    from detrcore._io import atomic_path, write_text_atomic
    from detrcore.engine.plots import draw_detections
    from detrcore.models import PostProcess

    try:
        model, cfg, ckpt = _load_run(checkpoint)
        names = ckpt.get("classes") or [str(i) for i in range(cfg.model.num_classes)]
        post = PostProcess(focal=cfg.model.focal)
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for path in images:
            raw, batch, mask = _image_batch(path, cfg)
            h, w = raw.shape[-2:]
            with torch.no_grad():
                result = post(model(batch, mask), torch.tensor([[h, w]]))[0]
            keep = result["scores"] >= threshold
            boxes, labels, scores = result["boxes"][keep], result["labels"][keep], result["scores"][keep]
            picture = draw_detections(raw, boxes, labels, scores, names)
            target = out_dir / (Path(path).stem + ".png")
            with atomic_path(target) as tmp:
                picture.save(tmp, format="PNG")
            records.append({"image": str(path), "width": int(w), "height": int(h), "detections": [
                {"box_xyxy": [round(float(v), 2) for v in b], "label": names[int(l)], "score": round(float(s), 4)}
                for b, l, s in zip(boxes, labels, scores)]})
            click.echo(f"{path}: {int(keep.sum())} detections -> {target}")
        write_text_atomic(out_dir / "detections.json", json.dumps(records, indent=2))
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)


@main.command(name="compare")
@click.option("--data", type=click.Path(), default=None, help="Dataset (default: the bundled data).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs per variant (default: the config's).")
@click.option("--models", default="detr,detr-dc5,deformable,deformable-refine,deformable-two-stage",
              show_default=True, help="Comma-separated variants.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/compare", show_default=True)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (all variants).")
def compare_cmd(data, epochs, models, out, config_file, overrides) -> None:
    """Train and evaluate several variants with the same data, schedule, image size and seed; write
    compare.md, compare.csv and compare.png (AP50 and loss curves). A finished variant is not trained again."""
    from detrcore.engine.compare import VARIANTS, compare
    from detrcore.engine.config import make_config
    from detrcore.engine.train import NonFiniteLoss

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}",
                                 param_hint="--models")
    try:
        base = make_config(config_file, list(overrides), data=data, epochs=epochs)
        compare(base, names, out, log=click.echo)
    except (ValueError, FileNotFoundError, NonFiniteLoss, OSError) as e:
        _fail(e)


@main.group()
def visualize() -> None:
    """Pictures of what a trained model does."""


@visualize.command(name="attention")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--image", required=True, type=click.Path(dir_okay=False))
@click.option("--queries", type=click.IntRange(1, 50), default=5, show_default=True, help="Top-scoring queries drawn.")
@click.option("--out", type=click.Path(dir_okay=False), default="attention.png", show_default=True)
def visualize_attention(checkpoint, image, queries, out) -> None:
    """Draw the last decoder layer's deformable sampling points of the top queries, coloured by attention
    weight, one panel per feature level (Deformable DETR checkpoints)."""
    from detrcore.engine.visualize import attention_picture

    try:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image not found: {image}")
        model, cfg, _ = _load_run(checkpoint)
        raw, batch, mask = _image_batch(image, cfg)
        drawn = attention_picture(model, raw, batch, mask, out, queries)
        click.echo(f"wrote {out}: queries {drawn['queries']} (scores "
                   f"{', '.join(f'{s:.2f}' for s in drawn['scores'])}), {drawn['levels']} levels")
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)


@main.group()
def data() -> None:
    """Dataset utilities."""


@data.command()
@click.option("--from", "fmt", type=click.Choice(["voc", "yolo"]), required=True, help="Source layout.")
@click.option("--images", type=click.Path(file_okay=False, exists=True), required=True, help="Image folder.")
@click.option("--labels", type=click.Path(file_okay=False, exists=True), default=None,
              help="VOC XML or YOLO txt folder (default: the image folder).")
@click.option("--classes", default=None, help="Comma-separated class names (YOLO: default classes.txt/data.yaml).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The COCO JSON to write.")
def convert(fmt, images, labels, classes, out) -> None:
    """Convert Pascal VOC XML or YOLO txt annotations to a COCO instances JSON."""
    from detrcore.data import convert as conv

    names = [c.strip() for c in classes.split(",")] if classes else None
    try:
        if fmt == "voc":
            coco = conv.voc_to_coco(labels or images, images, out, categories=names)
        else:
            coco = conv.yolo_to_coco(images, out, labels_dir=labels, class_names=names)
        click.echo(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
                   f"{len(coco['categories'])} categories")
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)


@main.command()
def info() -> None:
    """Print what the native core was built with and what this machine offers."""
    import torch

    from detrcore import ops

    record = {"build": ops.build_info(), "cuda_available": ops.cuda_available(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    click.echo(json.dumps(record, indent=2))


@main.command()
@click.argument("which", type=click.Choice([*BENCHMARKS, "all"]), default="all")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench_results"),
              show_default=True, help="Directory for the JSON records.")
@click.option("--repeats", type=click.IntRange(3, 101), default=7, show_default=True,
              help="Timed batches per measurement; the median is reported.")
@click.option("--device", default="cpu", show_default=True, help="Device for the box-op and MSDA benchmarks (cpu, cuda).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="torch.set_num_threads before timing.")
def bench(which: str, out_dir: Path, repeats: int, device: str, threads: int | None) -> None:
    """Time detrcore's ops against their baselines (plain PyTorch, scipy) and write JSON records.

    WHICH is one of boxes, assignment, msda (multi-scale deformable attention), conv (3x3 convolutions, in training
    and in a forward alone) or all (the default).
    """
    import torch

    from detrcore.bench import _common

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available", param_hint="--device")
    todo = BENCHMARKS if which == "all" else (which,)
    tag = device.split(":")[0]
    for name in todo:
        if name == "boxes":
            from detrcore.bench import box_ops

            record = box_ops.run(device=device, repeats=repeats)
            path = _common.write_json(record, out_dir / f"box_ops_{tag}.json")
        elif name == "conv":
            from detrcore.bench import conv

            if not device.startswith("cpu"):
                click.echo("conv: CPU only (the Winograd path is the CPU's); skipped")
                continue
            record = conv.run(repeats=repeats)
            path = _common.write_json(record, out_dir / "conv_cpu.json")
        elif name == "msda":
            from detrcore.bench import msda

            dtypes = [torch.float32, torch.bfloat16] if device.startswith("cuda") else [torch.float32]
            record = msda.run(device=device, dtypes=dtypes, repeats=repeats)
            path = _common.write_json(record, out_dir / f"msda_{tag}.json")
        else:
            from detrcore.bench import assignment

            try:
                record = assignment.run(repeats=repeats)
            except ImportError as e:
                raise click.ClickException(f"the assignment benchmark compares with scipy: pip install scipy ({e})")
            path = _common.write_json(record, out_dir / "assignment_cpu.json")
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
