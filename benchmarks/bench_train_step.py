"""Training step (forward + loss + backward) per Deformable DETR variant on the CPU or a GPU: detrcore vs
HuggingFace transformers' DeformableDetrForObjectDetection with the same configuration (pip install transformers
pillow in the benchmark environment). Prints a table, writes JSON.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--size 800x1216] [--repeats 7] [--threads 2]
        [--precisions fp32,bf16] [--no-skip-padding] [--out benchmarks/results]

Image size: 256x320 on the CPU, the official ~800x1200 (800x1216) on a GPU, unless --size says otherwise.
"""
import argparse
from pathlib import Path

import torch

from detrcore._allocator import tune_cpu_allocator
from detrcore.bench import _common, train_step

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default=None, help="HEIGHTxWIDTH of the batch's two images")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 2 on the CPU, torch's on a GPU)")
    p.add_argument("--variants", default=",".join(train_step.VARIANTS))
    p.add_argument("--precisions", default=",".join(train_step.PRECISIONS), help="fp32 and/or bf16 (autocast)")
    p.add_argument("--skip-padding", action=argparse.BooleanOptionalAction, default=True,
                   help="detrcore's encoder on the non-padded positions only (ModelConfig.skip_padding)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    tune_cpu_allocator()  # as `detrcore` does; one process: baseline and detrcore alike
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 2)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    record = train_step.run(repeats=args.repeats, variants=args.variants.split(","),
                            precisions=args.precisions.split(","), device=args.device, size=size,
                            skip_padding=args.skip_padding)
    cuda = torch.device(args.device).type == "cuda"
    tag = torch.cuda.get_device_name(args.device).replace(" ", "_") if cuda else "cpu"
    suffix = "" if args.skip_padding else "_no_skip_padding"
    print("wrote", _common.write_json(record, args.out / f"train_step_{tag}{suffix}.json"))
