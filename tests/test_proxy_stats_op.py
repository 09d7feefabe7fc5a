"""The ipu_norm::proxy_stats custom op (PyTorch side) against the plain-autograd reference.

The reference (`proxy_stats_reference`) differentiates phi through autograd; the op uses the analytic
backward op (and an analytic double backward), so agreement in float64 checks the derivation.
The relu closed form (continuous Gaussian) is tested with the layers, not here.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from ipu_norm.layers.proxy_norm import ProxyNormAct
from ipu_norm.ops.proxy_stats import (
    PROXY_ACTS,
    gaussian_quantiles,
    proxy_stats,
    proxy_stats_reference,
)

# `ipu_norm.ops.proxy_stats` the attribute is the function (re-exported by ipu_norm.ops); get the module.
ps_mod = importlib.import_module("ipu_norm.ops.proxy_stats")


def _params(c: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> list[torch.Tensor]:
    """Random (gamma, beta, proxy_gamma, proxy_beta): gamma of both signs, nonzero proxy params."""
    g = torch.randn(c, dtype=dtype) * 1.5 * scale
    g[0] = -abs(g[0]) - 0.5  # at least one negative gamma
    b = torch.randn(c, dtype=dtype)
    pg = 0.5 * torch.randn(c, dtype=dtype)
    pb = 0.5 * torch.randn(c, dtype=dtype)
    return [t.requires_grad_() for t in (g, b, pg, pb)]


@pytest.mark.parametrize("act", PROXY_ACTS)
@pytest.mark.parametrize("n", [200, 17])
def test_op_matches_reference_values_and_grads(act: str, n: int) -> None:
    params = _params(9)
    mean, var = proxy_stats(*params, act=act, num_quantiles=n)
    mean_r, var_r = proxy_stats_reference(*params, act=act, num_quantiles=n)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, mean_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, var_r, rtol=1e-12, atol=1e-12)
    gm, gv = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    grads = torch.autograd.grad((mean * gm + var * gv).sum(), params)
    grads_r = torch.autograd.grad((mean_r * gm + var_r * gv).sum(), params)
    for got, want in zip(grads, grads_r):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_single_output_gradients() -> None:
    """Only one of (mean, var) in the loss: the other's gradient is zero, not an error."""
    params = _params(5)
    for k in (0, 1):
        out = proxy_stats(*params, act="silu")[k].sum()
        ref = proxy_stats_reference(*params, act="silu")[k].sum()
        for got, want in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, params)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", PROXY_ACTS)
def test_gradcheck_and_gradgradcheck(act: str) -> None:
    params = _params(4)
    fn = lambda *p: torch.ops.ipu_norm.proxy_stats(*p, act, 16)  # noqa: E731
    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


def test_second_derivatives_match_reference() -> None:
    """Double backward (analytic) against autograd-through-the-reference, e.g. Hessian-vector products."""
    params = _params(6)
    vec = [torch.randn(6, dtype=torch.float64) for _ in params]
    for act in ("silu", "gelu"):
        hv = []
        for fn in (proxy_stats, proxy_stats_reference):
            mean, var = fn(*params, act=act)
            grads = torch.autograd.grad((mean * 0.3 + var).sum(), params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vec))
            hv.append(torch.autograd.grad(dot, params))
        for got, want in zip(*hv):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_activation_derivative_formulas() -> None:
    """phi' and phi'' used by the backward/double backward vs autograd through ACT_FNS."""
    from ipu_norm.layers.activations import ACT_FNS

    u = torch.linspace(-4, 4, 101, dtype=torch.float64).requires_grad_()
    u = u + 1e-3  # keep relu away from its kink
    for act in PROXY_ACTS:
        z, d1, d2 = ps_mod._act_and_derivs(u.detach(), act, 2)
        (d1_ref,) = torch.autograd.grad(ACT_FNS[act](u).sum(), u, create_graph=True)
        d2_ref = torch.autograd.grad(d1_ref.sum(), u, allow_unused=True)[0] if d1_ref.requires_grad else None
        torch.testing.assert_close(z, ACT_FNS[act](u.detach()))
        torch.testing.assert_close(torch.as_tensor(d1, dtype=z.dtype).expand_as(z), d1_ref.detach())
        want2 = torch.zeros_like(z) if d2_ref is None else d2_ref
        torch.testing.assert_close(torch.as_tensor(d2, dtype=z.dtype).expand_as(z), want2)
        # The fused ATen vjp the backward op uses is grad * phi'.
        grad = torch.randn_like(z)
        torch.testing.assert_close(ps_mod.act_vjp(grad, u.detach(), act), grad * d1)


def test_opcheck() -> None:
    p = [t.detach() for t in _params(5, torch.float32)]
    for act in ("relu", "gelu"):
        torch.library.opcheck(torch.ops.ipu_norm.proxy_stats.default, (*p, act, 16))
        gm, gv = torch.randn(5), torch.randn(5)
        torch.library.opcheck(torch.ops.ipu_norm.proxy_stats_backward.default, (gm, gv, *p, act, 16))


def test_fp32_stats_for_half_params_and_under_autocast() -> None:
    p32 = [t.detach().float() for t in _params(6)]
    mean32, var32 = proxy_stats(*p32, act="gelu")
    assert mean32.dtype == torch.float32
    # bf16 parameters: computed in fp32 from the (rounded) parameters, fp32 outputs, bf16 gradients.
    pbf = [t.to(torch.bfloat16).requires_grad_() for t in p32]
    mean, var = proxy_stats(*pbf, act="gelu")
    assert mean.dtype == var.dtype == torch.float32
    want = proxy_stats_reference(*[t.detach().float() for t in pbf], act="gelu")
    torch.testing.assert_close(mean, want[0], rtol=1e-6, atol=1e-6)
    (mean.sum() + var.sum()).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in pbf)
    # Inside autocast(bf16) the stats stay fp32 and equal the fp32 computation.
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mean_ac, var_ac = proxy_stats(*p32, act="gelu")
    assert mean_ac.dtype == var_ac.dtype == torch.float32
    torch.testing.assert_close(mean_ac, mean32, rtol=0, atol=0)
    torch.testing.assert_close(var_ac, var32, rtol=0, atol=0)


def test_float32_close_to_float64() -> None:
    p64 = [t.detach() for t in _params(16)]
    for act in PROXY_ACTS:
        m32, v32 = proxy_stats(*[t.float() for t in p64], act=act)
        m64, v64 = proxy_stats(*p64, act=act)
        torch.testing.assert_close(m32.double(), m64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=1e-5)


def test_identity_closed_form() -> None:
    """identity: mean = gamma pb + beta, var = gamma^2 (1 + pg)^2 var(q) (exact on the quantile grid)."""
    g, b, pg, pb = (t.detach() for t in _params(5))
    q = gaussian_quantiles(200, dtype=torch.float64)
    mean, var = proxy_stats(g, b, pg, pb, act="identity")
    torch.testing.assert_close(mean, g * pb + b + g * (1 + pg) * q.mean())
    torch.testing.assert_close(var, (g * (1 + pg)) ** 2 * q.var(correction=0))


def test_errors_and_meta() -> None:
    p = [t.detach() for t in _params(3)]
    with pytest.raises(ValueError, match="supports activations"):
        proxy_stats(*p, act="tanh")
    with pytest.raises(TypeError):
        torch.ops.ipu_norm.proxy_stats(*[t.half() for t in p], "relu", 200)
    with pytest.raises(ValueError):
        torch.ops.ipu_norm.proxy_stats(p[0], p[1][:2], p[2], p[3], "relu", 200)
    with torch.device("meta"):
        mean, var = proxy_stats(*[torch.empty(7) for _ in range(4)], act="silu")
    assert mean.shape == var.shape == (7,) and mean.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference() -> None:
    params = [t.detach().cuda().requires_grad_() for t in _params(9)]
    for act in PROXY_ACTS:
        out = proxy_stats(*params, act=act)
        ref = proxy_stats_reference(*params, act=act)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out[0].sum() + 0.7 * out[1].sum(), params)
        grads_r = torch.autograd.grad(ref[0].sum() + 0.7 * ref[1].sum(), params)
        for got, want in zip(grads, grads_r):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    p32 = [t.detach().float() for t in params]
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        mean, var = proxy_stats(*p32, act="gelu")
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, proxy_stats(*p32, act="gelu")[0])


def _compile_parity(backend: str) -> None:
    torch._dynamo.reset()
    layer = ProxyNormAct(6, act="silu").double()
    with torch.no_grad():
        for prm in layer.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    out_eager = layer(x)
    grads_eager = torch.autograd.grad(out_eager.square().sum(), list(layer.parameters()))
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(out_c, out_eager, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads_c, grads_eager):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_aot_eager() -> None:
    """Dynamo captures the op in one graph (fake impl) and AOTAutograd traces its backward op."""
    _compile_parity("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor() -> None:
    _compile_parity("inductor")


def test_no_ipu_dispatch_without_poptorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "poptorch", raising=False)
    assert not ps_mod.running_on_ipu()


def test_dispatch_to_ipu_op_under_poptorch_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With PopTorch tracing (isRunningOnIpu() True) proxy_stats emits poptorch.custom_op with the
    registered name/domain/version and attributes. poptorch is the SDK 3.4 table-generated stand-in (it binds the
    call against the real custom_op signature): this checks the wiring only; the real op runs in the `ipu` tests of
    test_custom_op_cpp.py."""
    from poptorch_standin import StandIn

    tracing = [True]
    standin = StandIn({
        "poptorch.isRunningOnIpu": lambda: tracing[0],
        "poptorch.custom_op": lambda inputs, name, domain, domain_version, example_outputs, attributes=None: [
            torch.zeros_like(example_outputs[0]), torch.ones_like(example_outputs[1])],
    })
    monkeypatch.setitem(sys.modules, "poptorch", standin.poptorch)
    ipu_mod = importlib.import_module("ipu_norm.ops.proxy_stats_ipu")
    monkeypatch.setattr(ipu_mod, "load_custom_ops", lambda path=None: None)

    p = [t.detach().half() for t in _params(4)]
    mean, var = proxy_stats(*p, act="swish", num_quantiles=64)
    calls = standin.calls("poptorch.custom_op")
    assert len(calls) == 1
    inputs, name, domain, version = calls[0].args
    examples, attrs = calls[0].kwargs["example_outputs"], calls[0].kwargs["attributes"]
    assert (name, domain, version) == ("ProxyStats", "ipu_norm", 1)
    assert attrs == {"activation": "silu", "num_quantiles": 64}
    assert [t.dtype for t in inputs] == [torch.float32] * 4
    assert [tuple(t.shape) for t in examples] == [(4,), (4,)] and examples[0].dtype == torch.float32
    assert torch.equal(var, torch.ones(4))

    tracing[0] = False  # outside the traced forward: the torch op again
    mean, _ = proxy_stats(*p, act="silu")
    assert len(standin.calls("poptorch.custom_op")) == 1 and mean.dtype == torch.float32


def test_load_custom_ops_missing_library(tmp_path) -> None:  # noqa: ANN001
    from ipu_norm.ops.proxy_stats_ipu import load_custom_ops

    with pytest.raises(FileNotFoundError, match=r"make -C custom_ops"):
        load_custom_ops(tmp_path / "custom_ops.so")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", PROXY_ACTS)
def test_cpu_kernel_matches_the_aten_implementation(act: str, dtype: torch.dtype, monkeypatch) -> None:
    """The op's C kernel (ipu_norm.ops.cpu_kernels) against its ATen implementation, forward and backward op."""
    from ipu_norm.ops.cpu_kernels import cpu_proxy_stats_applies  # noqa: PLC0415

    ops = importlib.import_module("ipu_norm.ops.proxy_stats")  # the package re-exports a function of that name

    g = torch.Generator().manual_seed(3)
    c = 37
    params = [torch.randn(c, generator=g, dtype=dtype) * 0.7 + (1.0 if i == 0 else 0.0) for i in range(4)]
    upstream = [torch.randn(c, generator=g, dtype=dtype) for _ in range(2)]
    if not cpu_proxy_stats_applies(params[0], 200):
        pytest.skip("the proxy-statistics C kernel could not be built here")

    def both() -> tuple[torch.Tensor, ...]:
        fwd = torch.ops.ipu_norm.proxy_stats(*params, act, 200)
        bwd = torch.ops.ipu_norm.proxy_stats_backward(*upstream, *params, act, 200)
        return (*fwd, *bwd)

    kernel = both()
    monkeypatch.setitem(ops._CPU_KERNEL, "enabled", False)
    aten = both()
    tol = {"rtol": 1e-11, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    for i, (a, b) in enumerate(zip(kernel, aten)):
        # The moments (output 2) are sums of 200 terms, some of centred values that cancel to ~0 (relu channels
        # with every u > 0): their rounding error is ~n eps in absolute terms, not relative.
        torch.testing.assert_close(a, b, **(tol if i != 2 else {"rtol": tol["rtol"], "atol": 200 * tol["atol"]}))


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "aten"])
@pytest.mark.parametrize("act", PROXY_ACTS)
def test_first_order_backward_from_moments_equals_the_backward_op(act: str, kernel: bool, monkeypatch) -> None:
    """The O(C) first-order backward (forward moments) against the recomputing backward op, in float64."""
    ops = importlib.import_module("ipu_norm.ops.proxy_stats")
    monkeypatch.setitem(ops._CPU_KERNEL, "enabled", kernel)
    g = torch.Generator().manual_seed(5)
    c = 29
    params = [(torch.randn(c, generator=g, dtype=torch.float64) * 0.7 + (1.0 if i == 0 else 0.0)).requires_grad_()
              for i in range(4)]
    gm, gv = (torch.randn(c, generator=g, dtype=torch.float64) for _ in range(2))
    mean, var, _ = torch.ops.ipu_norm.proxy_stats(*params, act, 200)
    got = torch.autograd.grad((mean * gm).sum() + (var * gv).sum(), params, retain_graph=True)
    want = torch.ops.ipu_norm.proxy_stats_backward(gm, gv, *[p.detach() for p in params], act, 200)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    # create_graph takes the recomputing backward op (double backward): the same first-order values.
    again = torch.autograd.grad((mean * gm).sum() + (var * gv).sum(), params, create_graph=True)
    for a, b in zip(again, want):
        torch.testing.assert_close(a.detach(), b, rtol=1e-11, atol=1e-12)
