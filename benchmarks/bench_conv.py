"""3x3 stride-1 convolutions (ResNet-50's, at 256x320 and ~800x1216): in training, detrcore.nn.Conv2d (Winograd
F(4x4, 3x3) or F(2x2, 3x3) where one applies) vs torch's convolution, forward + backward; in a forward alone (frozen,
BatchNorm folded, ReLU fused) Winograd F(4x4) where it applies vs torch's fused oneDNN convolution, and ResNet-50's
frozen backbone in inference. Prints the tables, writes JSON.

    python benchmarks/bench_conv.py [--repeats 7] [--threads 2] [--out benchmarks/results]
"""
import argparse
from pathlib import Path

import torch

from detrcore._allocator import tune_cpu_allocator
from detrcore.bench import _common, conv

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    tune_cpu_allocator()  # as `detrcore` does: multi-megabyte activations reused, not page-faulted in each call
    torch.set_num_threads(args.threads)
    record = conv.run(repeats=args.repeats)
    print("wrote", _common.write_json(record, args.out / "conv_cpu.json"))
