"""Linear sum assignment: detrcore's native solver vs scipy (and lap / lapx when installed), same run."""
from __future__ import annotations

import numpy as np
import torch

from detrcore import ops

from ._common import machine, print_table, time_call

QUERIES = [100, 300, 900]
TARGETS = [1, 5, 20, 50, 100]
BATCH = (16, 300, 50)


def uniform_costs(rng: np.random.Generator, q: int, t: int) -> np.ndarray:
    return rng.random((q, t), dtype=np.float32)


def detr_costs(rng: np.random.Generator, q: int, t: int) -> np.ndarray:
    """A DETR matcher cost: 5 L1(cxcywh) - 2 GIoU - p(class) between random predictions and targets (float32)."""
    pred = torch.from_numpy(rng.random((q, 4), dtype=np.float32) * [1, 1, 0.3, 0.3] + [0, 0, 0.02, 0.02]).float()
    tgt = torch.from_numpy(rng.random((t, 4), dtype=np.float32) * [1, 1, 0.3, 0.3] + [0, 0, 0.02, 0.02]).float()
    l1 = torch.cdist(pred, tgt, p=1)
    giou = ops.generalized_box_iou(ops.box_cxcywh_to_xyxy(pred), ops.box_cxcywh_to_xyxy(tgt))
    prob = torch.from_numpy(rng.random((q, t), dtype=np.float32))
    return (5 * l1 - 2 * giou - prob).numpy()


def _baselines():
    import scipy.optimize

    found = {"scipy": scipy.optimize.linear_sum_assignment}
    try:  # lapx and lap both install the module `lap`
        import lap

        def lap_solve(c):
            return lap.lapjv(c, extend_cost=True, return_cost=False)

        found["lap.lapjv"] = lap_solve
    except ImportError:
        pass
    return found


def run(repeats: int = 7, kind: str = "uniform") -> dict:
    rng = np.random.default_rng(0)
    make = uniform_costs if kind == "uniform" else detr_costs
    baselines = _baselines()
    rows, records = [], []
    for q in QUERIES:
        for t in TARGETS:
            c = make(rng, q, t)
            ours = time_call(lambda: ops.linear_sum_assignment(c), repeats=repeats)
            rec = {"queries": q, "targets": t, "ours_us": ours * 1e6}
            for name, fn in baselines.items():
                rec[f"{name}_us"] = time_call(lambda: fn(c), repeats=repeats) * 1e6
            rec["speedup_vs_scipy"] = rec["scipy_us"] / rec["ours_us"]
            records.append(rec)
            rows.append([f"{q}x{t}", *(rec[f"{n}_us"] for n in baselines), rec["ours_us"], rec["speedup_vs_scipy"]])

    b, q, t = BATCH
    mats = [make(rng, q, t) for _ in range(b)]
    scipy_lsa = baselines["scipy"]
    batch_ours = time_call(lambda: ops.batched_linear_sum_assignment(mats), repeats=repeats)
    loop_ours = time_call(lambda: [ops.linear_sum_assignment(m) for m in mats], repeats=repeats)
    batch_scipy = time_call(lambda: [scipy_lsa(m) for m in mats], repeats=repeats)
    batch = {"batch": b, "queries": q, "targets": t, "scipy_loop_us": batch_scipy * 1e6,
             "ours_loop_us": loop_ours * 1e6, "ours_batched_us": batch_ours * 1e6,
             "threads": torch.get_num_threads(), "speedup_vs_scipy_loop": batch_scipy / batch_ours}
    rows.append([f"{b} x ({q}x{t}) batched", batch["scipy_loop_us"], *([""] * (len(baselines) - 1)),
                 batch["ours_batched_us"], batch["speedup_vs_scipy_loop"]])
    rows.append([f"{b} x ({q}x{t}) loop", batch["scipy_loop_us"], *([""] * (len(baselines) - 1)),
                 batch["ours_loop_us"], batch_scipy / loop_ours])

    print(f"\nlinear_sum_assignment, {kind} float32 costs, median of {repeats} (µs per call)")
    table = print_table(["queries x targets", *(f"{n} µs" for n in baselines), "ours µs", "vs scipy"], rows)
    return {"benchmark": "assignment", "costs": kind, "dtype": "float32", "machine": machine(),
            "per_matrix": records, "batch": batch, "table": table}
