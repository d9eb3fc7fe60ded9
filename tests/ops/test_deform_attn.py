"""ms_deform_attn against its grid_sample twin: values and gradients on every device and dtype, odd sizes,
float64 gradcheck, non-contiguous inputs, determinism, opcheck, torch.compile and named errors."""
import subprocess
import sys
import textwrap

import pytest
import torch

from detrcore import ops
from detrcore.ops import reference
from detrcore.ops._lib import _C
from detrcore.ops.deform_attn import level_start_index_of
from tests._grid import DEVICES, HAS_CUDA, device_dtypes


def make_inputs(B=2, H=3, D=5, Q=7, P=2, shapes=((6, 4), (3, 2), (1, 1)), spread=0.3, dtype=torch.float64,
                device="cpu", seed=0):
    """Inputs with sampling locations spread `spread` beyond [0, 1] on each side."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.int64)
    L, S = len(shapes), int((ss[:, 0] * ss[:, 1]).sum())
    value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    aw = torch.rand(B, Q, H, L, P, generator=g, dtype=torch.float64)
    aw = aw / aw.sum(dim=(-1, -2), keepdim=True)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(value), ss.to(device), level_start_index_of(ss).to(device), to(loc), to(aw)


TOL = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2), torch.float32: (1e-5, 1e-5),
       torch.float64: (1e-10, 1e-10)}


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("D,L,P", [(1, 1, 1), (3, 4, 4), (30, 1, 4), (71, 4, 1), (32, 2, 3)])
def test_forward_and_backward_match_reference(device, dtype, D, L, P):
    shapes = [(9, 7), (5, 4), (3, 2), (1, 1)][:L]
    value, ss, ls, loc, aw = make_inputs(D=D, P=P, shapes=shapes, dtype=dtype, device=device, seed=D * 10 + L + P)
    rtol, atol = TOL[dtype]
    inputs = [t.clone().requires_grad_() for t in (value, loc, aw)]
    out = ops.ms_deform_attn(inputs[0], ss, ls, inputs[1], inputs[2])
    assert out.shape == (value.shape[0], loc.shape[1], value.shape[2] * D) and out.dtype == dtype
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (value, loc, aw)]
    ref = reference.ms_deform_attn(ref_inputs[0], ss.cpu(), ls.cpu(), ref_inputs[1], ref_inputs[2])
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=rtol, atol=atol)

    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, inputs, grad.to(device, dtype))
    want = torch.autograd.grad(ref, ref_inputs, grad)
    for name, gt, wt in zip(("value", "sampling_locations", "attention_weights"), got, want):
        assert gt.dtype == dtype and gt.shape == wt.shape, name
        scale = 1 + wt.abs().max().item()  # location gradients scale with the map size
        torch.testing.assert_close(gt.double().cpu(), wt, rtol=rtol, atol=atol * scale, msg=name)


@pytest.mark.parametrize("Q", [2, 64])
def test_cpu_backward_strategies(Q):
    """The CPU backward works on head-local copies when a head's samples outnumber its value rows (Q = 64 here)
    and in place otherwise (Q = 2): both against the reference, H = 8 heads of D = 32 as in the models."""
    value, ss, ls, loc, aw = make_inputs(B=2, H=8, D=32, Q=Q, P=4, shapes=((9, 7), (5, 4)), seed=Q)
    assert (Q * 2 * 4 >= value.shape[1]) == (Q == 64)
    inputs = [t.clone().requires_grad_() for t in (value, loc, aw)]
    ref_inputs = [t.clone().requires_grad_() for t in (value, loc, aw)]
    out = ops.ms_deform_attn(inputs[0], ss, ls, inputs[1], inputs[2])
    ref = reference.ms_deform_attn(ref_inputs[0], ss, ls, ref_inputs[1], ref_inputs[2])
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, ref_inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * (1 + want.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D,L,P", [(1, 1, 1), (3, 4, 4), (30, 1, 4), (71, 4, 1)])
def test_gradcheck_float64(device, D, L, P):
    shapes = [(5, 4), (3, 3), (2, 1), (1, 1)][:L]
    value, ss, ls, loc, aw = make_inputs(B=1, H=2, D=D, Q=3, P=P, shapes=shapes, spread=0.25, device=device, seed=D)
    fn = lambda v, l, a: ops.ms_deform_attn(v, ss, ls, l, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (value, loc, aw)), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_large_head_dim(device):
    value, ss, ls, loc, aw = make_inputs(B=1, H=1, D=1025, Q=3, P=2, shapes=((4, 3), (2, 2)), device=device,
                                         dtype=torch.float32)
    out = ops.ms_deform_attn(value, ss, ls, loc, aw)
    ref = reference.ms_deform_attn(value.cpu().double(), ss.cpu(), ls.cpu(), loc.cpu().double(), aw.cpu().double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_give_the_same_result(device):
    value, ss, ls, loc, aw = make_inputs(device=device)
    v_nc = value.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] with H-major strides
    loc_nc = torch.stack([loc, loc], dim=-2)[..., 0, :]
    aw_nc = aw.transpose(3, 4).contiguous().transpose(3, 4)
    assert not (v_nc.is_contiguous() or loc_nc.is_contiguous() or aw_nc.is_contiguous())
    torch.testing.assert_close(ops.ms_deform_attn(v_nc, ss, ls, loc_nc, aw_nc), ops.ms_deform_attn(value, ss, ls, loc, aw),
                               rtol=0, atol=0)


def test_batch_has_no_divisibility_limit_and_matches_per_image():
    value, ss, ls, loc, aw = make_inputs(B=5, dtype=torch.float32)
    out = ops.ms_deform_attn(value, ss, ls, loc, aw)
    for b in range(5):
        one = ops.ms_deform_attn(value[b : b + 1], ss, ls, loc[b : b + 1], aw[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], one, rtol=0, atol=0)


def test_edges_and_outside_samples():
    value, ss, ls, loc, aw = make_inputs(B=1, H=1, D=4, Q=6, P=1, shapes=((4, 5),))
    loc[0, :, 0, 0, 0] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-0.5, 0.5], [1.5, 0.5], [0.5, 2.0], [0.1, 0.999]],
                                      dtype=torch.float64)
    out = ops.ms_deform_attn(value, ss, ls, loc, aw)
    torch.testing.assert_close(out, reference.ms_deform_attn(value, ss, ls, loc, aw))
    assert (out[0, 2:5] == 0).all()  # entirely outside: zeros
    v, l, a = (t.clone().requires_grad_() for t in (value, loc, aw))
    ops.ms_deform_attn(v, ss, ls, l, a).sum().backward()
    assert (l.grad[0, 2:5] == 0).all() and (a.grad[0, 2:5] == 0).all()


def test_non_finite_locations_do_not_read_out_of_bounds():
    value, ss, ls, loc, aw = make_inputs(B=1, Q=4, dtype=torch.float32)
    loc[0, 0] = float("nan")
    loc[0, 1] = float("inf")
    loc[0, 2] = -1e30
    out = ops.ms_deform_attn(value, ss, ls, loc, aw)
    assert (out[0, :3] == 0).all() and torch.isfinite(out).all()


def test_cpu_backward_is_deterministic_across_thread_counts():
    value, ss, ls, loc, aw = make_inputs(B=2, H=4, D=16, Q=40, P=4, shapes=((12, 10), (6, 5), (3, 3)),
                                         dtype=torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ins = [t.clone().requires_grad_() for t in (value, loc, aw)]
            ops.ms_deform_attn(ins[0], ss, ls, ins[1], ins[2]).square().sum().backward()
            results.append([t.grad for t in ins])
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


# The CPU kernels' AVX2 path (float32, D in {16, 32, 64}; L * P in groups of 8 and a partial last group) against the
# reference and against the scalar kernels of the same build (switched off through the private `_msda_cpu_simd`).
HAS_SIMD = _C.build_info()["msda_cpu_simd"] != "none"
needs_simd = pytest.mark.skipif(not HAS_SIMD, reason="the CPU has no AVX2 + FMA (or not an x86-64 GCC build)")


def _fwd_bwd(value, ss, ls, loc, aw, grad, simd=True):
    was = _C._msda_cpu_simd(int(simd))
    try:
        ins = [t.clone().requires_grad_() for t in (value, loc, aw)]
        out = ops.ms_deform_attn(ins[0], ss, ls, ins[1], ins[2])
        return [out.detach(), *torch.autograd.grad(out, ins, grad)]
    finally:
        _C._msda_cpu_simd(int(was))


@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("L,P", [(1, 8), (2, 4), (4, 4), (3, 8), (3, 4), (1, 1), (2, 5), (4, 3)])
@pytest.mark.parametrize("Q", [3, 80])  # the backward's in-place and head-local strategies
def test_cpu_simd_path_matches_reference_and_scalar_kernels(D, L, P, Q):
    shapes = [(9, 7), (5, 4), (1, 6), (1, 1)][:L]
    value, ss, ls, loc, aw = make_inputs(B=2, H=3, D=D, Q=Q, P=P, shapes=shapes, spread=0.3, dtype=torch.float32,
                                         seed=D + L + P + Q)
    assert (Q * L * P >= value.shape[1]) == (Q == 80)
    grad = torch.randn(2, Q, 3 * D, generator=torch.Generator().manual_seed(3))
    got = _fwd_bwd(value, ss, ls, loc, aw, grad)
    ref_inputs = [t.double().requires_grad_() for t in (value, loc, aw)]
    ref = reference.ms_deform_attn(ref_inputs[0], ss, ls, ref_inputs[1], ref_inputs[2])
    want = [ref.detach(), *torch.autograd.grad(ref, ref_inputs, grad.double())]
    scalar = _fwd_bwd(value, ss, ls, loc, aw, grad, simd=False)
    for name, g, w, sc in zip(("out", "value", "sampling_locations", "attention_weights"), got, want, scalar):
        scale = 1 + w.abs().max().item()
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(g, sc, rtol=1e-5, atol=1e-6 * scale, msg=name)


@needs_simd
def test_cpu_simd_path_edges_outside_and_non_finite():
    value, ss, ls, loc, aw = make_inputs(B=1, H=2, D=32, Q=12, P=4, shapes=((4, 5), (2, 3)), dtype=torch.float32)
    edge = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-0.5, 0.5], [1.5, 0.5], [0.5, 2.0], [0.1, 0.999], [0.0, 1.0],
                         [1.0, 0.0], [-0.1, -0.1], [1.1, 1.1], [0.5, 0.5], [0.9999, 0.0001]])
    loc[0, :, :, 0, 0] = edge[:, None]  # on the edges, half outside, entirely outside
    loc[0, 0, 0, 1] = float("nan")
    loc[0, 1, 0, 1, 2] = float("inf")
    loc[0, 2, 1, 1, 3] = -1e30
    loc[0, 3, 1, 0, 1] = 3e9
    aw[0, 2, 0, 0, 0] = float("nan")  # on an entirely outside sample: contributes nothing
    grad = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(4))
    got, scalar = _fwd_bwd(value, ss, ls, loc, aw, grad), _fwd_bwd(value, ss, ls, loc, aw, grad, simd=False)
    for g, sc in zip(got, scalar):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, sc, rtol=1e-5, atol=1e-5 * (1 + sc.abs().max().item()))
    g_loc, g_aw = got[2], got[3]
    # samples entirely outside (level 0's edges 2..4, the non-finite ones) get zero gradients
    assert (g_aw[0, 2:5, :, 0, 0] == 0).all() and (g_loc[0, 2:5, :, 0, 0] == 0).all()
    assert (g_aw[0, 0, 0, 1] == 0).all() and g_aw[0, 1, 0, 1, 2] == 0 and g_aw[0, 2, 1, 1, 3] == 0
    assert (g_loc[0, 3, 1, 0, 1] == 0).all()
    # as the reference with those samples moved far outside (and the NaN weight of an outside sample zeroed)
    ref = reference.ms_deform_attn(value.double(), ss, ls, torch.nan_to_num(loc, nan=-5.0, posinf=5.0, neginf=-5.0)
                                   .clamp(-5, 5).double(), torch.nan_to_num(aw).double())
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-5, atol=1e-5)


@needs_simd
def test_cpu_simd_path_is_deterministic_across_thread_counts():
    value, ss, ls, loc, aw = make_inputs(B=2, H=4, D=32, Q=40, P=4, shapes=((12, 10), (6, 5)), dtype=torch.float32)
    grad = torch.randn(2, 40, 128, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_fwd_bwd(value, ss, ls, loc, aw, grad))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


def test_cpu_simd_switch_reports_and_restores():
    was = _C._msda_cpu_simd(-1)
    assert was == HAS_SIMD
    assert _C._msda_cpu_simd(0) == was and _C._msda_cpu_simd(-1) is False
    assert _C.build_info()["msda_cpu_simd"] == "none"
    _C._msda_cpu_simd(1)
    assert _C._msda_cpu_simd(-1) == HAS_SIMD  # on only where the CPU has it
    _C._msda_cpu_simd(int(was))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    value, ss, ls, loc, aw = make_inputs(B=1, H=2, D=3, Q=4, device=device)
    args = (value.requires_grad_(), ss, ls, loc.requires_grad_(), aw.requires_grad_())
    torch.library.opcheck(torch.ops.detrcore.ms_deform_attn.default, args)
    grad = torch.randn(1, 4, 6, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.detrcore.ms_deform_attn_backward.default,
                          (grad, value.detach(), ss, ls, loc.detach(), aw.detach()))


def test_eager_fast_path_is_the_custom_op_bit_for_bit():
    # Eager calls on plain tensors skip the custom op's dispatch layers through an autograd.Function twin.
    value, ss, ls, loc, aw = make_inputs(B=2, H=3, D=7, Q=9, P=3, dtype=torch.float32)
    fast = [t.clone().requires_grad_() for t in (value, loc, aw)]
    slow = [t.clone().requires_grad_() for t in (value, loc, aw)]
    out_fast = ops.ms_deform_attn(fast[0], ss, ls, fast[1], fast[2])
    out_slow = torch.ops.detrcore.ms_deform_attn(slow[0], ss, ls, slow[1], slow[2])
    assert type(out_fast.grad_fn).__name__ == "_EagerMsdaBackward"
    assert out_slow.grad_fn is not None and type(out_slow.grad_fn).__name__ != "_EagerMsdaBackward"
    assert torch.equal(out_fast, out_slow)
    g = torch.randn_like(out_fast)
    out_fast.backward(g)
    out_slow.backward(g)
    for a, b in zip(fast, slow):
        assert torch.equal(a.grad, b.grad)
    with torch.no_grad():  # no graph to record: the forward kernel alone
        assert ops.ms_deform_attn(fast[0], ss, ls, fast[1], fast[2]).grad_fn is None


def test_fast_path_is_off_for_fake_tensors_and_transforms():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from detrcore.ops import _lib

    value, ss, ls, loc, aw = make_inputs(dtype=torch.float32)
    assert _lib.eager_fast_path(value, loc, aw)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (value, loc, aw)]
        assert not _lib.eager_fast_path(*fake)
    seen = []
    torch.func.grad(lambda v: seen.append(_lib.eager_fast_path(v)) or v.sum())(value)
    torch.jit.trace(lambda v: seen.append(_lib.eager_fast_path(v)) or v * 2, (value,), check_trace=False)
    assert seen == [False, False]


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    value, ss, ls, loc, aw = make_inputs(dtype=torch.float32)
    proj = torch.nn.Linear(15, 15)

    def f(v, l, a):
        out = ops.ms_deform_attn(v, ss, ls, l, a)
        return proj(out).sum()

    compiled = torch.compile(f, fullgraph=True)
    e_in = [t.clone().requires_grad_() for t in (value, loc, aw)]
    c_in = [t.clone().requires_grad_() for t in (value, loc, aw)]
    e, c = f(*e_in), compiled(*c_in)
    torch.testing.assert_close(c, e)
    e.backward()
    c.backward()
    for a, b in zip(c_in, e_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_bad_input_names_the_argument():
    value, ss, ls, loc, aw = make_inputs()
    with pytest.raises(ValueError, match="value has S"):
        ops.ms_deform_attn(value[:, :-1], ss, ls, loc, aw)
    with pytest.raises(ValueError, match="level_start_index"):
        ops.ms_deform_attn(value, ss, ls + 1, loc, aw)
    with pytest.raises(ValueError, match="level_start_index"):
        ops.ms_deform_attn(value, ss, ls[:2], loc, aw)
    with pytest.raises(ValueError, match="sampling_locations"):
        ops.ms_deform_attn(value, ss, ls, loc[:, :, :, :2], aw)
    with pytest.raises(ValueError, match="attention_weights"):
        ops.ms_deform_attn(value, ss, ls, loc, aw[..., :1])
    with pytest.raises(ValueError, match="value must be 4-D"):
        ops.ms_deform_attn(value[0], ss, ls, loc, aw)
    with pytest.raises(TypeError, match="sampling_locations"):
        ops.ms_deform_attn(value, ss, ls, loc.float(), aw)
    with pytest.raises(TypeError, match="spatial_shapes"):
        ops.ms_deform_attn(value, ss.double(), ls, loc, aw)
    with pytest.raises(TypeError, match="attention_weights"):
        ops.ms_deform_attn(value, ss, ls, loc, aw.tolist())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_half_value_with_float32_locations_and_weights(device, dtype):
    # What the models pass under autocast: positions keep float32 precision, output and grad_value value's dtype.
    value, ss, ls, loc, aw = make_inputs(B=2, H=2, D=32, Q=5, P=4, dtype=torch.float32, device=device)
    half = value.to(dtype).requires_grad_()
    loc32, aw32 = loc.clone().requires_grad_(), aw.clone().requires_grad_()
    out = ops.ms_deform_attn(half, ss, ls, loc32, aw32)
    assert out.dtype == dtype
    wide = [t.detach().float().requires_grad_() for t in (half, loc32, aw32)]
    want = ops.ms_deform_attn(wide[0], ss, ls, wide[1], wide[2])
    exact = {} if device == "cuda" else {"rtol": 0, "atol": 0}  # CUDA's grad_value: float atomics, any order
    torch.testing.assert_close(out, want.to(dtype), **exact)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(device)
    got = torch.autograd.grad(out, (half, loc32, aw32), grad.to(dtype))
    exp = torch.autograd.grad(want, wide, grad.to(dtype).float())
    assert [g.dtype for g in got] == [dtype, torch.float32, torch.float32]
    torch.testing.assert_close(got[0], exp[0].to(dtype), **exact)
    for g, e in zip(got[1:], exp[1:]):
        torch.testing.assert_close(g, e, **exact)
    with pytest.raises(TypeError, match="sampling_locations"):
        ops.ms_deform_attn(half, ss, ls, loc.double(), aw.double())
    with pytest.raises(TypeError, match="share one dtype"):
        ops.ms_deform_attn(half, ss, ls, loc32, aw32.to(dtype))
    with pytest.raises(TypeError, match="sampling_locations"):
        ops.ms_deform_attn(value, ss, ls, loc.double(), aw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_is_computed_in_float32(dtype):
    value, ss, ls, loc, aw = make_inputs(dtype=torch.float32)
    ins = [t.to(dtype).requires_grad_() for t in (value, loc, aw)]
    out = ops.ms_deform_attn(ins[0], ss, ls, ins[1], ins[2])
    assert out.dtype == dtype
    want = reference.ms_deform_attn(*(t.detach().float() for t in ins[:1]), ss, ls, ins[1].detach().float(),
                                    ins[2].detach().float())
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in ins)


def test_native_entry_point_checks_everything():
    from detrcore import _C

    value, ss, ls, loc, aw = (t.float() if t.is_floating_point() else t for t in make_inputs())
    out = torch.empty(2, 7, 15)
    with pytest.raises(ValueError, match="value has S"):
        _C.ms_deform_attn_forward(value[:, :-1].contiguous(), ss, ls, loc, aw, out)
    with pytest.raises(ValueError, match="out"):
        _C.ms_deform_attn_forward(value, ss, ls, loc, aw, torch.empty(2, 7, 14))
    with pytest.raises(TypeError, match="spatial_shapes"):
        _C.ms_deform_attn_forward(value, ss.int(), ls, loc, aw, out)
    with pytest.raises(ValueError, match="negative"):
        _C.ms_deform_attn_forward(value, -ss, ls, loc, aw, out)
    with pytest.raises(ValueError, match="contiguous"):
        _C.ms_deform_attn_forward(value, ss, ls, loc.transpose(1, 2), aw, out)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_deterministic_backward_and_host_metadata():
    value, ss, ls, loc, aw = make_inputs(B=2, H=8, D=32, Q=300, P=4, shapes=((20, 15), (10, 8), (5, 4), (3, 2)),
                                         dtype=torch.float32, device="cuda")
    out_host_meta = ops.ms_deform_attn(value, ss.cpu(), ls.cpu(), loc, aw)  # checked on the host, then copied
    torch.testing.assert_close(out_host_meta, ops.ms_deform_attn(value, ss, ls, loc, aw), rtol=0, atol=0)
    with pytest.raises(ValueError, match="value has S"):
        ops.ms_deform_attn(value[:, :-1], ss.cpu(), ls.cpu(), loc, aw)
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(3):
            ins = [t.clone().requires_grad_() for t in (value, loc, aw)]
            ops.ms_deform_attn(ins[0], ss, ls, ins[1], ins[2]).square().sum().backward()
            grads.append([t.grad for t in ins])
    finally:
        torch.use_deterministic_algorithms(False)
    for r in grads[1:]:
        for a, b in zip(r, grads[0]):
            assert torch.equal(a, b)
    ins = [t.detach().double().cpu().requires_grad_() for t in (value, loc, aw)]
    ops.ms_deform_attn(ins[0], ss.cpu(), ls.cpu(), ins[1], ins[2]).square().sum().backward()
    torch.testing.assert_close(grads[0][0].double().cpu(), ins[0].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_non_default_stream_and_cpu_agreement():
    value, ss, ls, loc, aw = make_inputs(B=3, D=32, Q=50, device="cuda", dtype=torch.float32)
    want = ops.ms_deform_attn(value, ss, ls, loc, aw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.ms_deform_attn(value, ss, ls, loc, aw)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    cpu = ops.ms_deform_attn(value.cpu(), ss.cpu(), ls.cpu(), loc.cpu(), aw.cpu())
    torch.testing.assert_close(want.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_cpu_op_runs_in_a_child_forked_after_openmp_work():
    # GNU OpenMP's threads do not survive fork(): torch's own parallel ops hang in such a child. Ours must not
    # (DataLoader workers and multiprocessing fork after the parent ran both torch's OpenMP regions and ours).
    code = textwrap.dedent("""
        import os, torch
        from detrcore import ops
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        shapes = torch.tensor([[32, 24], [16, 12]])
        start = torch.tensor([0, 32 * 24])
        value = torch.randn(2, 32 * 24 + 16 * 12, 4, 8, generator=g)
        loc = torch.rand(2, 200, 4, 2, 3, 2, generator=g)
        w = torch.rand(2, 200, 4, 2, 3, generator=g)
        (torch.randn(512, 512) @ torch.randn(512, 512)).exp().sum()  # torch's OpenMP team is up
        want = ops.ms_deform_attn(value, shapes, start, loc, w)
        pid = os.fork()
        if pid == 0:
            got = ops.ms_deform_attn(value, shapes, start, loc, w)
            os._exit(0 if torch.equal(got, want) else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def _packed_inputs(counts, dtype, D=5, seed=0):
    """value [B, S, H, D] and packed locations / weights [N, ...] with image b's queries the next counts[b] rows."""
    value, ss, ls, loc, aw = make_inputs(B=len(counts), D=D, Q=max(counts), dtype=dtype, seed=seed)
    loc = torch.cat([loc[b, :n] for b, n in enumerate(counts)])
    aw = torch.cat([aw[b, :n] for b, n in enumerate(counts)])
    return value, ss, ls, loc, aw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", [[7, 3], [1, 5, 2], [4, 0, 6], [0, 3], [5]])
@pytest.mark.parametrize("D", [5, 32])  # scalar and AVX2 kernels
def test_packed_equals_per_image_calls_values_and_gradients(dtype, counts, D):
    """In place per image: the same output and gradients (value, locations, weights) as calling the op per image
    and concatenating, bit for bit (the same kernels on the same rows); an image with no queries gets zeros."""
    value, ss, ls, loc, aw = _packed_inputs(counts, dtype, D=D)
    grad = torch.randn(loc.shape[0], value.shape[2] * D, dtype=dtype)
    results = []
    for packed in (True, False):
        v, lc, w = (t.clone().requires_grad_() for t in (value, loc, aw))
        if packed:
            out = ops.ms_deform_attn_packed(v, ss, ls, lc, w, counts)
        else:
            out = torch.cat([ops.ms_deform_attn(v[b : b + 1], ss, ls, part_l[None], part_w[None])[0]
                             for b, (part_l, part_w) in enumerate(zip(lc.split(counts), w.split(counts)))])
        out.backward(grad)
        results.append((out.detach(), v.grad, lc.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():  # no autograd node: the same values
        torch.testing.assert_close(ops.ms_deform_attn_packed(value, ss, ls, loc, aw, counts), results[1][0], rtol=0,
                                   atol=0)
    for b, n in enumerate(counts):
        if n == 0:
            assert results[0][1][b].abs().sum() == 0


def test_packed_gradcheck_and_half_precision():
    counts = [3, 2]
    value, ss, ls, loc, aw = _packed_inputs(counts, torch.float64, D=3)
    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, aw))
    assert torch.autograd.gradcheck(lambda v, lc, w: ops.ms_deform_attn_packed(v, ss, ls, lc, w, counts), inputs)
    # half precision takes the per-image calls (computed in float32)
    out = ops.ms_deform_attn_packed(value.bfloat16(), ss, ls, loc.float(), aw.float(), counts)
    want = ops.ms_deform_attn_packed(value.bfloat16().float(), ss, ls, loc.float(), aw.float(), counts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


def test_packed_under_torch_compile():
    """torch.compile traces the per-image custom-op calls: the eager path's values."""
    counts = [3, 2]
    value, ss, ls, loc, aw = _packed_inputs(counts, torch.float64, D=3)
    compiled = torch.compile(lambda v, lc, w: ops.ms_deform_attn_packed(v, ss, ls, lc, w, counts), fullgraph=True)
    torch.testing.assert_close(compiled(value.float(), loc.float(), aw.float()),
                               ops.ms_deform_attn_packed(value.float(), ss, ls, loc.float(), aw.float(), counts))


def test_packed_bad_counts_are_named():
    value, ss, ls, loc, aw = _packed_inputs([3, 2], torch.float32)
    empty = ops.ms_deform_attn_packed(value[:0], ss, ls, loc[:0], aw[:0], [])  # no images: [0, H*D]
    assert empty.shape == (0, value.shape[2] * value.shape[3])
    with pytest.raises(ValueError, match="counts"):
        ops.ms_deform_attn_packed(value, ss, ls, loc, aw, [3])
    with pytest.raises(ValueError, match="sum\\(counts\\)"):
        ops.ms_deform_attn_packed(value, ss, ls, loc, aw, [3, 3])
    with pytest.raises(ValueError, match="counts"):
        ops.ms_deform_attn_packed(value, ss, ls, loc, aw, [6, -1])
    with pytest.raises(ValueError, match="sampling_locations"):
        ops.ms_deform_attn_packed(value, ss, ls, loc[..., :1], aw, [3, 2])


def _packed_value_inputs(value_shapes, dtype, D=5, Q=6, seed=0, shapes=((6, 4), (3, 2), (1, 1))):
    """A packed value (each image's top-left value_shapes[b] corners, `ms_deform_attn_packed`'s value_shapes), the
    zero-padded [B, S, H, D] it stands for, and per-image [B * Q] locations / weights."""
    B = len(value_shapes)
    full, ss, ls, loc, aw = make_inputs(B=B, D=D, Q=Q, shapes=shapes, dtype=dtype, seed=seed)
    starts = ls.tolist()
    rows, keep = [], torch.zeros(full.shape[:2], dtype=torch.bool)
    for b, levels in enumerate(value_shapes):
        for (h, w), (fh, fw), start in zip(levels, shapes, starts):
            block = torch.zeros(fh, fw, dtype=torch.bool)
            block[:h, :w] = True
            keep[b, start : start + fh * fw] = block.flatten()
            level = full[b, start : start + fh * fw].view(fh, fw, *full.shape[2:])
            rows.append(level[:h, :w].reshape(-1, *full.shape[2:]))
    full = full.masked_fill(~keep[..., None, None], 0.0)
    vs = torch.tensor(value_shapes, dtype=torch.int64)
    return torch.cat(rows), vs, full, ss, ls, loc.flatten(0, 1), aw.flatten(0, 1)


VALUE_SHAPES = [
    [[[6, 4], [3, 2], [1, 1]], [[4, 3], [2, 2], [1, 1]]],  # a padded second image
    [[[5, 1], [3, 2], [0, 0]], [[6, 4], [3, 2], [1, 1]], [[1, 4], [1, 0], [1, 1]]],  # thin, empty levels
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value_shapes", VALUE_SHAPES)
@pytest.mark.parametrize("D", [5, 32])  # scalar and AVX2 kernels
def test_packed_value_equals_the_zero_padded_value(dtype, value_shapes, D):
    """A value packed by value_shapes gives the outputs and the location / weight gradients of its zero-padded
    [B, S, H, D] twin, and its gradient is the twin's at the stored positions; with and without the native node
    (the per-image fallback pads the value itself)."""
    packed, vs, full, ss, ls, loc, aw = _packed_value_inputs(value_shapes, dtype, D=D)
    counts = [6] * len(value_shapes)
    grad = torch.randn(loc.shape[0], full.shape[2] * D, dtype=dtype)
    results = []
    for v0, kwargs in ((full, {}), (packed, {"value_shapes": vs})):
        v, lc, w = (t.clone().requires_grad_() for t in (v0, loc, aw))
        out = ops.ms_deform_attn_packed(v, ss, ls, lc, w, counts, **kwargs)
        out.backward(grad)
        results.append((out.detach(), v.grad, lc.grad, w.grad))
    (out_f, gv_f, gl_f, gw_f), (out_p, gv_p, gl_p, gw_p) = results
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out_p, out_f, rtol=rtol, atol=atol)
    torch.testing.assert_close(gl_p, gl_f, rtol=rtol, atol=atol)
    torch.testing.assert_close(gw_p, gw_f, rtol=rtol, atol=atol)
    keep = full.abs().sum((2, 3)) != 0  # the stored positions (random values are never exactly zero)
    torch.testing.assert_close(gv_p, gv_f[keep], rtol=rtol, atol=atol)
    assert gv_p.shape == packed.shape
    with torch.no_grad():  # no autograd node: the same values
        torch.testing.assert_close(ops.ms_deform_attn_packed(packed, ss, ls, loc, aw, counts, value_shapes=vs),
                                   out_p, rtol=0, atol=0)
    # The fallback (here: under a dispatch mode, which turns the native node off) pads the packed value itself.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    v = packed.clone().requires_grad_()
    with Passthrough():
        out = ops.ms_deform_attn_packed(v, ss, ls, loc, aw, counts, value_shapes=vs)
    out.backward(grad)
    torch.testing.assert_close(out.detach(), out_f, rtol=rtol, atol=atol)
    torch.testing.assert_close(v.grad, gv_f[keep], rtol=rtol, atol=atol)


def test_packed_value_gradcheck():
    packed, vs, _, ss, ls, loc, aw = _packed_value_inputs(VALUE_SHAPES[0], torch.float64, D=3, Q=3)
    inputs = tuple(t.clone().requires_grad_() for t in (packed, loc, aw))
    assert torch.autograd.gradcheck(
        lambda v, lc, w: ops.ms_deform_attn_packed(v, ss, ls, lc, w, [3, 3], value_shapes=vs), inputs)


def test_packed_value_bad_input_is_named():
    packed, vs, full, ss, ls, loc, aw = _packed_value_inputs(VALUE_SHAPES[0], torch.float32)
    with pytest.raises(ValueError, match="value must be a \\[N_v, H, D\\]"):
        ops.ms_deform_attn_packed(full, ss, ls, loc, aw, [6, 6], value_shapes=vs)
    with pytest.raises(ValueError, match="value holds"):
        ops.ms_deform_attn_packed(packed[1:], ss, ls, loc, aw, [6, 6], value_shapes=vs)
    too_big = vs.clone()
    too_big[1, 0, 0] = 7
    with pytest.raises(ValueError, match="within spatial_shapes"):
        ops.ms_deform_attn_packed(packed, ss, ls, loc, aw, [6, 6], value_shapes=too_big)
    with pytest.raises(ValueError, match="value_shapes must be"):
        ops.ms_deform_attn_packed(packed, ss, ls, loc, aw, [6, 6], value_shapes=vs[:, :2])
    with pytest.raises(ValueError, match="counts"):
        ops.ms_deform_attn_packed(packed, ss, ls, loc, aw, [12], value_shapes=vs)
    # The kernel's coord_shapes: never smaller than the stored maps.
    out = full.new_empty(1, 6, full.shape[2] * full.shape[3])
    with pytest.raises(ValueError, match="coord_shapes: level 0"):
        _C.ms_deform_attn_forward(full[:1], ss, ls, loc[None, :6], aw[None, :6], out, coord_shapes=ss - 1)
    with pytest.raises(TypeError, match="coord_shapes"):
        _C.ms_deform_attn_forward(full[:1], ss, ls, loc[None, :6], aw[None, :6], out, coord_shapes=ss.int())
