"""The fused GroupNorm + ReLU/SiLU/GELU (+ Proxy Norm) CPU kernel of GroupNormAct against the ATen path it replaces."""

import pytest
import torch
from test_proxy_norm_fused import _saved_bytes

from ipu_norm.layers import norm_act
from ipu_norm.layers.norm_act import GroupNormAct, _GroupNormActFn
from ipu_norm.models import create_model
from ipu_norm.ops import pn_act_cpu


@pytest.fixture
def kernel(one_thread, monkeypatch):  # noqa: ANN001, ANN201
    if pn_act_cpu._lib() is None:
        pytest.skip("the C kernels could not be built here (no C compiler?)")
    monkeypatch.setattr(norm_act, "FUSED_GN_ACT_MIN_PLANE", 1)  # plain GN + act on these small test planes too


def _layer(dtype: torch.dtype, act: str, groups: int, proxy: bool) -> GroupNormAct:
    layer = GroupNormAct(12, groups, act, proxy=proxy).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():  # away from the init (gamma~ = beta~ = 0) so that every term is exercised
            p.add_(0.4 * torch.randn_like(p))
    return layer


def _run(layer: GroupNormAct, x: torch.Tensor, g: torch.Tensor, fused: bool) -> list[torch.Tensor]:
    norm_act._FUSED_GN_ACT["enabled"] = fused
    try:
        assert layer._fused_applies(x) == fused
        out = layer(x)
        return [out, *torch.autograd.grad(out, [x, *layer.parameters()], g)]
    finally:
        norm_act._FUSED_GN_ACT["enabled"] = True


@pytest.mark.parametrize("proxy", [False, True], ids=["gn", "gn+pn"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_gn_act_matches_the_aten_path(dtype: torch.dtype, act: str, groups: int, proxy: bool, kernel) -> None:  # noqa: ANN001
    """Output and the gradients of x, gamma, beta (and gamma~, beta~ through the proxy statistics)."""
    layer = _layer(dtype, act, groups, proxy)
    x = (2.5 * torch.randn(3, 12, 5, 7, dtype=dtype) + 0.7).requires_grad_()  # a mean and both tails of phi
    g = torch.randn(3, 12, 5, 7, dtype=dtype)
    fused, aten = _run(layer, x, g, True), _run(layer, x, g, False)
    assert len(fused) == (6 if proxy else 4)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for a, b in zip(fused, aten):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_fused_gn_act_gradcheck(act: str, kernel) -> None:  # noqa: ANN001
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _GroupNormActFn.apply(*a, 3, 1e-3, act), (x, w, b, s, t))
    assert torch.autograd.gradcheck(lambda x, w, b: _GroupNormActFn.apply(x, w, b, None, None, 2, 1e-3, act),
                                    (x, w, b))


def test_fused_gn_act_saves_only_its_input(kernel) -> None:  # noqa: ANN001
    """The kernel keeps x and the (N, G) statistics; GroupNorm -> SiLU on ATen also keeps SiLU's input."""
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    fused = _saved_bytes(GroupNormAct(16, 4, "silu", proxy=True), x)
    norm_act._FUSED_GN_ACT["enabled"] = False
    try:
        aten_gn = _saved_bytes(GroupNormAct(16, 4, "silu"), x)
    finally:
        norm_act._FUSED_GN_ACT["enabled"] = True
    assert x.numel() * 4 <= fused <= x.numel() * 4 * 1.01
    assert aten_gn >= 2 * x.numel() * 4


def test_fused_gn_act_falls_back(kernel, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(norm_act, "FUSED_GN_ACT_MIN_PLANE", 256)
    layer = GroupNormAct(8, 4, "silu", proxy=True)
    x = torch.randn(2, 8, 4, 4)
    assert layer._fused_applies(x)
    # Plain GN + act keeps ATen's kernels on planes smaller than FUSED_GN_ACT_MIN_PLANE (faster there).
    assert not GroupNormAct(8, 4, "silu")._fused_applies(x)
    assert GroupNormAct(8, 4, "silu")._fused_applies(torch.randn(2, 8, 16, 16))
    assert not layer._fused_applies(x.to(memory_format=torch.channels_last))  # not contiguous
    assert not layer._fused_applies(x.bfloat16())  # autocast dtypes: ATen
    assert GroupNormAct(8, 4, "relu", proxy=True)._fused_applies(x)  # (the ATen path folds the PN scale into GN)
    assert not GroupNormAct(8, 4, "identity")._fused_applies(x)
    torch.set_num_threads(2)
    assert not layer._fused_applies(x)  # ATen's kernels are parallel
    torch.set_num_threads(1)


@pytest.mark.parametrize(("arch", "norm", "fused_layers"), [
    ("efficientnet_b0", "gn", 33), ("efficientnet_b0", "gn+pn", 33), ("efficientnet_b0", "ln+pn", 33),
    ("resnet50", "gn+pn", 33),
])
def test_model_step_is_the_same_with_and_without_the_kernel(arch: str, norm: str, fused_layers: int, kernel,  # noqa: ANN001
                                                            monkeypatch) -> None:  # noqa: ANN001
    """A whole model (float64, batched proxy statistics): loss and every parameter gradient."""
    calls = []
    real = norm_act.fused_gn_act_forward
    monkeypatch.setattr(norm_act, "fused_gn_act_forward", lambda *a: calls.append(1) or real(*a))
    model = create_model(arch, num_classes=10, norm=norm, drop_rate=0.0, drop_path_rate=0.0).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proxy" in name:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = []
    for fused in (True, False):
        norm_act._FUSED_GN_ACT["enabled"] = fused
        try:
            model.zero_grad(set_to_none=True)
            loss = model(x).logsumexp(dim=1).sum()
            loss.backward()
            results.append([loss.detach(), *(p.grad.clone() for p in model.parameters())])
        finally:
            norm_act._FUSED_GN_ACT["enabled"] = True
    assert len(calls) == fused_layers  # every norm with an activation took the kernel in the first run, none after
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
