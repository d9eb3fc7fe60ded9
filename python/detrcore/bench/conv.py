"""3x3 stride-1 convolutions: in training (forward + backward, input and weight gradients) detrcore.nn.Conv2d (its
Winograd F(4x4, 3x3) or F(2x2, 3x3) path where one applies) vs torch's nn.Conv2d with the same weights; in a forward
alone (a frozen convolution + BatchNorm + ReLU, as ResNet's frozen layers and inference run it) detrcore's conv_bn
(Winograd F(4x4) where its forward regime applies) vs torch's oneDNN convolution with the folded bias and the ReLU
fused; and ResNet-50's frozen backbone in inference with that forward vs on torch's convolutions. Same run,
interleaved."""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from detrcore.models import backbone as bb
from detrcore.nn import Conv2d
from detrcore.nn import conv as conv_module

from ._common import machine, print_table, ratio, time_interleaved

# ResNet-50's 3x3 stride-1 convolutions (batch 2) at the CPU training benchmark's size (256 x 320: layer2 / 3 / 4)
# and at the official ~800 x 1216.
SHAPES = [(2, 128, 32, 40), (2, 256, 16, 20), (2, 512, 8, 10), (2, 128, 100, 152), (2, 256, 50, 76),
          (2, 512, 25, 38)]
# A forward alone: ResNet-50's layer1 / 2 / 3 3x3 convolutions at the CPU size (2 x 256 x 320; layer3's 40 4x4
# tiles are below the regime), layer1 / 2 / 3 of one ~800 x 1216 image (layer1's 3800 tiles above it), and ResNet-50
# inference at both sizes.
FORWARD_SHAPES = [(2, 64, 64, 80), (2, 128, 32, 40), (2, 256, 16, 20), (1, 64, 200, 304), (1, 128, 100, 152),
                  (1, 256, 50, 76)]
BACKBONE_INPUTS = [(2, 3, 256, 320), (1, 3, 800, 1216)]


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
        records.append(_record({"shape": [n, c, h, w]}, f"{n}x{c}x{h}x{w}", path, samples, rows))
    print(f"\n3x3 stride-1 convolution, forward + backward, {torch.get_num_threads()} CPU threads, interleaved, "
          f"median of {repeats} rounds (ms)")
    table = print_table(["input", "detrcore path", "torch ms", "detrcore ms", "speedup"], rows)
    forward = run_forward(repeats)
    return {"benchmark": "conv", "device": "cpu", "machine": machine(), "results": records, "table": table,
            "forward": forward}


def _frozen_conv_bn(c: int) -> tuple[Conv2d, bb.FrozenBatchNorm2d]:
    conv = Conv2d(c, c, 3, 1, 1, bias=False).requires_grad_(False)
    bn = bb.FrozenBatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    return conv, bn


def _torch_conv_bn_relu(conv: Conv2d, bn: bb.FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """torch's best forward for relu(bn(conv(x))): its oneDNN convolution with the folded weight and bias and the
    ReLU fused (plain convolution + ReLU on a torch without that op)."""
    weight, bias = bn.folded(conv)
    if bb._POINTWISE is None:
        return F.relu(F.conv2d(x, weight, bias, padding=1))
    return bb._POINTWISE[0](x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")


def run_forward(repeats: int = 7, shapes=None, backbone_inputs=None) -> dict:
    """The forward-alone rows: each convolution of `shapes` (N, C, H, W) frozen, with its BatchNorm and ReLU, and
    ResNet-50's frozen backbone at each of `backbone_inputs` (images [N, 3, H, W]), whose baseline is the same
    backbone with the Winograd forward's regime emptied (torch's convolutions)."""
    rows, records = [], []
    with torch.no_grad():
        for n, c, h, w in shapes or FORWARD_SHAPES:
            torch.manual_seed(0)
            conv, bn = _frozen_conv_bn(c)
            x = torch.randn(n, c, h, w)
            tile = conv._winograd_tile(x, training=False)
            samples = time_interleaved({"torch": lambda: _torch_conv_bn_relu(conv, bn, x),
                                        "detrcore": lambda: bb.conv_bn(conv, bn, x, relu=True)}, repeats=repeats)
            name = f"{n}x{c}x{h}x{w}"
            records.append(_record({"input": name}, name, f"winograd F({tile}x{tile})" if tile else "torch",
                                   samples, rows))
        body = bb.ResNet("resnet50").eval().requires_grad_(False)
        regime = conv_module.WINOGRAD_FORWARD_TILES
        for shape in backbone_inputs or BACKBONE_INPUTS:
            x = torch.randn(shape)

            def backbone(tiles):
                def f():
                    conv_module.WINOGRAD_FORWARD_TILES = tiles
                    try:
                        body.forward_stages(x)
                    finally:
                        conv_module.WINOGRAD_FORWARD_TILES = regime
                return f

            samples = time_interleaved({"torch": backbone((0, -1)), "detrcore": backbone(regime)}, repeats=repeats)
            name = "resnet50 " + "x".join(map(str, shape))
            records.append(_record({"input": name}, name, "winograd forward", samples, rows))
    print(f"\nforward alone (frozen 3x3 convolution + BatchNorm + ReLU; ResNet-50 frozen backbone), "
          f"{torch.get_num_threads()} CPU threads, interleaved, median of {repeats} rounds (ms)")
    table = print_table(["input", "detrcore path", "torch ms", "detrcore ms", "speedup"], rows)
    return {"results": records, "table": table}


def _record(key: dict, name: str, path: str, samples: dict, rows: list) -> dict:
    """One row's JSON record (key: its identifying fields) from its timings; its table row appended to rows."""
    rec = {**key, "path": path, "samples": samples, "torch_ms": 1e3 * statistics.median(samples["torch"]),
           "detrcore_ms": 1e3 * statistics.median(samples["detrcore"]),
           "speedup": ratio(samples["torch"], samples["detrcore"])}
    rows.append([name, path, rec["torch_ms"], rec["detrcore_ms"], rec["speedup"]])
    return rec
