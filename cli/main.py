"""`detrcore` commands. Each turns flags into plain arguments and calls the library; no logic lives here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

BENCHMARKS = ("boxes", "assignment", "msda")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="detrcore")
def main() -> None:
    """detrcore: DETR-family object detection with native deformable attention, box ops and matching."""


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

    WHICH is one of boxes, assignment, msda (multi-scale deformable attention) or all (the default).
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
