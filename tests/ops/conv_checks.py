"""Shared checks of detrcore.nn.Conv2d's CPU paths against torch's convolution."""
import torch


def assert_double_backward_matches(conv, ref, x, weight_tol=(1e-4, 1e-3)):
    """Second-order gradients through `conv` equal those through torch's `ref` (the same weights): the input
    gradient of sum(conv(x)^2) built with create_graph, then the weight gradient of its squared norm. x requires
    grad; weight_tol: (rtol, atol) of the weight's."""
    got, want = [], []
    for module, out in ((conv, got), (ref, want)):
        (g,) = torch.autograd.grad(module(x).square().sum(), [x], create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), [module.weight])
        out += [g, h]
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=weight_tol[0], atol=weight_tol[1])
