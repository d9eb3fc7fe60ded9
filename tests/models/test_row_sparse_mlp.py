"""The box heads' row-sparse backward (models.transformer.MLP in training on the CPU): the same gradients as the
dense backward of the same layers, for sparse, full, empty and NaN output gradients, frozen parts, double backward
and torch.compile, and in whole models against the dense heads."""
import pytest
import torch

from detrcore.bench import train_step
from detrcore.models import HungarianMatcher, LossWeights, ModelConfig, SetCriterion, build_model
from detrcore.models import transformer
from detrcore.models.transformer import MLP


def _mlp(dtype=torch.float32, seed=0, bias=True):
    torch.manual_seed(seed)
    mlp = MLP(24, 32, 4, 3).to(dtype)
    if not bias:
        mlp.layers[1].bias = None
    return mlp


def _grads(mlp, x, grad, dense):
    """(output, grad of x or None, grads of the parameters) of mlp(x) backpropagated from `grad`."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    mlp.zero_grad(set_to_none=True)
    out = mlp._forward(x) if dense else mlp(x)
    out.backward(grad)
    return out.detach(), x.grad, [None if p.grad is None else p.grad.clone() for p in mlp.parameters()]


def _assert_same(got, want):
    out, gx, gp = got
    out_w, gx_w, gp_w = want
    torch.testing.assert_close(out, out_w)
    assert (gx is None) == (gx_w is None)
    if gx is not None:
        torch.testing.assert_close(gx, gx_w)
    for a, b in zip(gp, gp_w):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rows", ["few", "all", "none", "one_element"])
@pytest.mark.parametrize("shape", [(7, 24), (3, 2, 11, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_row_sparse_backward_matches_dense(rows, shape, bias):
    mlp = _mlp(bias=bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).requires_grad_()
    grad = torch.randn(*shape[:-1], 4, generator=g)
    flat = grad.view(-1, 4)
    if rows == "few":
        keep = torch.zeros(flat.shape[0], dtype=torch.bool)
        keep[torch.randperm(flat.shape[0], generator=g)[:3]] = True
        flat[~keep] = 0
    elif rows == "none":
        flat.zero_()
    elif rows == "one_element":
        flat.zero_()
        flat[-1, 2] = 1.5
    got, want = _grads(mlp, x, grad, dense=False), _grads(mlp, x, grad, dense=True)
    _assert_same(got, want)
    if rows == "none":
        assert got[1].abs().sum() == 0 and all(p.abs().sum() == 0 for p in got[2])


def test_row_sparse_backward_is_used_and_skips_zero_rows(monkeypatch):
    """Only the rows with a gradient are recomputed: the backward's products see 2 rows, not 40."""
    mlp = _mlp()
    seen = []
    real = transformer.linear

    def spy(x, w, b=None):
        seen.append(x.shape[0] if x.dim() == 2 else None)
        return real(x, w, b)

    monkeypatch.setattr(transformer, "linear", spy)
    x = torch.randn(40, 24, requires_grad=True)
    out = mlp(x)
    grad = torch.zeros_like(out)
    grad[[3, 17]] = 1.0
    seen.clear()
    out.backward(grad)
    assert seen == [2, 2, 2]


def test_row_sparse_backward_propagates_nan_and_frozen_parts():
    mlp = _mlp()
    x = torch.randn(9, 24)
    grad = torch.zeros(9, 4)
    grad[4, 1] = float("nan")
    _, _, gp = _grads(mlp, x, grad, dense=False)
    assert all(p.isnan().any() for p in gp[-2:])  # the last layer's weight and bias see the NaN row
    # x without grad; then frozen first layer with x requiring grad
    grad = torch.randn(9, 4)
    grad[::2] = 0
    _assert_same(_grads(mlp, x, grad, dense=False), _grads(mlp, x, grad, dense=True))
    mlp.layers[0].requires_grad_(False)
    xg = x.clone().requires_grad_()
    got, want = _grads(mlp, xg, grad, dense=False), _grads(mlp, xg, grad, dense=True)
    assert got[2][0] is None and got[2][1] is None
    _assert_same(got, want)


def test_row_sparse_mlp_gradcheck_and_double_backward():
    mlp = _mlp(torch.float64)
    x = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    params = list(mlp.parameters())

    def fn(x, *ps):
        with torch.no_grad():
            for p, v in zip(params, ps):
                p.copy_(v)
        return transformer._RowSparseMLP.apply(mlp, x, *ps) * torch.tensor([1.0, 0, 0, 2.0], dtype=torch.float64)

    inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_row_sparse_mlp_under_torch_func_takes_the_plain_layers():
    mlp = _mlp()
    x = torch.randn(10, 24)
    weights = torch.zeros(10, 4)
    weights[3] = 1
    got = torch.func.grad(lambda x: (mlp(x) * weights).sum())(x)
    _, want, _ = _grads(mlp, x.requires_grad_(), weights, dense=True)
    torch.testing.assert_close(got, want)


def test_row_sparse_mlp_under_torch_compile():
    mlp = _mlp()
    x = torch.randn(10, 24, requires_grad=True)
    grad = torch.zeros(10, 4)
    grad[3] = 1
    compiled = torch.compile(mlp)
    xc = x.detach().clone().requires_grad_()
    compiled(xc).backward(grad)
    _, gx, _ = _grads(mlp, x, grad, dense=True)
    torch.testing.assert_close(xc.grad, gx)


@pytest.mark.parametrize("variant", [dict(), dict(with_box_refine=True), dict(two_stage=True), dict(arch="detr")])
def test_models_train_with_the_dense_heads_gradients(variant, monkeypatch):
    cfg = ModelConfig(num_classes=5, backbone="resnet18", enc_layers=2, dec_layers=2, hidden_dim=64, nheads=4,
                      num_queries=12, dim_feedforward=128, **variant)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    for m in model.modules():  # the papers zero the last box layers: give them weights so every layer gets a grad
        if isinstance(m, MLP):
            torch.nn.init.normal_(m.layers[-1].weight, std=0.1)
    focal = variant.get("arch") != "detr"
    crit = SetCriterion(5, HungarianMatcher(cost_class=2.0, focal=focal), LossWeights(loss_ce=2.0), focal=focal)
    images, mask, targets = train_step.make_batch(size=(96, 128))
    for t in targets:
        t["labels"] = t["labels"] % 5
    grads = []
    for dense in (False, True):
        if dense:
            monkeypatch.setattr(MLP, "forward", lambda self, x: self._forward(x))
        torch.manual_seed(1)  # the same dropout masks
        model.zero_grad(set_to_none=True)
        crit(model(images, mask), targets)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    sparse, dense = grads
    assert sparse.keys() == dense.keys() and any(".layers.0." in n for n in sparse)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-6, msg=name)


def test_row_sparse_backward_outside_autocast_recomputes_in_the_forwards_precision():
    """The forward under bf16 autocast, the backward outside it (as detrcore's training loop does): the rows are
    recomputed in bf16 as the forward ran, so the gradients are the dense backward's."""
    mlp = _mlp()
    x = torch.randn(30, 24, requires_grad=True)
    grad = torch.zeros(30, 4, dtype=torch.bfloat16)
    grad[[2, 11, 29]] = torch.randn(3, 4).bfloat16()
    results = []
    for dense in (False, True):
        xi = x.detach().clone().requires_grad_()
        mlp.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp._forward(xi) if dense else mlp(xi)
        assert out.dtype == torch.bfloat16
        out.backward(grad)
        results.append([xi.grad] + [p.grad.clone() for p in mlp.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
