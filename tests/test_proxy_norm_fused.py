"""The fused PN-Act autograd function: same values/gradients as the unfused ops, and no extra saved activation."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from ipu_norm.layers import create_norm_act
from ipu_norm.layers.activations import ACT_FNS
from ipu_norm.layers.proxy_norm import _channel_view, _ProxyNormActFn


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:  # noqa: ARG001
    """Small tensors: one thread is faster and steadier on a shared machine (conftest's one_thread)."""


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_fused_pn_act_gradcheck(act: str) -> None:
    u = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fused(u, s, t):  # noqa: ANN001, ANN202
        return _ProxyNormActFn.apply(u, _channel_view(s, u), _channel_view(t, u), act)

    assert torch.autograd.gradcheck(fused, (u, s, t))


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_fused_pn_act_matches_unfused_ops(act: str) -> None:
    u = torch.randn(4, 6, 5, 5, requires_grad=True)
    s = (torch.rand(6) + 0.5).requires_grad_()
    t = torch.randn(6, requires_grad=True)
    g = torch.randn(4, 6, 5, 5)
    fused = _ProxyNormActFn.apply(u, _channel_view(s, u), _channel_view(t, u), act)
    grads_fused = torch.autograd.grad(fused, (u, s, t), g)
    plain = torch.addcmul(_channel_view(t, u), ACT_FNS[act](u), _channel_view(s, u))
    grads_plain = torch.autograd.grad(plain, (u, s, t), g)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def _assert_pn_saves_no_more_than_gn(act: str) -> None:
    """GN+PN -> conv saves what GN -> conv saves, up to the statistics' own (C, n) tensors (independent of N, H, W)."""
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    sizes = {}
    for norm in ("gn", "gn+pn"):
        block = torch.nn.Sequential(create_norm_act(norm, 16, act), torch.nn.Conv2d(16, 16, 3, padding=1))
        sizes[norm] = _saved_bytes(block, x)
    assert sizes["gn+pn"] <= sizes["gn"] + 3 * 16 * 200 * 4 + 1024  # at most three (C, n) fp32 tensors


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_gn_pn_saves_no_more_than_gn(act: str) -> None:
    """GN+PN -> conv saves exactly what GN -> conv saves, up to per-channel vectors (< 1% here)."""
    _assert_pn_saves_no_more_than_gn(act)


def test_relu_fold_matches_unfolded_proxy_norm() -> None:
    """GroupNormAct(relu, proxy) folds the PN scale into the GN affine: same output and gradients as GN -> PN-Act."""
    from ipu_norm.layers import GroupNormAct, ProxyNormAct

    torch.manual_seed(1)
    fused = GroupNormAct(8, num_groups=2, act="relu", proxy=True).double()
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p is fused.weight else 0.0))
    ref = ProxyNormAct(8, act="relu", eps=fused.proxy_eps).double()
    ref.load_state_dict({k: v for k, v in fused.state_dict().items()})
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    out = fused(x)
    expected = ref(torch.nn.functional.group_norm(x, 2, eps=fused.eps))
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    params = [fused.weight, fused.bias, fused.proxy_weight, fused.proxy_bias]
    ref_params = [ref.weight, ref.bias, ref.proxy_weight, ref.proxy_bias]
    grads = torch.autograd.grad(out, [x, *params], g)
    ref_grads = torch.autograd.grad(expected, [x, *ref_params], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x: fused(x), (x,))


# ---------------------------------------------------------------------------------------------------------
# Double backward (create_graph) through the PN-Act autograd functions: gradgradcheck in float64.


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_pn_act_double_backward(act: str) -> None:
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda u, s, t: _ProxyNormActFn.apply(u, _channel_view(s, u), _channel_view(t, u), act), (u, s, t)
    )


def test_relu_shift_double_backward() -> None:
    from ipu_norm.layers.proxy_norm import _ReluShiftFn  # noqa: PLC0415

    u = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda u, t: _ReluShiftFn.apply(u, _channel_view(t, u)), (u, t))
