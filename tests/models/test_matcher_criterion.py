"""HungarianMatcher, SetCriterion and PostProcess."""
import pytest
import scipy.optimize
import torch

from detrcore.models import HungarianMatcher, LossWeights, MatchCost, PostProcess, SetCriterion
from detrcore.ops import reference


def make_batch(sizes, Q=20, C=5, seed=0, extra_logit=True):
    g = torch.Generator().manual_seed(seed)
    B = len(sizes)
    outputs = {
        "pred_logits": torch.randn(B, Q, C + int(extra_logit), generator=g),
        "pred_boxes": torch.cat([torch.rand(B, Q, 2, generator=g), 0.05 + 0.3 * torch.rand(B, Q, 2, generator=g)], -1),
    }
    targets = [
        {"labels": torch.randint(0, C, (n,), generator=g),
         "boxes": torch.cat([torch.rand(n, 2, generator=g), 0.05 + 0.3 * torch.rand(n, 2, generator=g)], -1)}
        for n in sizes
    ]
    return outputs, targets


def reference_cost(out, tgt, b, cost: MatchCost):
    """The image's cost matrix as DETR writes it (plain torch, one image)."""
    logits, boxes = out["pred_logits"][b], out["pred_boxes"][b]
    if cost.focal:
        p = logits.sigmoid()
        neg = (1 - cost.focal_alpha) * p**cost.focal_gamma * -(1 - p + 1e-8).log()
        pos = cost.focal_alpha * (1 - p) ** cost.focal_gamma * -(p + 1e-8).log()
        c_class = (pos - neg)[:, tgt["labels"]]
    else:
        c_class = -logits.softmax(-1)[:, tgt["labels"]]
    c_bbox = torch.cdist(boxes, tgt["boxes"], p=1)
    giou = reference.generalized_box_iou(reference.box_cxcywh_to_xyxy(boxes), reference.box_cxcywh_to_xyxy(tgt["boxes"]))
    return cost.cost_class * c_class + cost.cost_bbox * c_bbox - cost.cost_giou * giou


@pytest.mark.parametrize("focal", [False, True])
def test_matching_is_optimal_against_scipy(focal):
    cost = MatchCost(cost_class=2.0 if focal else 1.0, focal=focal)
    outputs, targets = make_batch([3, 0, 7, 1], Q=25, extra_logit=not focal)
    indices = HungarianMatcher(cost)(outputs, targets)
    for b, (q, t) in enumerate(indices):
        assert q.dtype == torch.int64 and t.dtype == torch.int64
        assert len(q) == len(targets[b]["labels"]) and torch.all(q[1:] > q[:-1])
        c = reference_cost(outputs, targets[b], b, cost).numpy()
        if c.shape[1] == 0:
            continue
        rows, cols = scipy.optimize.linear_sum_assignment(c)
        assert c[q.numpy(), t.numpy()].sum() == pytest.approx(c[rows, cols].sum(), rel=1e-5)


def test_batched_layers_equal_per_image_and_per_layer():
    outputs, targets = make_batch([4, 2, 6], seed=1)
    aux = make_batch([4, 2, 6], seed=2)[0]
    matcher = HungarianMatcher()
    both = matcher.match_layers([outputs, aux], targets)
    for layer, out in enumerate((outputs, aux)):
        per_layer = matcher(out, targets)
        for b in range(3):
            single = matcher({k: v[b : b + 1] for k, v in out.items()}, [targets[b]])[0]
            for x, y, z in zip(both[layer][b], per_layer[b], single):
                assert torch.equal(x, y) and torch.equal(y, z)


def test_no_targets_anywhere():
    outputs, targets = make_batch([0, 0])
    for q, t in HungarianMatcher()(outputs, targets):
        assert q.numel() == 0 and t.numel() == 0
    losses = SetCriterion(5, HungarianMatcher())(outputs, targets)
    assert torch.isfinite(losses["loss"]) and losses["loss_bbox"] == 0


def test_nan_cost_names_the_image_and_term():
    outputs, targets = make_batch([2, 3])
    outputs["pred_boxes"][1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'bbox' is NaN for image 1"):
        HungarianMatcher()(outputs, targets)
    outputs, targets = make_batch([2, 3])
    outputs["pred_logits"][0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'class' is NaN for image 0"):
        HungarianMatcher()(outputs, targets)


@pytest.mark.parametrize("focal", [False, True])
def test_criterion_terms_and_gradients(focal):
    outputs, targets = make_batch([3, 5], extra_logit=not focal)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    aux = [{k: v.detach().clone().requires_grad_() for k, v in outputs.items()} for _ in range(2)]
    full = {**outputs, "aux_outputs": aux}
    if focal:
        full["enc_outputs"] = {k: v.detach().clone().requires_grad_() for k, v in outputs.items()}
    crit = SetCriterion(5, HungarianMatcher(focal=focal), LossWeights(loss_ce=2.0 if focal else 1.0), focal=focal)
    losses = crit(full, targets)
    keys = {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1", *(["_enc"] if focal else []))}
    assert keys | {"loss"} == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0 and aux[1]["pred_boxes"].grad.abs().sum() > 0
    w = crit.weights
    want = sum(getattr(w, k.rsplit("_", 1)[0] if k.count("_") > 1 else k) * v for k, v in losses.items() if k != "loss")
    torch.testing.assert_close(losses["loss"], want)


def test_perfect_boxes_have_zero_box_losses():
    outputs, targets = make_batch([3], Q=3)
    outputs["pred_boxes"][0] = targets[0]["boxes"][[2, 0, 1]]
    losses = SetCriterion(5, HungarianMatcher(cost_class=0.0))(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)


def test_no_object_class_is_checked():
    outputs, targets = make_batch([2], extra_logit=False)  # softmax head without the no-object logit
    with pytest.raises(ValueError, match="num_classes \\+ 1"):
        SetCriterion(5, HungarianMatcher())(outputs, targets)
    outputs, targets = make_batch([2], extra_logit=True)
    with pytest.raises(ValueError, match="focal"):
        SetCriterion(5, HungarianMatcher(focal=True), focal=True)(outputs, targets)


def test_softmax_ce_matches_a_hand_computation():
    outputs, targets = make_batch([2], Q=4, C=3)
    crit = SetCriterion(3, HungarianMatcher(), LossWeights(eos_coef=0.1))
    (q, t), = crit.matcher(outputs, targets)
    target_classes = torch.full((4,), 3)
    target_classes[q] = targets[0]["labels"][t]
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    want = torch.nn.functional.cross_entropy(outputs["pred_logits"][0], target_classes, weight)
    torch.testing.assert_close(crit(outputs, targets)["loss_ce"], want)


def test_postprocess_softmax_and_topk():
    outputs, _ = make_batch([1, 1], Q=10, C=4)
    sizes = torch.tensor([[100, 200], [50, 60]])
    dets = PostProcess()(outputs, sizes)
    assert len(dets) == 2 and dets[0]["boxes"].shape == (10, 4) and (dets[0]["labels"] < 4).all()
    b = outputs["pred_boxes"][1, 3]
    want = torch.stack([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]) * torch.tensor([60, 50, 60, 50])
    torch.testing.assert_close(dets[1]["boxes"][3], want)
    focal = PostProcess(focal=True, top_k=7)({"pred_logits": outputs["pred_logits"][..., :4],
                                             "pred_boxes": outputs["pred_boxes"]}, sizes)
    s = focal[0]["scores"]
    assert s.shape == (7,) and torch.all(s[:-1] >= s[1:])
    flat = outputs["pred_logits"][0, :, :4].sigmoid().flatten()
    top = flat.topk(1).indices.item()
    assert focal[0]["labels"][0].item() == top % 4
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(outputs, sizes[:1])
