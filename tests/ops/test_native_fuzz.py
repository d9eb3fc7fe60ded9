"""Fuzzing the native boundary: every `detrcore._C` entry point driven with random shapes (zero-size dimensions
included), dtypes, strides and values (NaN, inf, huge, out-of-range metadata). Any input must either work or raise
TypeError / ValueError / RuntimeError; a crash would take this test process down."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detrcore import _C

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.bool,
          torch.uint8]
ALLOWED = (TypeError, ValueError, RuntimeError)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, max_dims=6):
    ndim = draw(st.integers(0, max_dims))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from(["rand", "nan", "inf", "huge", "neg"]))
    t = torch.rand(shape) * 2 - 0.5
    if fill == "nan" and t.numel():
        t.view(-1)[0] = float("nan")
    elif fill == "inf" and t.numel():
        t.view(-1)[-1] = float("inf")
    elif fill == "huge":
        t = t * 1e30
    elif fill == "neg":
        t = -t * 7
    t = t.to(dtype) if dtype.is_floating_point else t.clamp(-5, 5).nan_to_num().to(dtype)
    if ndim >= 2 and draw(st.booleans()):
        t = t.transpose(0, -1)  # non-contiguous
    return t


def call(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ALLOWED:
        pass


@SETTINGS
@given(a=tensors(), b=tensors(), c=tensors(), kind=st.integers(-1, 4), giou=st.booleans())
def test_box_entry_points_never_crash(a, b, c, kind, giou):
    call(_C.box_map, a, b, kind)
    call(_C.box_pairwise, a, b, c, giou)
    call(_C.giou_loss, a, b, c)
    call(_C.inverse_sigmoid, a, b, 1e-5)
    call(_C.inverse_sigmoid_backward, a, b, c, 1e-5)
    call(_C.box_pairwise_backward, c, a, b, a.clone(), b.clone(), giou)
    call(_C.giou_loss_backward, c, a, b, a.clone(), b.clone())


@SETTINGS
@given(a=tensors(), b=tensors(), c=tensors(), seed=st.integers(-(2**63), 2**63 - 1),
       p=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.1, 1.0, -0.1])),
       relu=st.booleans(), same=st.booleans())
def test_dropout_entry_points_never_crash(a, b, c, seed, p, relu, same):
    out = torch.empty_like(a) if same else b
    call(_C.dropout, a, out, seed, p, relu)
    call(_C.dropout_backward, a, out, seed, p)
    call(_C.relu_dropout_backward, a, b if not same else a.clone(), c if not same else out, p)


@SETTINGS
@given(data=st.data(), heads=st.integers(-1, 5), p=st.sampled_from([0.0, 0.3, 1.0, -0.1, float("nan")]),
       well_formed=st.booleans())
def test_attention_entry_points_never_crash(data, heads, p, well_formed):
    if well_formed:  # valid shapes and dtypes, random sizes (zeros included), strided q
        B, Lq, Lk, D = (data.draw(st.integers(0, 4)) for _ in range(4))
        H = max(heads, 1)
        E = H * D
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
        q = torch.randn(B, Lq, 2 * E, dtype=dtype)[..., :E]
        k, v = torch.randn(B, Lk, E, dtype=dtype), torch.randn(B, Lk, E, dtype=dtype)
        mask = data.draw(st.sampled_from([None, torch.rand(B, Lk) < 0.5]))
        mask = None if mask is None else mask.view(torch.uint8)
        out, attn = torch.empty(B, Lq, E, dtype=dtype), torch.empty(B, H, Lq, Lk, dtype=dtype)
        grads = [torch.empty(B, n, E, dtype=dtype) for n in (Lq, Lk, Lk)]
        g = torch.randn(B, Lq, E, dtype=dtype)
    else:
        q, k, v, out, attn, g = (data.draw(tensors(max_dims=4)) for _ in range(6))
        mask = data.draw(st.sampled_from([None, data.draw(tensors(max_dims=2))]))
        grads = [data.draw(tensors(max_dims=3)) for _ in range(3)]
    call(_C.attention_forward, q, k, v, mask, heads, 0.5, 3, p, out, attn)
    call(_C.attention_backward, q, k, v, mask, heads, 0.5, 3, p, g, attn, *grads)


@SETTINGS
@given(a=tensors(), b=tensors(), c=tensors(), s=tensors(max_dims=2), t=tensors(max_dims=2), relu=st.booleans(),
       residual=st.booleans(), well_formed=st.booleans())
def test_frozen_bn_entry_points_never_crash(a, b, c, s, t, relu, residual, well_formed):
    if well_formed and a.dim() >= 2:  # per-channel scale and shift of the right length, so the kernels run
        s = torch.rand(a.shape[1], dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)
        t = torch.rand_like(s)
        b = torch.empty_like(a)
    call(_C.frozen_bn, a, c if residual else None, s, t, b, relu)
    call(_C.frozen_bn_backward, a, c, s, b, a.clone() if residual else None, relu)


@SETTINGS
@given(a=tensors(), b=tensors(), c=tensors(), data=st.data(), well_formed=st.booleans())
def test_winograd_entry_points_never_crash(a, b, c, data, well_formed):
    tile = data.draw(st.sampled_from([2, 4, 3]))  # 3: a named error
    if well_formed:  # matching shapes, random sizes (zeros included), so the kernels run
        n, ch, k, h, w = (data.draw(st.integers(0, 9)) for _ in range(5))
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
        t = n * -(-h // max(tile, 2)) * -(-w // max(tile, 2))
        a, c = torch.randn(n, ch, h, w, dtype=dtype), torch.randn(k, ch, 3, 3, dtype=dtype)
        b = torch.randn((max(tile, 2) + 2) ** 2, ch, t, dtype=dtype)
    call(_C.winograd_input, a, b, tile=tile)
    call(_C.winograd_input_adjoint, b, a, tile=tile)
    call(_C.winograd_output_adjoint, a, b, tile=tile)
    call(_C.winograd_output, b, None, a, tile=tile)
    call(_C.winograd_output, b, c, a, tile=tile)
    call(_C.winograd_weight, c, b, tile=tile)
    call(_C.winograd_weight_adjoint, b, c, tile=tile)


@SETTINGS
@given(data=st.data())
def test_box_entry_points_with_well_formed_shapes(data):
    """Shapes that pass the checks (so the kernels run) with hostile values and zero-size dimensions."""
    B, N, M = (data.draw(st.integers(0, 3)) for _ in range(3))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    vals = data.draw(st.sampled_from([0.0, float("nan"), float("inf"), -1e38, 1e-45]))
    a = torch.rand(B, N, 4, dtype=dtype)
    b = torch.rand(B, M, 4, dtype=dtype)
    if a.numel():
        a.view(-1)[0] = vals
    out = torch.empty(B, N, M, dtype=dtype)
    _C.box_pairwise(a, b, out, True)
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    _C.box_pairwise_backward(torch.randn(B, N, M, dtype=dtype), a, b, ga, gb, True, num_threads=3)
    x = torch.rand(N * 4, dtype=dtype)
    _C.inverse_sigmoid(x, torch.empty_like(x), 1e-5)


@SETTINGS
@given(cost=tensors(max_dims=3), maximize=st.booleans())
def test_assignment_never_crashes(cost, maximize):
    call(_C.linear_sum_assignment, cost, maximize)
    call(_C.linear_sum_assignment, cost.numpy() if cost.dtype not in (torch.bfloat16,) else cost, maximize)
    call(_C.batched_linear_sum_assignment, [cost, cost], maximize, num_threads=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_msda_cpu_simd_path_matches_the_scalar_kernels(data):
    # Well-formed metadata (the kernels run), head dims the AVX2 path takes, empty and 1-pixel levels, any L * P,
    # hostile locations: the AVX2 kernels (where the CPU has them) against the scalar ones, never out of bounds.
    B, H, Q = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(0, 6))
    D, P = data.draw(st.sampled_from([16, 32, 64])), data.draw(st.integers(1, 9))
    hw = data.draw(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=4))
    shapes = torch.tensor(hw, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(hw)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    value = torch.randn(B, S, H, D, generator=g)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g) * 1.6 - 0.3
    if loc.numel():
        fill = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e9, -1e30, 0.0, 1.0]))
        loc.view(-1)[data.draw(st.integers(0, loc.numel() - 1))] = fill
    aw = torch.rand(B, Q, H, L, P, generator=g)
    grad = torch.randn(B, Q, H * D, generator=g)
    results = []
    was = _C._msda_cpu_simd(-1)
    try:
        for on in (0, 1):
            _C._msda_cpu_simd(on)
            out, gv = torch.empty(B, Q, H * D), torch.empty_like(value)
            gl, ga = torch.empty_like(loc), torch.empty_like(aw)
            _C.ms_deform_attn_forward(value, shapes, starts, loc, aw, out, num_threads=2)
            _C.ms_deform_attn_backward(value, shapes, starts, loc, aw, grad, gv, gl, ga, num_threads=2)
            results.append((out, gv, gl, ga))
    finally:
        _C._msda_cpu_simd(int(was))
    for scalar, simd in zip(*results):
        assert torch.isfinite(simd).all() == torch.isfinite(scalar).all()
        scale = 1 + (scalar.abs().max().item() if scalar.numel() else 0)
        torch.testing.assert_close(simd, scalar, rtol=1e-5, atol=1e-5 * scale)


@SETTINGS
@given(data=st.data())
def test_msda_entry_points_never_crash(data):
    B, H, D, Q, L, P = (data.draw(st.integers(0, 3)) for _ in range(6))
    pairs = data.draw(st.lists(st.tuples(st.integers(-2, 4), st.integers(-2, 4)), min_size=L, max_size=L))
    shapes = torch.tensor(pairs, dtype=torch.int64).reshape(L, 2) if pairs else torch.zeros(0, 2, dtype=torch.int64)
    starts = torch.tensor(data.draw(st.lists(st.integers(-3, 40), min_size=L, max_size=L)), dtype=torch.int64)
    S = data.draw(st.integers(0, 40))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]))
    value = torch.randn(B, S, H, D).to(dtype)
    loc = (torch.rand(B, Q, H, L, P, 2) * data.draw(st.sampled_from([1.0, 3.0, float("nan"), float("inf")]))).to(dtype)
    aw = torch.rand(B, Q, H, L, P).to(dtype)
    out = torch.empty(B, Q, H * D, dtype=dtype)
    call(_C.ms_deform_attn_forward, value, shapes, starts, loc, aw, out)
    gv, gl, ga = torch.empty_like(value), torch.empty_like(loc), torch.empty_like(aw)
    call(_C.ms_deform_attn_backward, value, shapes, starts, loc, aw, out, gv, gl, ga)
    call(_C.ms_deform_attn_workspace_bytes, value, shapes, starts, loc, aw, True)
    # garbage in any position
    junk = data.draw(tensors())
    position = data.draw(st.integers(0, 5))
    args = [value, shapes, starts, loc, aw, out]
    args[position] = junk
    call(_C.ms_deform_attn_forward, *args)


@pytest.mark.parametrize("bad", [None, "text", 3, [1.0, 2.0], object(), np.zeros((2, 2), dtype=object)])
def test_non_tensors_are_type_errors(bad):
    t = torch.zeros(1, 2, 4)
    with pytest.raises(TypeError):
        _C.box_pairwise(bad, t, torch.empty(1, 2, 2), True)
    with pytest.raises(TypeError):
        _C.dropout(bad, t, 0, 0.5, False)
    with pytest.raises(TypeError):
        _C.frozen_bn(bad, None, torch.ones(2), torch.ones(2), t, True)
    with pytest.raises((TypeError, ValueError)):
        _C.linear_sum_assignment(bad, False)
    call(_C.inspect, bad)  # reports what it sees, or raises
