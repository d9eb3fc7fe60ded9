"""detrcore.nn.MSDeformAttn: the paper's initialisation, reference-point forms, padding mask, autograd."""
import math

import pytest
import torch

from detrcore.nn import MSDeformAttn, TokenPacking
from detrcore.ops import ms_deform_attn
from detrcore.ops import reference
from detrcore.ops.deform_attn import level_start_index_of

SHAPES = torch.tensor([[8, 6], [4, 3], [2, 2]])


def inputs(B=2, Q=5, C=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = int((SHAPES[:, 0] * SHAPES[:, 1]).sum())
    return (torch.randn(B, Q, C, generator=g), torch.rand(B, Q, 3, 2, generator=g), torch.randn(B, S, C, generator=g))


def test_initialisation_follows_the_paper():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    bias = m.sampling_offsets.bias.view(4, 3, 2, 2)
    # head h points in direction 2*pi*h/4 (scaled onto the unit square), point i at distance i + 1
    torch.testing.assert_close(bias[0, :, 0], torch.tensor([[1.0, 0.0]] * 3))
    torch.testing.assert_close(bias[1, :, 1], torch.tensor([[0.0, 2.0]] * 3), atol=1e-6, rtol=0)
    assert (m.sampling_offsets.weight == 0).all()
    assert (m.attention_weights.weight == 0).all() and (m.attention_weights.bias == 0).all()
    assert (m.value_proj.bias == 0).all() and m.value_proj.weight.std() > 0


@pytest.mark.parametrize("without_bias", [None, "sampling_offsets", "attention_weights"])
def test_matches_a_hand_written_forward(without_bias):
    """The two query projections run as one product; a bias removed by hand runs them as written."""
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.bias, std=0.1)
    if without_bias:
        getattr(m, without_bias).bias = None
    q, ref, x = inputs()
    out = m(q, ref, x, SHAPES, level_start_index_of(SHAPES))
    B, Q, _ = q.shape
    value = m.value_proj(x).view(B, -1, 2, 8)
    offsets = m.sampling_offsets(q).view(B, Q, 2, 3, 3, 2)
    weights = m.attention_weights(q).view(B, Q, 2, 9).softmax(-1).view(B, Q, 2, 3, 3)
    wh = SHAPES.flip(-1).float()
    loc = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    want = m.output_proj(reference.ms_deform_attn(value, SHAPES, level_start_index_of(SHAPES), loc, weights))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_box_reference_points_and_padding_mask():
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2)
    q, ref, x = inputs()
    boxes = torch.cat([ref, torch.full_like(ref, 0.2)], -1)  # [B, Q, L, 4]
    out = m(q, boxes, x, SHAPES, level_start_index_of(SHAPES))
    assert out.shape == q.shape and torch.isfinite(out).all()
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[1] = True  # image 1 is all padding: its values vanish, leaving only the output bias
    out = m(q, ref, x, SHAPES, level_start_index_of(SHAPES), mask)
    torch.testing.assert_close(out[1], m.output_proj.bias.expand_as(out[1]))


def test_box_reference_points_match_a_hand_written_forward():
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    q, ref, x = inputs(seed=1)
    wh = 0.05 + 0.3 * torch.rand(ref.shape, generator=torch.Generator().manual_seed(2))
    boxes = torch.cat([ref, wh], -1)  # [B, Q, L, 4] (cx, cy, w, h)
    out = m(q, boxes, x, SHAPES, level_start_index_of(SHAPES))
    B, Q, _ = q.shape
    value = m.value_proj(x).view(B, -1, 2, 8)
    offsets = m.sampling_offsets(q).view(B, Q, 2, 3, 3, 2)
    weights = m.attention_weights(q).view(B, Q, 2, 9).softmax(-1).view(B, Q, 2, 3, 3)
    box = boxes[:, :, None, :, None, :]
    loc = box[..., :2] + offsets / 3 * box[..., 2:] * 0.5  # half the box spans the P points
    want = m.output_proj(reference.ms_deform_attn(value, SHAPES, level_start_index_of(SHAPES), loc, weights))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_under_autocast_the_sampling_positions_stay_float32(monkeypatch):
    import detrcore.nn.ms_deform_attn as module

    seen = []

    def spy(value, ss, ls, loc, aw):
        seen.append((value.dtype, loc.clone(), aw.dtype))
        return ms_deform_attn(value, ss, ls, loc, aw)

    monkeypatch.setattr(module, "ms_deform_attn", spy)
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    q, ref, x = inputs(seed=3)
    full = m(q, ref, x, SHAPES, level_start_index_of(SHAPES))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(q, ref, x, SHAPES, level_start_index_of(SHAPES))
    (_, loc_full, _), (value_dtype, loc, aw_dtype) = seen
    assert out.dtype == value_dtype == torch.bfloat16 and loc.dtype == aw_dtype == torch.float32
    # the attention-weight softmax runs in float32 on the bfloat16 logits (torch's autocast would keep it bfloat16)
    B, Q, _ = q.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m.attention_weights(q)
    assert logits.dtype == torch.bfloat16
    want = logits.float().view(B, Q, 2, 6).softmax(-1).view(B, Q, 2, 3, 2)
    seen.clear()
    monkeypatch.setattr(module, "ms_deform_attn", lambda v, ss, ls, loc, aw: seen.append(aw) or spy(v, ss, ls, loc, aw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(q, ref, x, SHAPES, level_start_index_of(SHAPES))
    torch.testing.assert_close(seen[0], want, rtol=0, atol=0)
    # bfloat16 projections perturb the offsets, but the positions the op gets are not rounded to 8 bits
    assert not torch.equal(loc, loc.bfloat16().float())
    torch.testing.assert_close(loc, loc_full, rtol=0, atol=5e-3)
    torch.testing.assert_close(out.float(), full, rtol=5e-2, atol=5e-2)


def test_gradients_reach_every_parameter():
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)  # at init the output does not depend on q
    q, ref, x = inputs()
    q.requires_grad_()
    m(q, ref, x, SHAPES, level_start_index_of(SHAPES)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.sampling_offsets.weight.grad.abs().sum() > 0 and q.grad.abs().sum() > 0


def test_bad_configuration_and_shapes():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2)
    q, ref, x = inputs()
    with pytest.raises(ValueError, match="reference_points"):
        m(q, ref[..., :2, :], x, SHAPES, level_start_index_of(SHAPES))
    with pytest.raises(ValueError, match="input_spatial_shapes"):
        m(q, ref, x, SHAPES[:2], level_start_index_of(SHAPES[:2]))
    with pytest.raises(ValueError, match="value has S"):
        m(q, ref, x[:, :-1], SHAPES, level_start_index_of(SHAPES))
    assert math.isclose(float(m.sampling_offsets.bias.abs().max()), 2.0)


def padded_inputs(seed=4):
    """Two images over SHAPES; image 1 is padded on the right and bottom of every level (as a batch is)."""
    q, ref, x = inputs(B=2, Q=int((SHAPES[:, 0] * SHAPES[:, 1]).sum()), seed=seed)
    masks = []
    for h, w in SHAPES.tolist():
        m = torch.zeros(2, h, w, dtype=torch.bool)
        m[1, (h + 1) // 2 + 1 :], m[1, :, (w + 1) // 2 :] = True, True
        masks.append(m.flatten(1))
    return q, ref, x, torch.cat(masks, 1)


def test_token_packing_round_trip_and_errors():
    _, _, x, mask = padded_inputs()
    packing = TokenPacking(mask)
    assert packing.counts == [int(v) for v in (~mask).sum(1)] and packing.num_valid == int((~mask).sum())
    packed = packing.pack(x)
    torch.testing.assert_close(packed, x[~mask], rtol=0, atol=0)
    full = packing.unpack(packed)
    assert (full[mask] == 0).all() and torch.equal(full[~mask], x[~mask])
    packed.requires_grad_()
    g = torch.randn(full.shape)
    (packing.unpack(packed) * g).sum().backward()
    assert torch.equal(packed.grad, g[~mask])
    with pytest.raises(ValueError, match="packed positions"):
        packing.unpack(packed[:-1])
    with pytest.raises(ValueError, match=r"\[B=2, S="):
        packing.pack(x[:, :-1])
    with pytest.raises(ValueError, match="bool"):
        TokenPacking(mask.float())


def test_token_packing_value_shapes():
    """With the level shapes, TokenPacking gives each image's valid rectangle per level (the packed value is then
    sampled in place); without them, or where a valid region is not a top-left rectangle, None."""
    _, _, _, mask = padded_inputs()
    shapes = [tuple(s) for s in SHAPES.tolist()]
    assert TokenPacking(mask).value_shapes is None
    vs = TokenPacking(mask, shapes).value_shapes
    assert vs.dtype == torch.int64 and vs.tolist() == [[[8, 6], [4, 3], [2, 2]], [[5, 3], [3, 2], [2, 1]]]
    holed = mask.clone()
    holed[0, 9] = True  # a hole inside image 0's first level
    assert TokenPacking(holed, shapes).value_shapes is None
    shifted = mask.clone()
    shifted[1, :48] = shifted[1, :48].view(8, 6).flip(0).flatten()  # padding at the top: not top-left
    assert TokenPacking(shifted, shapes).value_shapes is None
    with pytest.raises(ValueError, match="spatial_shapes"):
        TokenPacking(mask, shapes[:2])


@pytest.mark.parametrize("in_place", [False, True])  # value_shapes: the packed value sampled in place
@pytest.mark.parametrize("boxes", [False, True])
def test_packed_queries_equal_the_padded_batch_at_valid_positions(boxes, in_place):
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    q, ref, x, mask = padded_inputs()
    if boxes:
        ref = torch.cat([ref, torch.full_like(ref, 0.2)], -1)
    shapes, start = SHAPES, level_start_index_of(SHAPES)
    want = m(q, ref, x, shapes, start, mask)  # every position computed
    packing = TokenPacking(mask, SHAPES.tolist() if in_place else None)
    assert (packing.value_shapes is not None) == in_place
    xp = packing.pack(x).requires_grad_()
    got = m(packing.pack(q), packing.pack(ref), xp, shapes, start, packing=packing)
    assert got.shape == (packing.num_valid, 16)
    torch.testing.assert_close(got, want[~mask], rtol=1e-6, atol=1e-6)
    # decoder form: queries of their own over the packed input
    dq, dref = q[:, :7], ref[:, :7]
    torch.testing.assert_close(m(dq, dref, xp, shapes, start, packing=packing), m(dq, dref, x, shapes, start, mask),
                               rtol=1e-6, atol=1e-6)
    # gradients: the packed input receives what the valid positions receive in the padded batch
    x2 = x.clone().requires_grad_()
    g = torch.randn(want.shape)
    (m(q, ref, x2, shapes, start, mask)[~mask] * g[~mask]).sum().backward()
    (got * g[~mask]).sum().backward()
    torch.testing.assert_close(xp.grad, x2.grad[~mask], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_flatten"):
        m(packing.pack(q), packing.pack(ref), x, shapes, start, packing=packing)
    with pytest.raises(ValueError, match="packed query"):
        m(packing.pack(q)[:-1], packing.pack(ref)[:-1], xp, shapes, start, packing=packing)


def _producer(t):
    """The autograd node that made t, past views and dtype no-ops."""
    node = t.grad_fn
    while type(node).__name__ in ("ViewBackward0", "ToCopyBackward0"):
        node = node.next_functions[0][0]
    return type(node).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("boxes", [False, True])
def test_sampling_node_equals_the_separate_ops(dtype, boxes, monkeypatch):
    """The one-node sampling (split + softmax + addcmul, its backward writing one projection gradient) gives the
    separate ops' locations, weights and gradients bit for bit; references with a gradient take the separate ops."""
    from detrcore.nn import ms_deform_attn as module

    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3).to(dtype)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    q, ref, _ = inputs()
    q, ref = q.to(dtype), ref.to(dtype)
    if boxes:
        ref = torch.cat([ref, torch.full_like(ref, 0.2)], -1)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(module, "_eager_fast_path", lambda *t, f=fused: f)
        qq = q.clone().requires_grad_()
        loc, w = m._sampling(qq, ref, SHAPES)
        params = [qq, m.sampling_offsets.weight, m.attention_weights.bias]
        grads = torch.autograd.grad((loc * torch.linspace(-1, 1, loc.numel(), dtype=dtype).view(loc.shape)).sum()
                                    + (w.square() * 3).sum(), params)
        results.append((loc.detach(), w.detach(), *grads))
        assert (_producer(loc) == "_SamplingBackward") == fused
    for got, want in zip(*results):
        assert torch.equal(got, want)
    ref_grad = ref.clone().requires_grad_()  # a reference with a gradient: the separate ops
    monkeypatch.setattr(module, "_eager_fast_path", lambda *t: True)
    loc, _ = m._sampling(q, ref_grad, SHAPES)
    assert _producer(loc) != "_SamplingBackward"
    only_w = torch.autograd.grad(m._sampling(q.requires_grad_(), ref, SHAPES)[1].sum(), q)  # one output used
    assert only_w[0].shape == q.shape
