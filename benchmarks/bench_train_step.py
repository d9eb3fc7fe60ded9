"""Training step (forward + loss + backward) per Deformable DETR variant on the CPU or a GPU: detrcore vs
HuggingFace transformers' DeformableDetrForObjectDetection with the same configuration (pip install transformers
pillow in the benchmark environment). Prints a table, writes JSON.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--size 800x1216] [--repeats 7] [--threads 2]
        [--precisions fp32,bf16] [--no-skip-padding] [--no-bind] [--out benchmarks/results]

Image size: 256x320 on the CPU, the official ~800x1200 (800x1216) on a GPU, unless --size says otherwise. The
OpenMP threads are bound to cores (OMP_PROC_BIND=true, unless the environment sets it or --no-bind), for both
implementations alike: unbound, the time of the same step moved by up to 10 % from one process to the next on the
2-core VM this project benchmarks on, with the core the main thread landed on.
"""
import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default=None, help="HEIGHTxWIDTH of the batch's two images")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 2 on the CPU, torch's on a GPU)")
    p.add_argument("--variants", default=None, help="comma-separated (default: all)")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--skip-padding", action=argparse.BooleanOptionalAction, default=True,
                   help="detrcore's encoder on the non-padded positions only (ModelConfig.skip_padding)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--bind", action=argparse.BooleanOptionalAction, default=True,
                   help="OMP_PROC_BIND=true (unless the environment sets it); must precede torch's import")
    args = p.parse_args()
    if args.bind:
        os.environ.setdefault("OMP_PROC_BIND", "true")
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before the OpenMP settings")

    import torch

    from detrcore._allocator import tune_cpu_allocator
    from detrcore.bench import _common, train_step

    tune_cpu_allocator()  # as `detrcore` does; one process: baseline and detrcore alike
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 2)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    variants = args.variants.split(",") if args.variants else list(train_step.VARIANTS)
    record = train_step.run(repeats=args.repeats, variants=variants,
                            precisions=args.precisions.split(","), device=args.device, size=size,
                            skip_padding=args.skip_padding)
    record["omp_proc_bind"] = os.environ.get("OMP_PROC_BIND")
    cuda = torch.device(args.device).type == "cuda"
    tag = torch.cuda.get_device_name(args.device).replace(" ", "_") if cuda else "cpu"
    suffix = "" if args.skip_padding else "_no_skip_padding"
    print("wrote", _common.write_json(record, args.out / f"train_step_{tag}{suffix}.json"))
