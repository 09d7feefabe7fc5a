"""Double backward (create_graph=True), each claim of the README's "Double backward" paragraph.

Works: every norm (bn, gn, ln, gn+pn, ln+pn) with relu, silu and gelu, checked by gradgradcheck in float64 on a
conv + norm-act block (input and parameters), and a gradient penalty through a small Proxy Norm model.
Does not work: the Scaled-WS weight function of the NF models (first-order only): a clear error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ipu_norm.layers import create_norm_act
from ipu_norm.layers.weight_std import ScaledStdConv2d


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:  # noqa: ARG001
    """Small float64 tensors: one thread is faster and steadier on a shared machine."""


def _perturbed(layer: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "gn+pn", "ln+pn"])
def test_norm_act_gradgradcheck(norm: str, act: str) -> None:
    layer = _perturbed(create_norm_act(norm, 4, act, groups=2).double())
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters()]

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x,))

    assert torch.autograd.gradgradcheck(fn, (x, *params), atol=1e-5, rtol=1e-4)


def test_gradient_penalty_through_a_proxy_norm_model() -> None:
    # d/dW of ||d loss / d x||^2 (a WGAN-GP style penalty): finite differences of the penalty match autograd's.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _perturbed(create_norm_act("ln+pn", 4, "silu")),
                          nn.Conv2d(4, 2, 1)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def penalty() -> torch.Tensor:
        (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        return gx.square().sum()

    w = model[1].proxy_weight
    (got,) = torch.autograd.grad(penalty(), w)
    h = 1e-6
    vals = []
    for step in (h, -2 * h):
        with torch.no_grad():
            w[0] += step
        vals.append(penalty().item())
    with torch.no_grad():
        w[0] += h
    up, down = vals
    assert abs(got[0].item() - (up - down) / (2 * h)) <= 1e-5 * (1 + abs(got[0].item()))


def test_nf_scaled_ws_input_penalty_works_weight_hessian_does_not() -> None:
    # An input-gradient penalty differentiates the WS function once (d W_hat / d W): it works and matches
    # finite differences. A second derivative w.r.t. the weights (e.g. a Hessian-vector product, or a penalty on
    # d loss / d W) differentiates the WS backward itself, which is first-order only: a clear error.
    conv = ScaledStdConv2d(3, 4, 3).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def penalty() -> torch.Tensor:
        (gx,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
        return gx.square().sum()

    (got,) = torch.autograd.grad(penalty(), conv.weight)
    h, vals = 1e-6, []
    for step in (h, -2 * h):
        with torch.no_grad():
            conv.weight[0, 0, 0, 0] += step
        vals.append(penalty().item())
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] += h
    want = (vals[0] - vals[1]) / (2 * h)
    assert abs(got[0, 0, 0, 0].item() - want) <= 1e-5 * (1 + abs(want))

    (gw,) = torch.autograd.grad(conv(x).square().sum(), conv.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gw.square().sum().backward()
