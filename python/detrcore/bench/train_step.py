"""One training step (forward + loss + backward) per Deformable DETR variant, on the CPU or a CUDA device: detrcore
vs HuggingFace transformers' DeformableDetrForObjectDetection with the same configuration, same run. transformers is
a baseline installed in the benchmark environment only (plus Pillow, which its loss needs); never a detrcore
dependency."""
from __future__ import annotations

import statistics

import torch

from detrcore.models import HungarianMatcher, LossWeights, ModelConfig, SetCriterion, build_model

from ._common import machine, print_table, ratio, time_interleaved

VARIANTS = {"deformable": {}, "deformable-refine": {"with_box_refine": True},
            "deformable-two-stage": {"with_box_refine": True, "two_stage": True}}
# The official architecture (ResNet-50, d=256, 6+6 layers, FFN 1024, 300 queries, 4 levels, 4 points). On the CPU a
# small batch: 2 images of 256 x 320 with 3 boxes each; on a GPU the official scale (2 images of ~800 x 1200).
BATCH, HEIGHT, WIDTH, NUM_CLASSES, BOXES = 2, 256, 320, 20, 3
GPU_SIZE = (800, 1216)


def make_batch(seed: int = 0, size: tuple[int, int] = (HEIGHT, WIDTH), device: str = "cpu"):
    height, width = size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, height, width, generator=g)
    mask = torch.zeros(BATCH, height, width, dtype=torch.bool)
    mask[1, height * 3 // 4 :], mask[1, :, width * 3 // 4 :] = True, True  # the second image is padded
    targets = []
    for _ in range(BATCH):
        c = 0.2 + 0.6 * torch.rand(BOXES, 2, generator=g)
        wh = 0.05 + 0.2 * torch.rand(BOXES, 2, generator=g)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (BOXES,), generator=g).to(device),
                        "boxes": torch.cat([c, wh], 1).to(device)})
    return images.to(device), mask.to(device), targets


def ours(variant: dict, size=(HEIGHT, WIDTH), device: str = "cpu", skip_padding: bool = True):
    cfg = ModelConfig(num_classes=NUM_CLASSES, backbone="resnet50", skip_padding=skip_padding, **variant)
    model = build_model(cfg).train().to(device)
    crit = SetCriterion(NUM_CLASSES, HungarianMatcher(cost_class=2.0, focal=True), LossWeights(loss_ce=2.0),
                        focal=True)
    images, mask, targets = make_batch(size=size, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        crit(model(images, mask), targets)["loss"].backward()

    return step, sum(p.numel() for p in model.parameters())


def huggingface(variant: dict, size=(HEIGHT, WIDTH), device: str = "cpu"):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    cfg = DeformableDetrConfig(
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]), num_labels=NUM_CLASSES,
        d_model=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
        encoder_attention_heads=8, decoder_attention_heads=8, num_queries=300, num_feature_levels=4,
        encoder_n_points=4, decoder_n_points=4, auxiliary_loss=True, disable_custom_kernels=True,
        # The official recipe (and ours) drops out 0.1 everywhere, the FFN activations and the decoder's
        # self-attention weights included; transformers defaults those two to 0.0.
        dropout=0.1, activation_dropout=0.1, attention_dropout=0.1,
        with_box_refine=variant.get("with_box_refine", False), two_stage=variant.get("two_stage", False),
    )
    model = DeformableDetrForObjectDetection(cfg).train().to(device)
    # The official recipe trains ResNet layer2..4 (lr_backbone > 0). transformers means to do the same but tests
    # parameter names for "stage.1".."stage.3" while its ResNet names them "stages.1"..: its whole backbone ends
    # up frozen. Train the same stages as ours so both steps do the same work.
    for name, param in model.model.backbone.model.named_parameters():
        param.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))
    images, mask, targets = make_batch(size=size, device=device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = (~mask).long()  # HF: 1 on valid pixels

    def step():
        model.zero_grad(set_to_none=True)
        model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss.backward()

    return step, sum(p.numel() for p in model.parameters())


PRECISIONS = ("fp32", "bf16")  # bf16: both steps under torch.autocast(<device>, dtype=torch.bfloat16)


def _autocast(step, precision: str, device: str = "cpu"):
    if precision == "fp32":
        return step

    def wrapped():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            step()

    return wrapped


def run(repeats: int = 7, variants=None, precisions=PRECISIONS, device: str = "cpu", size=None,
        skip_padding: bool = True) -> dict:
    """size: (height, width) of the batch's images; default 256 x 320 on the CPU, GPU_SIZE on a GPU.
    skip_padding: ModelConfig.skip_padding of detrcore's models (the batch's second image is 44 % padding)."""
    cuda = torch.device(device).type == "cuda"
    size = tuple(size or (GPU_SIZE if cuda else (HEIGHT, WIDTH)))
    rows, records = [], []
    for name in variants or VARIANTS:
        for precision in precisions:
            torch.manual_seed(0)
            steps, rec = {}, {"variant": name, "precision": precision}
            steps["ours"], rec["ours_params"] = ours(VARIANTS[name], size, device, skip_padding)
            try:
                steps["transformers"], rec["transformers_params"] = huggingface(VARIANTS[name], size, device)
            except ImportError as e:
                rec["transformers_error"] = str(e)
            samples = time_interleaved({k: _autocast(v, precision, device) for k, v in steps.items()},
                                       repeats=repeats, min_time=0, sync=cuda)
            rec["ours_s"] = statistics.median(samples["ours"])
            if "transformers" in samples:
                rec["transformers_s"] = statistics.median(samples["transformers"])
                ratios = [t / o for t, o in zip(samples["transformers"], samples["ours"])]
                rec["speedup"] = ratio(samples["transformers"], samples["ours"])
                rec["speedup_min"], rec["speedup_max"] = min(ratios), max(ratios)
            rec["samples"] = samples
            records.append(rec)
            rows.append([name, precision, rec.get("transformers_s", ""), rec["ours_s"], rec.get("speedup", ""),
                         f"{rec['speedup_min']:.2f}-{rec['speedup_max']:.2f}" if "speedup" in rec else ""])
            del steps
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"\ntraining step (forward + loss + backward), batch {BATCH} x {size[0]}x{size[1]}, ResNet-50, "
          f"{where}, interleaved, median of {repeats} rounds (s; speedup: median of the "
          f"per-round ratios, and their range)")
    table = print_table(["variant", "precision", "transformers s", "detrcore s", "speedup", "range"], rows)
    try:
        import transformers

        version = transformers.__version__
    except ImportError:
        version = None
    return {"benchmark": "train_step", "device": device, "batch": [BATCH, 3, *size], "transformers": version,
            "skip_padding": skip_padding,
            "machine": machine(), "results": records, "table": table}
