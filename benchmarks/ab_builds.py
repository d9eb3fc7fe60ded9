"""Two builds of the native core against each other, in one process (see detrcore.bench.ab): MSDA forward and
forward + backward at the CPU benchmark shapes, median per build and median per-round ratio. For trying a kernel
change: build the variant elsewhere (cmake -S . -B /tmp/variant ...) and compare it with the installed extension.

    python benchmarks/ab_builds.py PATH_A/_C*.so PATH_B/_C*.so [--rounds 15] [--threads 2] [--out ab.json]
"""
import argparse
from pathlib import Path

import torch

from detrcore._allocator import tune_cpu_allocator
from detrcore.bench import _common, ab

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builds", nargs=2, help="two extension files (_C*.so)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the records as JSON")
    args = p.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    builds = {"A": ab.load_build(args.builds[0], "build_a"), "B": ab.load_build(args.builds[1], "build_b")}
    records = ab.run_msda(builds, rounds=args.rounds)
    if args.out:
        record = {"benchmark": "ab_builds", "builds": args.builds, "machine": _common.machine(), "results": records}
        print("wrote", _common.write_json(record, args.out))
