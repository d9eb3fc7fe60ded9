"""3x3 stride-1 convolutions in training (ResNet-50's, batch 2, at 256x320 and ~800x1216): detrcore.nn.Conv2d
(Winograd F(4x4, 3x3) or F(2x2, 3x3) where one applies) vs torch's convolution, forward + backward. Prints a table, writes JSON.

    python benchmarks/bench_conv.py [--repeats 7] [--threads 2] [--out benchmarks/results]
"""
import argparse
from pathlib import Path

import torch

from detrcore.bench import _common, conv

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    record = conv.run(repeats=args.repeats)
    print("wrote", _common.write_json(record, args.out / "conv_cpu.json"))
