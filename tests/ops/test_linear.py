"""detrcore.nn.linear / Linear (oneDNN for float32 on the CPU): values and all three gradients against a float64
F.linear over odd sizes, 3-D and non-contiguous inputs, with and without bias; the fallbacks to F.linear (float64,
autocast, 1-D, empty, the environment switch); the module's parameter names; torch.compile; a MultiheadAttention
step through it."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from detrcore.nn import Linear, MultiheadAttention, linear
from detrcore.nn import onednn_linear as linear_module

ONEDNN = linear_module._ONEDNN is not None
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN linear op")

SHAPES = [((1, 1), 1), ((7, 13), 5), ((3, 5, 33), 17), ((2660, 256), 1024), ((64, 1024), 256), ((2, 3, 4, 9), 2)]


def reference(x, w, b, g):
    """Float64 F.linear and its gradients for x, w, b given the output gradient g."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y = F.linear(x64, w64, b64)
    y.backward(g.double())
    return y, x64.grad, w64.grad, None if b is None else b64.grad


def close(actual, expected, k):
    # float32 sums of k products in another order: error grows like sqrt(k)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-6 * k ** 0.5 * 4)


@needs_onednn
@pytest.mark.parametrize("shape,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_float64_reference_with_gradients(shape, n, bias, contiguous):
    g = torch.Generator().manual_seed(sum(shape) + n)
    k = shape[-1]
    if contiguous:
        x = torch.randn(*shape, generator=g)
    else:  # the last two axes stored transposed
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
        assert not x.is_contiguous() or min(shape[-2:]) == 1
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    x.requires_grad_(), w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    y = linear(x, w, b)
    assert type(y.grad_fn).__name__ == "_OneDnnLinearFnBackward"
    go = torch.randn(y.shape, generator=g)
    y.backward(go)
    ry, rgx, rgw, rgb = reference(x, w, b, go)
    close(y, ry, k)
    close(x.grad, rgx, n)
    close(w.grad, rgw, x.numel() // k)
    if bias:
        close(b.grad, rgb, x.numel() // k)


@needs_onednn
def test_only_the_needed_gradients():
    x, w, b = torch.randn(9, 6), torch.randn(4, 6, requires_grad=True), torch.randn(4)
    y = linear(x, w, b)
    y.sum().backward()
    assert x.grad is None and b.grad is None
    torch.testing.assert_close(w.grad, torch.ones(9, 4).t() @ x)
    x.requires_grad_()
    linear(x, w.detach(), None).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(9, 4) @ w.detach())


@needs_onednn
def test_no_grad_forward_is_the_same_computation():
    x, w, b = torch.randn(33, 20), torch.randn(7, 20, requires_grad=True), torch.randn(7)
    with torch.no_grad():
        y = linear(x, w, b)
    assert y.grad_fn is None
    assert torch.equal(y, linear(x, w, b).detach())
    close(y, F.linear(x.double(), w.double(), b.double()), 20)


def test_fallbacks_are_f_linear_exactly():
    g = torch.Generator().manual_seed(0)
    x64, w64 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 8), (3, 8)))
    assert torch.equal(linear(x64, w64), F.linear(x64, w64))  # float64
    x, w, b = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = linear(x, w, b), F.linear(x, w, b)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)  # autocast
    assert torch.equal(linear(x[0], w, b), F.linear(x[0], w, b))  # 1-D
    assert linear(x[:0], w, b).shape == (0, 3)  # empty
    assert not linear_module.onednn_applies(x.bfloat16(), w.bfloat16(), b.bfloat16())


def test_shape_errors_are_torchs():
    with pytest.raises(RuntimeError):
        linear(torch.randn(4, 5), torch.randn(3, 6))


@needs_onednn
@pytest.mark.parametrize("faster", ["onednn", "blas"])
def test_auto_backend_times_both_then_keeps_the_faster(faster, monkeypatch):
    """Auto mode: a shape class's first calls alternate oneDNN and BLAS (one untimed warm-up call each, then TRIALS
    timed calls each), after which every call takes the faster; the values are F.linear's whichever computes them."""
    duration = {"onednn": 1.0 if faster == "onednn" else 2.0, "blas": 2.0 if faster == "onednn" else 1.0}
    now, calls = [0.0], []

    def tracked(name, fn):
        def run(*args):
            calls.append(name)
            now[0] += duration[name]  # the clock reads this much later after the product than before it
            return fn(*args)
        return run

    monkeypatch.setattr(linear_module, "BACKEND", "auto")
    monkeypatch.setattr(linear_module, "_choices", {})
    monkeypatch.setattr(linear_module, "_clock", lambda: now[0])
    monkeypatch.setattr(linear_module, "_BACKENDS", (tracked("onednn", linear_module._mm),
                                                     tracked("blas", linear_module._blas)))
    x, w, b = torch.randn(300, 24), torch.randn(16, 24), torch.randn(16)
    trials = 2 * (linear_module.TRIALS + 1)
    for _ in range(trials + 4):
        close(linear(x, w, b), F.linear(x.double(), w.double(), b.double()), 24)
    assert calls[:trials] == ["onednn", "blas"] * (trials // 2)
    assert calls[trials:] == [faster] * 4
    # Another shape class (another M bucket, no bias, a transposed weight) is timed afresh; M 257..512 share one.
    linear(torch.randn(600, 24), w, b)
    linear(x, w, None)
    linear(torch.randn(300, 16), w.t(), None)
    assert calls[trials + 4:] == ["onednn"] * 3
    linear(torch.randn(257, 24), w, b)
    assert calls[-1] == faster and len(linear_module._choices) == 4


@needs_onednn
@pytest.mark.parametrize("how", ["deterministic", "onednn", "blas"])
def test_fixed_backends(how, monkeypatch):
    """torch.use_deterministic_algorithms(True) or DETRCORE_LINEAR_BACKEND=onednn: always oneDNN (the same bits on
    every call); =blas: always F.linear, exactly."""
    monkeypatch.setattr(linear_module, "_choices", {})
    monkeypatch.setattr(linear_module, "BACKEND", "auto" if how == "deterministic" else how)
    x, w, b = torch.randn(50, 30), torch.randn(20, 30), torch.randn(20)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(how == "deterministic")
    try:
        outs = [linear(x, w, b) for _ in range(10)]
    finally:
        torch.use_deterministic_algorithms(before)
    want = F.linear(x, w, b) if how == "blas" else linear_module._mm(x, w, b)
    assert all(torch.equal(o, want) for o in outs)
    assert linear_module._choices == {}


def test_bad_backend_setting_is_a_named_error():
    code = "import detrcore.nn"
    env = dict(os.environ, DETRCORE_LINEAR_BACKEND="mkl")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "DETRCORE_LINEAR_BACKEND must be auto, onednn or blas, got 'mkl'" in out.stderr


def test_environment_switch_turns_it_off():
    code = "from detrcore.nn import onednn_linear as m; print(m._ONEDNN is None)"
    env = dict(os.environ, DETRCORE_ONEDNN_LINEAR="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_only_on_x86_64(monkeypatch):
    monkeypatch.setattr(linear_module.platform, "machine", lambda: "aarch64")
    assert linear_module._onednn_linear_op() is None
    monkeypatch.setattr(linear_module.platform, "machine", lambda: "x86_64")
    assert (linear_module._onednn_linear_op() is not None) == torch.backends.mkldnn.is_available()


def test_module_names_and_state_dict_match_nn_linear():
    torch.manual_seed(0)
    theirs = torch.nn.Linear(12, 5)
    ours = Linear(12, 5)
    assert isinstance(ours, torch.nn.Linear)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 12)
    close(ours(x), F.linear(x.double(), theirs.weight.double(), theirs.bias.double()), 12)


def test_torch_func_transforms_take_f_linear():
    """Under torch.func (grad, vmap) the layer is F.linear (its autograd.Function has no functorch rules)."""
    w, b = torch.randn(8, 5), torch.randn(8)
    x = torch.randn(3, 5)
    got = torch.func.grad(lambda x: linear(x, w, b).square().sum())(x)
    torch.testing.assert_close(got, 2 * F.linear(x, w, b) @ w)
    batched = torch.func.vmap(lambda row: linear(row[None], w, b)[0])(x)
    torch.testing.assert_close(batched, F.linear(x, w, b))


def test_torch_compile_fullgraph():
    lin = Linear(16, 32)

    def f(x):
        return lin(x).relu().sum()

    x = torch.randn(4, 16)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_multihead_attention_projections_go_through_it():
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4, dropout=0.2, batch_first=True).train()
    q = torch.randn(2, 7, 32, requires_grad=True)
    torch.manual_seed(3)
    out = ours(q, q, q, need_weights=False)[0]
    names = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    assert "_OneDnnLinearFnBackward" in names
    # the same step in float64 (torch's F.linear) with the same dropout draws
    ours64 = MultiheadAttention(32, 4, dropout=0.2, batch_first=True, dtype=torch.float64).train()
    ours64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    torch.manual_seed(3)
    ref = ours64(q.double(), q.double(), q.double(), need_weights=False)[0]
    close(out, ref, 32)


@needs_onednn
def test_double_backward_matches_f_linear():
    g = torch.Generator().manual_seed(11)
    x, w, b = (torch.randn(*s, generator=g, requires_grad=True) for s in ((6, 9), (4, 9), (4,)))

    def second_order(fn):
        y = fn(x, w, b)
        gx, gw = torch.autograd.grad((y ** 2).sum(), (x, w), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w, b))

    for ours, theirs in zip(second_order(linear), second_order(F.linear)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # values ~10-100: float32 order


@pytest.mark.parametrize("rows, out_features, in_features", [(2660, 256, 1024), (2660, 384, 256), (4096, 8, 3),
                                                               (2661, 256, 256), (600, 256, 256), (2660, 1024, 256)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_weight_grad_matches_the_product(rows, out_features, in_features, threads):
    """weight_grad = g^T x: split over the long axis (one bmm batch per thread, partial products summed) where the
    measured regime applies (an even split of >= 1024 rows per thread, <= 512 outputs), mm elsewhere (odd split,
    short, many outputs, one thread): the float64 product either way."""
    g_ = torch.Generator().manual_seed(rows + threads)
    g = torch.randn(rows, out_features, generator=g_)
    x = torch.randn(rows, in_features, generator=g_)
    before = torch.get_num_threads()
    calls = []
    real_bmm = torch.bmm
    torch.bmm = lambda *a: calls.append(1) or real_bmm(*a)
    try:
        torch.set_num_threads(threads)
        with torch.no_grad():  # as in a backward without create_graph
            got = linear_module.weight_grad(g, x)
        assert bool(calls) == (threads >= 2 and rows % threads == 0 and rows // threads >= 1024
                               and out_features <= 512)
        calls.clear()
        linear_module.weight_grad(g, x)  # grad mode on (create_graph): the plain product
        assert not calls
    finally:
        torch.bmm = real_bmm
        torch.set_num_threads(before)
    want = g.double().t().mm(x.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    # a transposed (non-contiguous) operand: the plain product
    torch.testing.assert_close(linear_module.weight_grad(g, x.t().contiguous().t()).double(), want, rtol=1e-4,
                               atol=1e-3)
