"""Linear sum assignment: detrcore vs scipy (and lap/lapx if installed), 100/300/900 queries x 1..100 targets
and a batch of 16 x (300x50). Prints a table, writes JSON.

    python benchmarks/bench_assignment.py [--costs uniform|detr] [--repeats 7] [--out benchmarks/results]
"""
import argparse
from pathlib import Path

from detrcore.bench import _common, assignment

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--costs", default="uniform", choices=["uniform", "detr"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    record = assignment.run(repeats=args.repeats, kind=args.costs)
    print("wrote", _common.write_json(record, args.out / f"assignment_cpu_{args.costs}.json"))
