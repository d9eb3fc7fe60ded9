"""3x3 stride-1 convolutions in training (forward + backward, input and weight gradients): detrcore.nn.Conv2d (its
Winograd F(4x4, 3x3) or F(2x2, 3x3) path where one applies) vs torch's nn.Conv2d with the same weights, same run, interleaved."""
from __future__ import annotations

import statistics

import torch

from detrcore.nn import Conv2d

from ._common import machine, print_table, ratio, time_interleaved

# ResNet-50's 3x3 stride-1 convolutions (batch 2) at the CPU training benchmark's size (256 x 320: layer2 / 3 / 4)
# and at the official ~800 x 1216.
SHAPES = [(2, 128, 32, 40), (2, 256, 16, 20), (2, 512, 8, 10), (2, 128, 100, 152), (2, 256, 50, 76),
          (2, 512, 25, 38)]


def run(repeats: int = 7, shapes=None) -> dict:
    rows, records = [], []
    for n, c, h, w in shapes or SHAPES:
        torch.manual_seed(0)
        ours = Conv2d(c, c, 3, 1, 1, bias=False)
        ref = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(n, c, h, w, requires_grad=True)
        g = torch.randn(n, c, h, w)
        tile = ours._winograd_tile(x)
        path = f"winograd F({tile}x{tile})" if tile else "torch"

        def step(conv):
            return lambda: torch.autograd.grad(conv(x), (x, conv.weight), g)

        samples = time_interleaved({"torch": step(ref), "detrcore": step(ours)}, repeats=repeats)
        rec = {"shape": [n, c, h, w], "path": path, "samples": samples,
               "torch_ms": 1e3 * statistics.median(samples["torch"]),
               "detrcore_ms": 1e3 * statistics.median(samples["detrcore"]),
               "speedup": ratio(samples["torch"], samples["detrcore"])}
        records.append(rec)
        rows.append([f"{n}x{c}x{h}x{w}", path, rec["torch_ms"], rec["detrcore_ms"], rec["speedup"]])
    print(f"\n3x3 stride-1 convolution, forward + backward, {torch.get_num_threads()} CPU threads, interleaved, "
          f"median of {repeats} rounds (ms)")
    table = print_table(["input", "detrcore path", "torch ms", "detrcore ms", "speedup"], rows)
    return {"benchmark": "conv", "device": "cpu", "machine": machine(), "results": records, "table": table}
