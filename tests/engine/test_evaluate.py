"""CocoEvaluator against a tiny hand-built COCO ground truth (category ids 3, 7 and 9; 9 has no ground truth)."""
import json
import os

import pytest
import torch

pytest.importorskip("pycocotools")

from detrcore.engine import CocoEvaluator, format_table, save_json  # noqa: E402
from detrcore.engine.evaluate import STAT_NAMES  # noqa: E402

LABEL_TO_CAT = [3, 7, 9]  # contiguous label -> the file's category id


def make_gt():
    """3 images (image 3 without ground truth), boxes xywh: one small, three medium, one large."""
    return {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 200, "height": 150},
                   {"id": 3, "width": 120, "height": 80}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 20, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [20, 30, 60, 50], "area": 3000, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [100, 40, 90, 105], "area": 9450, "iscrowd": 0},
            {"id": 5, "image_id": 2, "category_id": 7, "bbox": [5, 100, 40, 45], "area": 1800, "iscrowd": 0},
        ],
    }


def perfect_predictions(gt, label_of=None, shift=0.0, score=0.9):
    """Per image, the ground truth as PostProcess would return it (xyxy pixels, contiguous labels)."""
    label_of = label_of or {c: i for i, c in enumerate(LABEL_TO_CAT)}
    preds = {img["id"]: {"scores": [], "labels": [], "boxes": []} for img in gt["images"]}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        p = preds[a["image_id"]]
        p["boxes"].append([x + shift, y + shift, x + w + shift, y + h + shift])
        p["labels"].append(label_of[a["category_id"]])
        p["scores"].append(score)
    return {i: {"scores": torch.tensor(p["scores"], dtype=torch.float32),
                "labels": torch.tensor(p["labels"], dtype=torch.int64),
                "boxes": torch.tensor(p["boxes"], dtype=torch.float32).reshape(-1, 4)} for i, p in preds.items()}


def per_class(summary):
    return {c["category_id"]: c for c in summary["per_class"]}


def test_perfect_predictions_give_ap_one():
    gt = make_gt()
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ev.update(perfect_predictions(gt))
    s = ev.summarize()
    assert set(STAT_NAMES) <= s.keys()
    for name in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR_100"):
        assert s[name] == pytest.approx(1.0), name
    pc = per_class(s)
    assert [c["category_id"] for c in s["per_class"]] == [3, 7, 9]
    assert [c["name"] for c in s["per_class"]] == ["cat", "dog", "bird"]
    for cat in (3, 7):
        assert pc[cat]["AP"] == pytest.approx(1.0) and pc[cat]["AP50"] == pytest.approx(1.0)
    assert pc[9]["AP"] is None and pc[9]["AP50"] is None  # no ground truth for category 9
    assert s["num_images"] == 3 and s["num_detections"] == 5
    assert gt == make_gt()  # the caller's dict is not modified


def test_shifted_boxes_lower_ap():
    gt = make_gt()
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ev.update(perfect_predictions(gt, shift=6.0))
    s = ev.summarize()
    assert 0.0 < s["AP"] < 1.0
    assert s["AP75"] <= s["AP50"] and s["AP"] <= s["AP50"]
    assert per_class(s)[3]["AP"] < 1.0


@pytest.mark.parametrize("how", ["never_updated", "empty_tensors", "empty_dict"])
def test_no_detections_gives_zero(how):
    gt = make_gt()
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    if how == "empty_tensors":
        ev.update({i: {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                       "boxes": torch.zeros(0, 4)} for i in (1, 2, 3)})
    elif how == "empty_dict":
        ev.update({})
    s = ev.summarize()
    assert s["AP"] == 0.0 and s["AP50"] == 0.0 and s["AR_100"] == 0.0
    assert s["AP_small"] == 0.0  # ground truth exists in the range: 0, not None
    pc = per_class(s)
    assert pc[3]["AP"] == 0.0 and pc[7]["AP"] == 0.0 and pc[9]["AP"] is None
    assert s["num_detections"] == 0


def test_ground_truth_without_annotations():
    gt = make_gt()
    gt["annotations"] = []
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ev.update({1: {"scores": [0.5], "labels": [0], "boxes": [[0, 0, 10, 10]]}})
    s = ev.summarize()
    assert all(s[name] is None for name in STAT_NAMES)
    assert all(c["AP"] is None for c in s["per_class"])


def test_label_remapping():
    gt = make_gt()
    # labels given as a dict, in another order than the category ids
    mapping = {0: 7, 1: 9, 2: 3}
    ev = CocoEvaluator(gt, mapping)
    ev.update(perfect_predictions(gt, label_of={7: 0, 9: 1, 3: 2}))
    assert ev.summarize()["AP"] == pytest.approx(1.0)

    # the same predictions read with the list mapping put every box in the wrong category
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ev.update(perfect_predictions(gt, label_of={7: 0, 9: 1, 3: 2}))
    s = ev.summarize()
    assert s["AP"] == 0.0
    assert per_class(s)[3]["AP"] == 0.0


def test_unknown_category_is_dropped_and_unmapped_label_raises():
    gt = make_gt()
    ev = CocoEvaluator(gt, {0: 3, 1: 7, 2: 9, 3: 55})  # 55 is not a category of the file
    preds = perfect_predictions(gt)
    extra = {"scores": torch.tensor([0.99]), "labels": torch.tensor([3]), "boxes": torch.tensor([[0., 0, 50, 50]])}
    preds[1] = {k: torch.cat([preds[1][k], extra[k]]) for k in extra}
    ev.update(preds)
    s = ev.summarize()
    assert s["AP"] == pytest.approx(1.0) and s["num_detections"] == 5
    with pytest.raises(ValueError, match="label_to_category_id"):
        ev.update({1: {"scores": [0.5], "labels": [4], "boxes": [[0, 0, 1, 1]]}})
    with pytest.raises(ValueError, match="image id 42"):
        ev.update({42: {"scores": [0.5], "labels": [0], "boxes": [[0, 0, 1, 1]]}})


def test_image_without_ground_truth():
    gt = make_gt()
    # no detections on image 3 (no ground truth there): still perfect
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ev.update(perfect_predictions(gt))
    assert ev.summarize()["AP"] == pytest.approx(1.0)
    # a confident false positive on image 3 ranks above every true positive of its class: AP drops
    preds = perfect_predictions(gt)
    preds[3] = {"scores": torch.tensor([0.99]), "labels": torch.tensor([0]), "boxes": torch.tensor([[5., 5, 60, 60]])}
    ev.update(preds)
    s = ev.summarize()
    assert per_class(s)[3]["AP"] < 1.0 and per_class(s)[7]["AP"] == pytest.approx(1.0)


def test_subset_of_images_and_update_replaces():
    gt = make_gt()
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    preds = perfect_predictions(gt)
    ev.update({1: preds[1]})
    ev.update({1: preds[1]})  # the same image again (DistributedSampler padding): replaced, not doubled
    s = ev.summarize()
    assert s["num_images"] == 1 and s["num_detections"] == 2 and s["AP"] == pytest.approx(1.0)
    ev.reset()
    assert ev.summarize()["num_detections"] == 0


def test_gather_is_noop_without_distributed():
    gt = make_gt()
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ev.update(perfect_predictions(gt))
    before = ev.summarize()
    ev.gather()
    assert ev.summarize() == before


def test_gather_single_process_group(tmp_path):
    """The distributed path, in a one-process gloo group."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        gt = make_gt()
        ev = CocoEvaluator(gt, LABEL_TO_CAT)
        ev.update(perfect_predictions(gt))
        ev.gather()
        s = ev.summarize()
    finally:
        dist.destroy_process_group()
    assert s["AP"] == pytest.approx(1.0) and s["num_detections"] == 5


def test_quiet_unless_verbose(capsys):
    gt = make_gt()
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ev.update(perfect_predictions(gt))
    ev.summarize()
    assert capsys.readouterr().out == ""
    ev = CocoEvaluator(gt, LABEL_TO_CAT, verbose=True)
    ev.update(perfect_predictions(gt))
    ev.summarize()
    assert "Average Precision" in capsys.readouterr().out


def test_gt_from_file_and_missing_fields(tmp_path):
    gt = make_gt()
    for a in gt["annotations"]:  # minimal annotations: area, iscrowd and id are filled in
        del a["area"], a["iscrowd"], a["id"]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ev = CocoEvaluator(path, LABEL_TO_CAT)
    ev.update(perfect_predictions(gt))
    assert ev.summarize()["AP"] == pytest.approx(1.0)


def test_format_table_and_save_json(tmp_path):
    gt = make_gt()
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ev.update(perfect_predictions(gt, shift=3.0))
    s = ev.summarize()
    table = format_table(s)
    for word in ("AP50", "AR_large", "cat", "dog", "bird", f"{100 * s['AP']:.1f}"):
        assert word in table
    bird_line = next(line for line in table.splitlines() if "bird" in line)
    assert bird_line.split()[-2:] == ["-", "-"]

    out = tmp_path / "sub" / "coco.json"
    save_json(s, out)
    assert json.loads(out.read_text()) == s
    assert os.listdir(out.parent) == ["coco.json"]  # no temporary file left behind


def test_save_json_failure_leaves_old_file_and_no_temp(tmp_path):
    out = tmp_path / "coco.json"
    save_json({"AP": 0.5}, out)
    with pytest.raises(TypeError):
        save_json({"AP": object()}, out)  # not serialisable: fails half-way
    assert json.loads(out.read_text()) == {"AP": 0.5}
    assert os.listdir(tmp_path) == ["coco.json"]


@pytest.mark.parametrize("bad_ids", [[0, 2, 3, 4, 5], [1, 1, 3, 3, 5], [1, "a", 3, 2.0, True]])
def test_unusable_annotation_ids_are_renumbered(bad_ids):
    """pycocotools takes id 0 for "unmatched" and indexes by id: such ids must not reach it as they are."""
    gt = make_gt()
    for a, i in zip(gt["annotations"], bad_ids):
        a["id"] = i
    ev = CocoEvaluator(gt, LABEL_TO_CAT)
    ids = [a["id"] for a in ev.coco_gt.dataset["annotations"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
    ev.update(perfect_predictions(gt))
    s = ev.summarize()
    assert s["AP50"] == pytest.approx(1.0) and s["AP"] == pytest.approx(1.0)
    assert [a["id"] for a in gt["annotations"]] == bad_ids  # the caller's dict is not modified
