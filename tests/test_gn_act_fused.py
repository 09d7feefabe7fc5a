"""The fused CPU kernels of GroupNormAct (GroupNorm + ReLU/SiLU/GELU + Proxy Norm) and BatchNormAct2d (training
BatchNorm + ReLU) against the ATen paths they replace."""

import pytest
import torch
from test_proxy_norm_fused import _saved_bytes

from ipu_norm.layers import norm_act
from ipu_norm.layers.norm_act import BatchNormAct2d, GroupNormAct, _GroupNormActFn
from ipu_norm.models import create_model
from ipu_norm.ops import cpu_kernels


@pytest.fixture(params=["cpp_op", "python_fn"])
def kernel(request, one_thread, monkeypatch):  # noqa: ANN001, ANN201
    """The fused kernels, reached through the C++ autograd op or through the Python autograd function."""
    if cpu_kernels._lib() is None:
        pytest.skip("the C kernels could not be built here (no C compiler?)")
    if request.param == "cpp_op":
        if not cpu_kernels._cpp_ops():
            pytest.skip("the C++ op could not be built here (no ninja / C++ compiler?)")
    else:
        monkeypatch.setattr(cpu_kernels, "_cpp_ops", lambda: False)
    monkeypatch.setattr(norm_act, "FUSED_GN_ACT_MIN_PLANE", 1)  # plain GN + act on these small test planes too
    return request.param


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


# Planes of the kernel's two chunkings: several channels per chunk (s < 2048, the 3x3-12x12 planes of late stages)
# and one channel per chunk (s >= 2048).
PLANES = {"small": (5, 7), "chunked": (9, 13), "long": (48, 49)}


@pytest.mark.parametrize("plane", list(PLANES))
@pytest.mark.parametrize("proxy", [False, True], ids=["gn", "gn+pn"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_gn_act_matches_the_aten_path(dtype: torch.dtype, act: str, groups: int, proxy: bool, plane: str,
                                            kernel) -> None:  # noqa: ANN001
    """Output and the gradients of x, gamma, beta (and gamma~, beta~ through the proxy statistics)."""
    h, w = PLANES[plane]
    layer = _layer(dtype, act, groups, proxy)
    x = (2.5 * torch.randn(3, 12, h, w, dtype=dtype) + 0.7).requires_grad_()  # a mean and both tails of phi
    g = torch.randn(3, 12, h, w, dtype=dtype)
    fused, aten = _run(layer, x, g, True), _run(layer, x, g, False)
    assert len(fused) == (6 if proxy else 4)
    if dtype == torch.float64:
        for a, b in zip(fused, aten):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        return
    # float32: the parameter gradients are sums over N * H * W values (7,000 on the long plane), whose float32
    # rounding differs between the two paths; both are compared with the float64 result instead.
    exact = _run(layer.double(), x.detach().double().requires_grad_(), g.double(), False)
    for i, (a, b, e) in enumerate(zip(fused, aten, exact)):
        if i < 2:  # output and grad_x: elementwise
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        else:
            err_fused, err_aten = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
            assert err_fused <= max(2 * err_aten, 2e-5 * e.abs().max().item()), (i, err_fused, err_aten)


@pytest.mark.parametrize("plane", [(3, 4), (8, 9)], ids=["small", "chunked"])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_fused_gn_act_gradcheck(act: str, plane: tuple[int, int], kernel) -> None:  # noqa: ANN001
    x = torch.randn(2, 6, *plane, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(6, dtype=torch.float64, requires_grad=True)
    if kernel == "cpp_op":
        def fn(x, w, b, s=None, t=None, groups=3):  # noqa: ANN001, ANN202
            return cpu_kernels.fused_gn_act(x, w, b, s, t, groups, 1e-3, act)
    else:
        def fn(x, w, b, s=None, t=None, groups=3):  # noqa: ANN001, ANN202
            return _GroupNormActFn.apply(x, w, b, s, t, groups, 1e-3, act)
    assert torch.autograd.gradcheck(fn, (x, w, b, s, t))
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, b, groups=2), (x, w, b))


def test_fused_paths_are_first_order_only(kernel) -> None:  # noqa: ANN001
    # Both paths (the Python one through once_differentiable): a backward that records a graph raises instead of
    # returning gradients without one.
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    w, b = torch.ones(6, dtype=torch.float64, requires_grad=True), torch.zeros(6, dtype=torch.float64)

    def out() -> torch.Tensor:
        if kernel == "cpp_op":
            return cpu_kernels.fused_gn_act(x, w, b, None, None, 3, 1e-3, "silu")
        return _GroupNormActFn.apply(x, w, b, None, None, 3, 1e-3, "silu")

    assert torch.autograd.grad(out().sum(), x)[0].shape == x.shape
    with pytest.raises(RuntimeError, match="first-order only|differentiate twice|does not require grad"):
        (g2,) = torch.autograd.grad(out().sum(), x, create_graph=True)
        g2.sum().backward()


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
    name = "fused_gn_act" if kernel == "cpp_op" else "fused_gn_act_forward"  # what each path calls per layer
    real = getattr(norm_act, name)
    monkeypatch.setattr(norm_act, name, lambda *a: calls.append(1) or real(*a))
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


# ---------------------------------------------------------------------------------------------------------
# The fused training-mode BatchNorm + ReLU kernel of BatchNormAct2d.


def _bn_run(layer: BatchNormAct2d, x: torch.Tensor, g: torch.Tensor, fused: bool, steps: int = 3) -> list:
    norm_act._FUSED_BN_RELU["enabled"] = fused
    try:
        assert layer._fused_applies(x) == fused
        for _ in range(steps):  # the running statistics after several updates
            out = layer(x)
            grads = torch.autograd.grad(out, [x, layer.weight, layer.bias], g)
        return [out, *grads, layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()]
    finally:
        norm_act._FUSED_BN_RELU["enabled"] = True


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_bn_relu_matches_the_aten_path(dtype: torch.dtype, momentum: float | None, kernel) -> None:  # noqa: ANN001
    """Output, gradients of x, gamma, beta, and the running statistics (momentum and cumulative average)."""
    x = (2.0 * torch.randn(4, 6, 5, 3, dtype=dtype) + 0.5).requires_grad_()
    g = torch.randn(4, 6, 5, 3, dtype=dtype)
    layers = []
    for _ in range(2):
        torch.manual_seed(2)
        layer = BatchNormAct2d(6, "relu", momentum=momentum).to(dtype)
        with torch.no_grad():
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))
            layer.bias.add_(0.3 * torch.randn_like(layer.bias))
        layers.append(layer)
    fused, aten = _bn_run(layers[0], x, g, True), _bn_run(layers[1], x, g, False)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for a, b in zip(fused, aten):
        torch.testing.assert_close(a, b, **tol)
    layers[0].eval()
    layers[1].eval()
    assert not layers[0]._fused_applies(x)  # eval: running statistics, ATen
    torch.testing.assert_close(layers[0](x), layers[1](x), **tol)


def test_fused_bn_relu_gradcheck_and_fallbacks(kernel) -> None:  # noqa: ANN001
    from ipu_norm.layers.norm_act import _BatchNormReluFn  # noqa: PLC0415

    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _BatchNormReluFn.apply(x, w, b, 1e-5)[0], (x, w, b))
    layer = BatchNormAct2d(4, "relu")
    xf = torch.randn(3, 4, 2, 3)
    assert layer._fused_applies(xf)
    assert not layer._fused_applies(xf.to(memory_format=torch.channels_last))
    assert not layer._fused_applies(torch.randn(1, 4, 1, 1))  # one value per channel: ATen raises its own error
    assert not BatchNormAct2d(4, "silu")._fused_applies(xf)
    untracked = BatchNormAct2d(4, "relu")
    untracked.track_running_stats = False
    untracked(xf)
    assert int(untracked.num_batches_tracked) == 0


def test_resnet_bn_step_is_the_same_with_and_without_the_kernel(kernel, monkeypatch) -> None:  # noqa: ANN001
    """ResNet-50 with BatchNorm (float64): loss, every parameter gradient and every running statistic."""
    calls = []
    real = norm_act.fused_bn_relu_forward
    monkeypatch.setattr(norm_act, "fused_bn_relu_forward", lambda *a: calls.append(1) or real(*a))
    # 4 x 2 x 2 values per channel in the last stage: BatchNorm over very few values amplifies rounding differences.
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = create_model("resnet50", num_classes=10, norm="bn", drop_rate=0.0, drop_path_rate=0.0).double()
        norm_act._FUSED_BN_RELU["enabled"] = fused
        try:
            loss = model(x).logsumexp(dim=1).sum()
            loss.backward()
        finally:
            norm_act._FUSED_BN_RELU["enabled"] = True
        results.append([loss.detach(), *(p.grad for p in model.parameters()), *model.buffers()])
    assert len(calls) == 33  # the stem's and two per bottleneck (the third norm has no activation)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
