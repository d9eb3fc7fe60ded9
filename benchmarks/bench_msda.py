"""Multi-scale deformable attention: detrcore vs the grid_sample reference (and the original CUDA kernel when
importable). CPU: B=1, levels 64², 32², 16², 8²; CUDA: B=2, levels 100×150, 50×75, 25×38, 13×19; encoder
(Q = S) and decoder (Q = 300) shapes, H=8, D=32, P=4. Prints a table, writes JSON.

    python benchmarks/bench_msda.py [--device cpu|cuda] [--dtypes float32,bfloat16] [--repeats 5]
"""
import argparse
from pathlib import Path

import torch

from detrcore._allocator import tune_cpu_allocator
from detrcore.bench import _common, msda

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated; default float32 (CPU), float32,bfloat16 (CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    tune_cpu_allocator()  # as `detrcore` does; one process: baseline and detrcore alike
    cuda = args.device.startswith("cuda")
    names = args.dtypes or ("float32,bfloat16" if cuda else "float32")
    record = msda.run(device=args.device, dtypes=[getattr(torch, n) for n in names.split(",")], repeats=args.repeats)
    tag = torch.cuda.get_device_name().replace(" ", "_") if cuda else "cpu"
    print("wrote", _common.write_json(record, args.out / f"msda_{tag}.json"))
