"""The native CPU attention kernel behind detrcore.nn.MultiheadAttention's training path (`_C.attention_forward` /
`_backward`, `detrcore.nn.attention._NativeAttention`): against its pure-PyTorch twin (`_torch_attention` with the
same dropout seed) across dtypes, odd sizes, strided views, padding masks, dropout rates, fully masked rows and empty
shapes; float64 gradcheck and gradgradcheck; thread-count independence; the module's dispatch; named errors."""
import pytest
import torch

from detrcore import _C
from detrcore.nn import MultiheadAttention
from detrcore.nn import attention as A


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(B, Lq, Lk, H, D, dtype, seed=0, strided=True):
    """q and k as slices of one [B, L, 2E] product (row stride 2E), v with every other row of a longer tensor."""
    E = H * D
    g = gen(seed)
    if strided:
        q = torch.randn(B, Lq, 2 * E, dtype=dtype, generator=g)[..., :E]
        k = torch.randn(B, Lk, 3 * E, dtype=dtype, generator=g)[..., E : 2 * E]
        v = torch.randn(B, 2 * Lk, E, dtype=dtype, generator=g)[:, ::2]
    else:
        q, k, v = (torch.randn(B, n, E, dtype=dtype, generator=g) for n in (Lq, Lk, Lk))
    return [t.requires_grad_() for t in (q, k, v)]


def both(q, k, v, mask, H, p, seed, g):
    """(output, grads) of the native Function and of the twin, same seed."""
    results = []
    for fn in (A._NativeAttention.apply, A._torch_attention):
        out = fn(q, k, v, mask, H, p, seed)
        grads = torch.autograd.grad(out, (q, k, v), g) if out.numel() else (None,) * 3
        results.append((out, grads))
    return results


SHAPES = [  # B, Lq, Lk, H, D
    (2, 37, 45, 3, 11),  # odd everything: tails in every loop
    (1, 1, 1, 1, 1),
    (2, 3, 2, 2, 8),  # fewer rows / keys than a block of four
    (1, 9, 70, 2, 40),  # 40 channels: a 16-lane chunk plus a tail
    (2, 300, 300, 8, 32),  # Deformable DETR's decoder self-attention
    (1, 7, 45, 2, 64),  # the AVX-512 backward's 4-vector chunks (D a multiple of 32) with partial key chunks and rows
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_torch_twin(dtype, shape, p, masked):
    B, Lq, Lk, H, D = shape
    q, k, v = inputs(B, Lq, Lk, H, D, dtype, seed=Lq + Lk)
    mask = None
    if masked:
        mask = torch.zeros(B, Lk, dtype=torch.bool)
        mask[-1, (Lk + 1) // 2 :] = True  # the last image padded on its second half (at least one key kept)
    g = torch.randn(B, Lq, H * D, dtype=dtype, generator=gen(1))
    (out, grads), (ref, ref_grads) = both(q, k, v, mask, H, p, 1234, g)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 2e-5}
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)
    if masked and p == 0.0:  # masked keys get no weight and no gradient
        assert (grads[1][-1, (Lk + 1) // 2 :] == 0).all() and (grads[2][-1, (Lk + 1) // 2 :] == 0).all()


def test_attention_weights_are_the_softmax_and_the_mask_is_dropouts():
    """attn holds softmax(q k^T / sqrt(d)) before dropout; the output uses ops.dropout's mask for the same seed."""
    B, L, H, D = 2, 13, 2, 4
    q, k, v = (t.detach() for t in inputs(B, L, L, H, D, torch.float64, strided=False))
    out, attn = torch.empty(B, L, H * D, dtype=torch.float64), torch.empty(B, H, L, L, dtype=torch.float64)
    _C.attention_forward(q, k, v, None, H, D**-0.5, 99, 0.4, out, attn, num_threads=2)
    qh, kh, vh = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
    probs = ((qh * D**-0.5) @ kh.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(attn, probs)
    dropped = torch.empty_like(probs)
    _C.dropout(probs, dropped, 99, 0.4, False, num_threads=1)
    torch.testing.assert_close(out, (dropped @ vh).transpose(1, 2).reshape(B, L, H * D))
    assert abs((dropped == 0).double().mean().item() - 0.4) < 0.1  # 40 % of 676 weights dropped (sigma 0.019)


def test_fully_masked_rows_are_nan_as_in_torch():
    q, k, v = inputs(2, 4, 5, 2, 3, torch.float64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True  # the second image has no key at all
    g = torch.randn(2, 4, 6, dtype=torch.float64, generator=gen(2))
    (out, grads), (ref, ref_grads) = both(q, k, v, mask, 2, 0.2, 5, g)
    assert out[1].isnan().all() and not out[0].isnan().any()
    torch.testing.assert_close(out, ref, equal_nan=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("B,Lq,Lk,D", [(0, 3, 3, 3), (2, 0, 3, 3), (2, 3, 0, 3), (2, 3, 3, 0)])
def test_empty_shapes(B, Lq, Lk, D):
    q, k, v = inputs(B, Lq, Lk, 2, D, torch.float64, strided=False)
    if D == 0:  # no channels: two heads of nothing are refused (one head of nothing works, below)
        with pytest.raises(ValueError, match="num_heads = 2 must be a positive divisor of the embedding size E = 0"):
            A._NativeAttention.apply(q, k, v, None, 2, 0.1, 3)
        out = A._NativeAttention.apply(q, k, v, None, 1, 0.1, 3)
        assert out.shape == (B, Lq, 0)
        return
    out = A._NativeAttention.apply(q, k, v, None, 2, 0.1, 3)
    ref = A._torch_attention(q, k, v, None, 2, 0.1, 3)
    assert out.shape == ref.shape == (B, Lq, 2 * D)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (q, k, v))  # zeros: nothing flows through an empty product
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_and_gradgradcheck_float64(masked):
    q, k, v = inputs(2, 5, 6, 2, 3, torch.float64)
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2]) if masked else None

    def fn(q, k, v):
        return A._NativeAttention.apply(q, k, v, mask, 2, 0.3, 17)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))  # double backward: the twin with the same mask


def test_results_do_not_depend_on_the_thread_count():
    """With 2 heads, 2 and 3 threads split the forward's heads into row blocks; 1 thread takes whole heads."""
    B, L, H, D = 1, 50, 2, 8
    q, k, v = (t.detach() for t in inputs(B, L, L, H, D, torch.float32))
    g = torch.randn(B, L, H * D, generator=gen(3))
    runs = []
    for threads in (1, 2, 3):
        out, attn = torch.empty(B, L, H * D), torch.empty(B, H, L, L)
        _C.attention_forward(q, k, v, None, H, D**-0.5, 7, 0.1, out, attn, num_threads=threads)
        gq, gk, gv = torch.empty(B, L, H * D), torch.empty(B, L, H * D), torch.empty(B, L, H * D)
        _C.attention_backward(q, k, v, None, H, D**-0.5, 7, 0.1, g, attn, gq, gk, gv, num_threads=threads)
        runs.append((out, attn, gq, gk, gv))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_takes_the_native_path_and_matches_the_torch_ops(dtype, monkeypatch):
    """In training on the CPU, MultiheadAttention runs the kernel; with the fast path off (as under torch.compile or
    torch.func) it runs the torch ops: same seed, same results and gradients."""
    torch.manual_seed(0)
    mha = MultiheadAttention(48, 4, dropout=0.2, batch_first=True, dtype=dtype).train()
    x = torch.randn(2, 11, 48, dtype=dtype, requires_grad=True)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 8:] = True
    calls = []
    native = A._NativeAttention.apply
    monkeypatch.setattr(A._NativeAttention, "apply", lambda *a: calls.append(1) or native(*a))

    def run():
        torch.manual_seed(5)
        out = mha(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        return out, torch.autograd.grad(out.square().sum(), [x, *mha.parameters()])

    out, grads = run()
    assert calls == [1]
    monkeypatch.setattr(A._lib, "eager_fast_path", lambda *t: False)
    ref, ref_grads = run()
    assert calls == [1]  # the torch ops this time
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)


def test_bfloat16_and_eval_take_torchs_path(monkeypatch):
    calls = []
    monkeypatch.setattr(A._NativeAttention, "apply", lambda *a: calls.append(1))
    mha = MultiheadAttention(16, 2, dropout=0.1, batch_first=True).train()
    x = torch.randn(1, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mha(x, x, x, need_weights=False)[0].dtype == torch.bfloat16
    mha.eval()(x, x, x, need_weights=False)
    assert calls == []


def test_named_errors():
    q, k, v = (t.detach() for t in inputs(1, 3, 4, 2, 2, torch.float32, strided=False))
    out, attn = torch.empty(1, 3, 4), torch.empty(1, 2, 3, 4)

    def call(**kw):
        args = dict(query=q, key=k, value=v, key_padding_mask=None, num_heads=2, scale=1.0, seed=0, p=0.1, out=out,
                    attn=attn)
        args.update(kw)
        _C.attention_forward(**args, num_threads=1)

    with pytest.raises(TypeError, match="query must be float32 or float64"):
        call(query=q.long(), key=k.long(), value=v.long())
    with pytest.raises(TypeError, match="key must have the dtype of query"):
        call(key=k.double())
    with pytest.raises(ValueError, match="num_heads = 3 must be a positive divisor of the embedding size E = 4"):
        call(num_heads=3)
    with pytest.raises(ValueError, match="value: expected Lk"):
        call(value=torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="key must have contiguous channels"):
        call(key=torch.randn(1, 4, 8)[..., ::2])
    with pytest.raises(TypeError, match="key_padding_mask must be a uint8 CPU tensor"):
        call(key_padding_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="key_padding_mask: expected Lk"):
        call(key_padding_mask=torch.zeros(1, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\)"):
        call(p=1.0)
    with pytest.raises(ValueError, match="attn must have shape"):
        call(attn=torch.empty(1, 2, 3, 3))
