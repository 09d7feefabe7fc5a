"""The host-side proxy statistics (`ipu_norm.ops.proxy_stats.proxy_stats`) against references written here.

Independent of the code under test: the quantiles come from Python's `statistics.NormalDist` (and
`torch.special.ndtri`), the activations from their formulas written with `math`, the statistics from plain Python
sums in float64, and the gradients from central differences of that Python reference.
"""

from __future__ import annotations

import importlib
import math
import sys
from statistics import NormalDist

import pytest
import torch

from ipu_norm.ops.proxy_stats import PROXY_ACTS, gaussian_quantiles, proxy_stats

# `ipu_norm.ops.proxy_stats` the attribute is the function (re-exported by ipu_norm.ops); get the module.
ps_mod = importlib.import_module("ipu_norm.ops.proxy_stats")

_PHI = {
    "relu": lambda u: max(u, 0.0),
    "silu": lambda u: u / (1.0 + math.exp(-u)),
    "gelu": lambda u: 0.5 * u * (1.0 + math.erf(u / math.sqrt(2.0))),
    "identity": lambda u: u,
}


def _quantiles(n: int) -> list[float]:
    return [NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]


def _ref_stats(g: float, b: float, pg: float, pb: float, act: str, n: int) -> tuple[float, float]:
    """Mean and population variance over the n quantiles, one channel, pure Python float64."""
    z = [_PHI[act](g * ((1.0 + pg) * q + pb) + b) for q in _quantiles(n)]
    mean = math.fsum(z) / n
    return mean, math.fsum((v - mean) ** 2 for v in z) / n


def _ref(params: list[torch.Tensor], act: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [_ref_stats(*(float(t[c]) for t in params), act, n) for c in range(params[0].numel())]
    return torch.tensor([r[0] for r in rows], dtype=torch.float64), torch.tensor([r[1] for r in rows],
                                                                                 dtype=torch.float64)


def _params(c: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    """Random (gamma, beta, proxy_gamma, proxy_beta): gamma of both signs, nonzero proxy params."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(c, dtype=dtype, generator=gen) * 1.5
    g[0] = -abs(g[0]) - 0.5  # at least one negative gamma
    b, pg, pb = (0.5 * torch.randn(c, dtype=dtype, generator=gen) for _ in range(3))
    return [t.requires_grad_() for t in (g, b, pg, pb)]


def test_quantiles_match_normal_inverse_cdf() -> None:
    for n in (2, 17, 200):
        want = torch.tensor(_quantiles(n), dtype=torch.float64)
        torch.testing.assert_close(gaussian_quantiles(n, dtype=torch.float64), want, rtol=0, atol=1e-12)
        ndtri = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
        torch.testing.assert_close(gaussian_quantiles(n, dtype=torch.float64), ndtri, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_quantiles(1)


@pytest.mark.parametrize("act", PROXY_ACTS)
@pytest.mark.parametrize("n", [200, 17])
def test_values_match_python_reference(act: str, n: int) -> None:
    params = _params(5)
    mean, var = proxy_stats(*params, act=act, num_quantiles=n)
    want_mean, want_var = _ref([p.detach() for p in params], act, n)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, want_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", PROXY_ACTS)
def test_gradients_match_finite_differences_of_python_reference(act: str) -> None:
    n = 40
    params = _params(3, seed=1)
    gm = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    gv = torch.tensor([-0.4, 0.9, 1.5], dtype=torch.float64)
    mean, var = proxy_stats(*params, act=act, num_quantiles=n)
    grads = torch.autograd.grad((gm * mean).sum() + (gv * var).sum(), params)
    h = 1e-6
    base = [[float(v) for v in p.detach()] for p in params]
    for k in range(4):
        for c in range(3):
            vals = []
            for sign in (1.0, -1.0):
                row = [base[j][c] for j in range(4)]
                row[k] += sign * h
                m, v = _ref_stats(*row, act, n)
                vals.append(float(gm[c]) * m + float(gv[c]) * v)
            want = (vals[0] - vals[1]) / (2 * h)
            assert abs(float(grads[k][c]) - want) <= 1e-6 * (1.0 + abs(want)), (act, k, c)


def test_identity_closed_form() -> None:
    # phi = identity: mean = gamma pb + beta (the quantiles are symmetric), var = (gamma (1 + pg))^2 mean(q^2).
    g, b, pg, pb = (p.detach() for p in _params(4))
    q2 = math.fsum(q * q for q in _quantiles(200)) / 200
    mean, var = proxy_stats(g, b, pg, pb, act="identity")
    torch.testing.assert_close(mean, g * pb + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, (g * (1 + pg)) ** 2 * q2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "gelu", "identity", "silu"])
def test_twice_differentiable(act: str) -> None:
    # Autograd's own numerical check, first and second order (ATen differentiates the ops twice).
    params = _params(3)
    fn = lambda *a: proxy_stats(*a, act=act, num_quantiles=24)  # noqa: E731
    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


def test_float32_stats_for_half_params_and_under_autocast() -> None:
    p64 = [p.detach() for p in _params(6)]
    want_mean, want_var = _ref(p64, "gelu", 200)
    for dtype in (torch.bfloat16, torch.float16):
        ph = [t.to(dtype).requires_grad_() for t in p64]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean, var = proxy_stats(*ph, act="gelu")
        assert mean.dtype == var.dtype == torch.float32
        # Against the reference at the half-precision parameters (the cast is exact to float32).
        want_mean, want_var = _ref([t.detach().double() for t in ph], "gelu", 200)
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-5)
        (mean.sum() + var.sum()).backward()
        assert all(t.grad is not None and t.grad.dtype == dtype for t in ph)


def test_float32_close_to_python_reference() -> None:
    p64 = [p.detach() for p in _params(8, seed=3)]
    mean, var = proxy_stats(*(t.float() for t in p64), act="silu")
    assert mean.dtype == torch.float32
    want_mean, want_var = _ref(p64, "silu", 200)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_culprit() -> None:
    p = [t.detach() for t in _params(3)]
    with pytest.raises(ValueError, match="activations"):
        proxy_stats(*p, act="tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        proxy_stats(*p, act="nope")
    with pytest.raises(ValueError, match="shape"):
        proxy_stats(p[0], p[1][:2], p[2], p[3])
    with pytest.raises(ValueError, match="at least 2"):
        proxy_stats(*p, num_quantiles=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference() -> None:
    p = [t.detach() for t in _params(5)]
    mean, var = proxy_stats(*(t.cuda() for t in p), act="silu")
    want_mean, want_var = _ref(p, "silu", 200)
    torch.testing.assert_close(mean.cpu(), want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var.cpu(), want_var, rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_matches_eager() -> None:
    params = _params(4)
    fn = torch.compile(lambda *a: proxy_stats(*a, act="silu"), fullgraph=True, backend="aot_eager")
    got = fn(*params)
    want = proxy_stats(*params, act="silu")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got[0].sum() + got[1].sum(), params)
    g_want = torch.autograd.grad(want[0].sum() + want[1].sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


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
