"""Box ops: detrcore vs plain PyTorch at 300x50, 900x100 and 16x(300x50). Prints a table, writes JSON.

    python benchmarks/bench_box_ops.py [--device cpu|cuda] [--repeats 7] [--out benchmarks/results]
"""
import argparse
from pathlib import Path

import torch

from detrcore.bench import _common, box_ops

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    record = box_ops.run(device=args.device, dtype=getattr(torch, args.dtype), repeats=args.repeats)
    tag = args.device.split(":")[0] if args.device == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
    print("wrote", _common.write_json(record, args.out / f"box_ops_{tag}_{args.dtype}.json"))
