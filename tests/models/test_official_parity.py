"""load_official against the official implementations: fixtures made once from facebookresearch/detr and
fundamentalvision/Deformable-DETR (tests/fixtures/make_official_fixtures.py; their code is not in this repo) hold
the official state-dict layout, an input and the official outputs. The weights are regenerated from the key names
(official_fill.py), loaded strictly through the documented key mapping, and our outputs must match theirs."""
from pathlib import Path

import pytest
import torch

from detrcore.models import load_official
from tests.models.official_fill import fill_value, official_input

FIXTURES = Path(__file__).parent.parent / "fixtures"
VARIANTS = ["detr_r50", "detr_r50_dc5", "deformable_detr", "deformable_detr_refine", "deformable_detr_two_stage"]


@pytest.fixture(scope="module", params=VARIANTS)
def case(request):
    fx = torch.load(FIXTURES / f"official_{request.param}.pt", weights_only=True)
    # tied official modules hold the fill of one key (effective_keys); official checkpoints have the same layout
    state = {k: fill_value(e, s) for k, e, s in zip(fx["keys"], fx["effective_keys"], fx["shapes"])}
    model = load_official(state, request.param, num_classes=91, num_queries=fx["config"].get("num_queries"))
    model = model.double().eval()
    _, images, mask = official_input()
    with torch.no_grad():
        out = model(images.double(), mask)
    return fx, out


def test_outputs_match_the_official_code(case):
    fx, out = case
    torch.testing.assert_close(out["pred_logits"].float(), fx["pred_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["pred_boxes"].float(), fx["pred_boxes"], rtol=0, atol=1e-4)
    aux_boxes = torch.stack([a["pred_boxes"] for a in out["aux_outputs"]]).float()
    torch.testing.assert_close(aux_boxes, fx["aux_pred_boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"].float(), fx["aux_pred_logits_0"], rtol=0,
                               atol=1e-4)
    if "enc_pred_logits" in fx:
        torch.testing.assert_close(out["enc_outputs"]["pred_logits"].float(), fx["enc_pred_logits"], rtol=0,
                                   atol=1e-4)
        torch.testing.assert_close(out["enc_outputs"]["pred_boxes"].float(), fx["enc_pred_boxes"], rtol=0, atol=1e-4)


def test_fixture_is_not_trivial(case):
    fx, _ = case
    assert fx["pred_logits"].std() > 1e-3 and fx["pred_boxes"].std() > 1e-3
    _, _, mask = official_input()
    stride32 = torch.nn.functional.interpolate(mask[None].float(), size=(3, 4)).bool()[0]
    assert stride32[1].any() and not stride32[0].any()  # padding reaches even the coarsest level


def test_wrong_class_count_is_explained():
    fx = torch.load(FIXTURES / "official_detr_r50.pt", weights_only=True)
    state = {k: torch.zeros(s) for k, s in zip(fx["keys"], fx["shapes"])}
    with pytest.raises(ValueError, match="num_classes excludes no-object"):
        load_official(state, "detr_r50", num_classes=92)
    with pytest.raises(ValueError, match="unknown variant"):
        load_official(state, "detr_r101")
