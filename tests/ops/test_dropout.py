"""detrcore.ops.dropout (native CPU dropout, mask regenerated in the backward) and detrcore.nn.MultiheadAttention
(attention-weight dropout through it): the definition, statistics, gradients, reproducibility, the fallbacks to
torch, opcheck, torch.compile and named errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from detrcore import _C, ops
from detrcore.nn import Dropout, MultiheadAttention


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_definition_and_keep_rate(dtype, p):
    x = torch.randn(1000, 1001, generator=gen(1)).to(dtype)
    y = ops.dropout(x, p, generator=gen(2))
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - p)), rtol=0, atol=0)
    n, rate = x.numel(), kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 6 * sigma, (rate, 1 - p)
    # neighbours are independent: P(keep_i and keep_i+1) = (1 - p)^2
    k = kept.flatten()
    both = (k[:-1] & k[1:]).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 / n), both


def test_relu_variant_shares_the_mask():
    x = torch.randn(3, 257, 33, generator=gen(3))
    plain = ops.dropout(x, 0.3, generator=gen(4))
    fused = ops.dropout(x, 0.3, relu=True, generator=gen(4))
    torch.testing.assert_close(fused, F.relu(plain), rtol=0, atol=0)
    assert (fused >= 0).all()


def test_backward_is_the_mask_times_the_scale():
    x = torch.randn(50, 70, dtype=torch.float64, generator=gen(5), requires_grad=True)
    g = torch.randn(50, 70, dtype=torch.float64, generator=gen(6))
    y = ops.dropout(x, 0.4, generator=gen(7))
    (gx,) = torch.autograd.grad(y, x, g)
    keep = ops.dropout(torch.ones_like(x), 0.4, generator=gen(7)) != 0  # the same stream: the same mask
    torch.testing.assert_close(gx, torch.where(keep, g * (1 / 0.6), 0.0), rtol=0, atol=0)
    y = ops.dropout(x, 0.4, relu=True, generator=gen(7))
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, torch.where(keep & (x > 0), g * (1 / 0.6), 0.0), rtol=0, atol=0)


def test_bfloat16_matches_float32_rounded_once():
    """bfloat16 (CPU autocast's dtype) is computed in float32 and rounded once: the float32 result, rounded."""
    x = torch.randn(77, 130, generator=gen(20)).bfloat16().requires_grad_()
    g = torch.randn(77, 130, generator=gen(21)).bfloat16()
    for relu in (False, True):
        y = ops.dropout(x, 0.3, relu=relu, generator=gen(22))
        y32 = ops.dropout(x.detach().float(), 0.3, relu=relu, generator=gen(22))
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, y32.bfloat16())
        (gx,) = torch.autograd.grad(y, x, g)
        keep = (y32 != 0) if relu else (ops.dropout(torch.ones(77, 130), 0.3, generator=gen(22)) != 0)
        assert torch.equal(gx, torch.where(keep, g.float() * (1 / 0.7), 0.0).bfloat16())


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_float64(relu):
    x = torch.randn(4, 9, 5, dtype=torch.float64, generator=gen(8))
    x = torch.where(x.abs() < 1e-3, 0.5, x).requires_grad_()  # away from ReLU's kink
    assert torch.autograd.gradcheck(lambda t: ops.dropout(t, 0.3, relu=relu, generator=gen(9)), (x,))
    # double backward: the backward ops are their own derivatives (the same mask)
    assert torch.autograd.gradgradcheck(lambda t: ops.dropout(t, 0.3, relu=relu, generator=gen(9)), (x,))
    m = Dropout(0.3, relu=relu)  # the eager module path too
    xf = x.detach().float().requires_grad_()
    (g,) = torch.autograd.grad(m(xf).square().sum(), xf, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xf)
    kept = (g != 0).float()  # d/dx sum(2 y dy/dx) = 2 (dy/dx)^2: the scale squared where kept
    torch.testing.assert_close(h, kept * 2 / 0.7**2)


def test_same_seed_same_mask_regardless_of_threads_and_length():
    x = torch.randn(300_001, generator=gen(10))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.dropout(x, 0.2, generator=gen(11))
        torch.set_num_threads(2)
        two = ops.dropout(x, 0.2, generator=gen(11))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    prefix = ops.dropout(x[:1234], 0.2, generator=gen(11))  # element i depends on (seed, i) only
    assert torch.equal(prefix, one[:1234])
    assert not torch.equal(ops.dropout(x, 0.2, generator=gen(12)), one)


def test_torch_manual_seed_reproduces_and_draws_advance():
    x = torch.randn(10_000)
    torch.manual_seed(123)
    a, b = ops.dropout(x, 0.5), ops.dropout(x, 0.5)
    torch.manual_seed(123)
    assert torch.equal(ops.dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def test_non_contiguous_input_is_read_in_logical_order():
    x = torch.randn(40, 60, generator=gen(13)).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.dropout(x, 0.3, generator=gen(14)),
                               ops.dropout(x.contiguous(), 0.3, generator=gen(14)), rtol=0, atol=0)


def test_identity_cases_and_torch_fallbacks():
    x = torch.randn(8, 16, generator=gen(15))
    assert ops.dropout(x, 0.5, training=False) is x
    assert ops.dropout(x, 0.0) is x
    torch.testing.assert_close(ops.dropout(x, 0.5, training=False, relu=True), F.relu(x))
    assert torch.equal(ops.dropout(x, 1.0), torch.zeros_like(x))
    xh = x.half()  # not a native dtype on the CPU: torch's dropout
    yh = ops.dropout(xh, 0.5)
    assert yh.dtype == torch.float16
    torch.testing.assert_close(yh[yh != 0], xh[yh != 0] * 2)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.1", None])
def test_bad_p_is_a_value_error(bad):
    with pytest.raises(ValueError, match="p must be"):
        ops.dropout(torch.ones(3), bad)
    with pytest.raises((ValueError, TypeError)):
        Dropout(bad)


def test_native_entry_points_check_their_arguments():
    x, out = torch.ones(10), torch.empty(10)
    with pytest.raises(ValueError, match="p must be in"):
        _C.dropout(x, out, 1, 1.0, False)
    with pytest.raises(ValueError, match="shape"):
        _C.dropout(x, torch.empty(11), 1, 0.5, False)
    with pytest.raises(TypeError):
        _C.dropout(x, torch.empty(10, dtype=torch.float64), 1, 0.5, False)
    with pytest.raises(ValueError, match="shape"):
        _C.relu_dropout_backward(x, torch.ones(9), out, 0.5)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        ops.dropout([1.0, 2.0], 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 4097, 70001])  # odd lengths: the pairwise draws' edges
def test_native_kernels_run_in_place_and_reject_partial_overlap(dtype, n):
    """out may be the input itself (the fused feed-forward block masks its own buffers in place): the same
    values as out of place, for every kernel; an output overlapping an input otherwise is a named error."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g).to(dtype)
    grad = torch.randn(n, generator=g).to(dtype)
    for relu in (False, True):
        want = torch.empty_like(x)
        _C.dropout(x, want, 11, 0.3, relu)
        got = x.clone()
        _C.dropout(got, got, 11, 0.3, relu)
        assert torch.equal(got, want)
    want = torch.empty_like(grad)
    _C.dropout_backward(grad, want, 11, 0.3)
    got = grad.clone()
    _C.dropout_backward(got, got, 11, 0.3)
    assert torch.equal(got, want)
    y = torch.empty_like(x)
    _C.dropout(x, y, 11, 0.3, True)
    want = torch.empty_like(grad)
    _C.relu_dropout_backward(grad, y, want, 0.3)
    got = grad.clone()
    _C.relu_dropout_backward(got, y, got, 0.3)
    assert torch.equal(got, want)
    if n > 1:
        buf = torch.randn(n + 1).to(dtype)
        with pytest.raises(ValueError, match="overlaps"):
            _C.dropout(buf[:n], buf[1:], 11, 0.3, False)
        with pytest.raises(ValueError, match="overlaps"):
            _C.dropout_backward(buf[1:], buf[:n], 11, 0.3)
        with pytest.raises(ValueError, match="overlaps output"):
            _C.relu_dropout_backward(grad, y, y, 0.3)  # only the gradient may be overwritten


def test_opcheck():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(42)
    torch.library.opcheck(torch.ops.detrcore.dropout.default, (x, seed, 0.25, False))
    torch.library.opcheck(torch.ops.detrcore.dropout.default, (x, seed, 0.25, True))
    g = torch.randn(5, 7, dtype=torch.float64)
    torch.library.opcheck(torch.ops.detrcore.dropout_backward.default, (g, seed, 0.25))
    torch.library.opcheck(torch.ops.detrcore.relu_dropout_backward.default, (g, F.relu(x.detach()), 0.25))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_is_the_custom_op(relu, dtype):
    """In eager mode `ops.dropout` skips torch.library's dispatch; values and gradients are the custom op's, and a
    create_graph backward gives the same first-order gradient."""
    x = torch.randn(37, 70, generator=gen(3)).to(dtype).requires_grad_()
    g = torch.randn(37, 70, generator=gen(4)).to(dtype)
    torch.manual_seed(11)
    y = ops.dropout(x, 0.3, relu=relu)
    assert y.grad_fn is not None and "EagerDropout" in type(y.grad_fn).__name__
    torch.manual_seed(11)
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    y_op = torch.ops.detrcore.dropout(x, seed, 0.3, relu)
    assert torch.equal(y, y_op)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (gx_op,) = torch.autograd.grad(y_op, x, g)
    assert torch.equal(gx, gx_op)
    (gx_graph,) = torch.autograd.grad(y, x, g, create_graph=True)
    assert torch.equal(gx_graph, gx)


def test_torch_func_grad_takes_torchs_dropout():
    """torch.func transforms take torch's dropout (neither our autograd.Function nor the custom op's has functorch
    rules): a gradient of 0 or 1 / (1 - p) per element."""
    x = torch.randn(64, 33)
    got = torch.func.grad(lambda x: ops.dropout(x, 0.3).sum())(x)
    kept = got != 0
    torch.testing.assert_close(got[kept], torch.full_like(got[kept], 1 / 0.7))
    assert 0.5 < kept.float().mean() < 0.9


def test_torch_compile_fullgraph():
    lin = torch.nn.Linear(16, 32)

    def f(x):
        return ops.dropout(lin(x), 0.2, relu=True).sum()

    x = torch.randn(4, 16)
    compiled = torch.compile(f, fullgraph=True)
    torch.manual_seed(5)
    eager = f(x)
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(x), eager)


def test_module():
    d = Dropout(0.25, relu=True)
    assert "relu=True" in repr(d) and list(d.parameters()) == []
    x = torch.randn(64, 64)
    torch.manual_seed(0)
    y = d(x)
    torch.manual_seed(0)
    assert torch.equal(y, ops.dropout(x, 0.25, relu=True))
    assert torch.equal(d.eval()(x), F.relu(x))


# ---- MultiheadAttention ----

def attention_reference(mha, q, k, v, key_padding_mask, keep):
    """torch's own MHA in eval mode gives the attention probabilities; dropout them with `keep`, finish by hand."""
    B, Lq, E = q.shape
    H = mha.num_heads
    probs = torch.nn.MultiheadAttention.forward(mha.eval(), q, k, v, key_padding_mask=key_padding_mask,
                                                need_weights=True, average_attn_weights=False)[1]
    mha.train()
    vh = F.linear(v, mha.in_proj_weight[2 * E:], mha.in_proj_bias[2 * E:]).view(B, -1, H, E // H).transpose(1, 2)
    out = ((probs * keep / (1 - mha.dropout)) @ vh).transpose(1, 2).reshape(B, Lq, E)
    return mha.out_proj(out)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("self_attention", [False, True])
def test_multihead_attention_matches_torch_with_the_same_mask(with_mask, self_attention):
    """self_attention: query is key (one product for both projections) and value a different tensor, as DETR's
    decoder calls it; values and every gradient against torch's own attention with the same dropout mask."""
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4, dropout=0.3, batch_first=True, dtype=torch.float64).train()
    q, k, v = (torch.randn(2, n, 32, dtype=torch.float64) for n in ((7, 7, 7) if self_attention else (5, 7, 7)))
    if self_attention:
        k = q
    q.requires_grad_(), v.requires_grad_()
    mask = torch.zeros(2, 7, dtype=torch.bool)
    if with_mask:
        mask[1, 4:] = True
    torch.manual_seed(77)
    out, weights = mha(q, k, v, key_padding_mask=mask if with_mask else None, need_weights=False)
    assert weights is None
    torch.manual_seed(77)
    keep = ops.dropout(torch.ones(2, 4, q.shape[1], 7, dtype=torch.float64), 0.3) != 0
    ref = attention_reference(mha, q, k, v, mask if with_mask else None, keep)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    leaves = [q, v, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight]
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want)


def test_multihead_attention_falls_back_to_torch():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
    theirs = torch.nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
    theirs.load_state_dict(ours.state_dict())  # same parameter names
    q = torch.randn(3, 4, 16)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(q, q, q)[0], theirs(q, q, q)[0])
    torch.testing.assert_close(ours(q, q, q, need_weights=True)[1], theirs(q, q, q, need_weights=True)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (3000, 17), (2, 3, 40)])
@pytest.mark.parametrize("in_place", [False, True])
def test_relu_dropout_backward_column_sums(dtype, shape, in_place):
    """column_sums: the same grad_input, and its sums over every row (the feed-forward block's linear1 bias
    gradient), whatever the thread count (each count's chunks summed in order: repeatable)."""
    g = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(shape, generator=g).to(dtype)
    y = F.relu(torch.randn(shape, generator=g)).to(dtype)
    want = torch.empty_like(grad)
    _C.relu_dropout_backward(grad, y, want, 0.3)
    for threads in (1, 2, 3):
        got = grad.clone() if in_place else torch.empty_like(grad)
        sums = torch.empty(shape[-1], dtype=dtype)
        _C.relu_dropout_backward(got if in_place else grad, y, got, 0.3, num_threads=threads, column_sums=sums)
        assert torch.equal(got, want)
        exact = want.double().reshape(-1, shape[-1]).sum(0)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(sums.double(), exact, rtol=tol, atol=tol)
        again = torch.empty_like(sums)
        _C.relu_dropout_backward(grad, y, torch.empty_like(grad), 0.3, num_threads=threads, column_sums=again)
        assert torch.equal(again, sums)


def test_relu_dropout_backward_column_sums_bad_input():
    grad, y = torch.randn(4, 6), F.relu(torch.randn(4, 6))
    out = torch.empty_like(grad)
    with pytest.raises(ValueError, match="column_sums must have grad's last dimension \\(6\\)"):
        _C.relu_dropout_backward(grad, y, out, 0.3, column_sums=torch.empty(4))
    with pytest.raises(TypeError):
        _C.relu_dropout_backward(grad, y, out, 0.3, column_sums=torch.empty(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="overlaps"):
        _C.relu_dropout_backward(grad, y, out, 0.3, column_sums=out.view(-1)[:6])
    with pytest.raises(ValueError, match="\\[cols\\]"):
        _C.relu_dropout_backward(grad, y, out, 0.3, column_sums=torch.empty(1, 6))
