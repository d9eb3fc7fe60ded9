"""Training step (forward + loss + backward) per Deformable DETR variant on the CPU: detrcore vs HuggingFace
transformers' DeformableDetrForObjectDetection with the same configuration (pip install transformers pillow in
the benchmark environment). Prints a table, writes JSON.

    python benchmarks/bench_train_step.py [--repeats 7] [--threads 2] [--precisions fp32,bf16]
        [--out benchmarks/results]
"""
import argparse
from pathlib import Path

import torch

from detrcore._allocator import tune_cpu_allocator
from detrcore.bench import _common, train_step

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(train_step.VARIANTS))
    p.add_argument("--precisions", default=",".join(train_step.PRECISIONS), help="fp32 and/or bf16 (CPU autocast)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    tune_cpu_allocator()  # as `detrcore` does; one process: baseline and detrcore alike
    torch.set_num_threads(args.threads)
    record = train_step.run(repeats=args.repeats, variants=args.variants.split(","),
                            precisions=args.precisions.split(","))
    print("wrote", _common.write_json(record, args.out / "train_step_cpu.json"))
