"""Tests of the existing norm layers (norm_act.py, proxy_norm.py, ops/proxy_stats.py, optim/param_groups.py).

References are independent of the code under test: quantiles from Python's statistics.NormalDist (not
torch.erfinv), closed-form Gaussian moments of ReLU, GroupNorm/LayerNorm written out by hand.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ipu_norm.layers.norm_act import (
    ActOnly,
    BatchNormAct2d,
    GroupNormAct,
    create_norm_act,
    parse_norm,
)
from ipu_norm.layers.proxy_norm import PROXY_PARAM_NAMES, ProxyNormAct
from ipu_norm.ops.proxy_stats import gaussian_quantiles, proxy_stats
from ipu_norm.optim.param_groups import iter_decay_flags, param_groups_weight_decay


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:  # noqa: ARG001
    """Small tensors: one thread is faster and steadier on a shared machine (conftest's one_thread)."""


_N = NormalDist()
ACTS = ["relu", "silu", "gelu"]
F64 = torch.float64


# --------------------------------------------------------------------------------------- references
def _quantiles_py(n: int = 200) -> list[float]:
    """q_i = Phi^-1((i + 0.5) / n), from Python's statistics module (independent of torch.erfinv)."""
    return [_N.inv_cdf((i + 0.5) / n) for i in range(n)]


def _act_py(name: str, v: float) -> float:
    if name == "relu":
        return max(v, 0.0)
    if name == "silu":
        return v / (1.0 + math.exp(-v))
    if name == "gelu":
        return v * _N.cdf(v)
    raise ValueError(name)


def _stats_py(act: str, g: float, b: float, pg: float, pb: float, n: int = 200) -> tuple[float, float]:
    """Float64 direct computation of the proxy mean and (population) variance."""
    z = [_act_py(act, g * ((1.0 + pg) * q + pb) + b) for q in _quantiles_py(n)]
    mean = math.fsum(z) / n
    return mean, math.fsum((v - mean) ** 2 for v in z) / n


def _relu_moments(a: float, b: float) -> tuple[float, float]:
    """E and Var of relu(a q + b), q ~ N(0, 1), closed form (a != 0; q is symmetric so the sign of a is moot)."""
    a = abs(a)
    z = b / a
    m1 = b * _N.cdf(z) + a * _N.pdf(z)
    m2 = (a * a + b * b) * _N.cdf(z) + a * b * _N.pdf(z)
    return m1, m2 - m1 * m1


def _wasserstein_quantile_grid(n: int = 200) -> tuple[float, float]:
    """W1 and W2 distances between N(0, 1) and the uniform distribution on the n midpoint quantiles.

    Exact, from truncated-normal moments: the quantile coupling maps the cell [Phi^-1(i/n), Phi^-1((i+1)/n)]
    to q_i, so W_p^p = sum_i E[|X - q_i|^p ; X in cell i].
    """
    def cdf(x: float) -> float:
        return 0.0 if x == -math.inf else 1.0 if x == math.inf else _N.cdf(x)

    def pdf(x: float) -> float:
        return 0.0 if math.isinf(x) else _N.pdf(x)

    def xpdf(x: float) -> float:
        return 0.0 if math.isinf(x) else x * _N.pdf(x)

    edges = [-math.inf] + [_N.inv_cdf(i / n) for i in range(1, n)] + [math.inf]
    w1 = w2sq = 0.0
    for i, c in enumerate(_quantiles_py(n)):
        lo, hi = edges[i], edges[i + 1]
        m0, m1 = cdf(hi) - cdf(lo), pdf(lo) - pdf(hi)
        m2 = m0 + xpdf(lo) - xpdf(hi)
        w2sq += m2 - 2 * c * m1 + c * c * m0
        w1 += c * (cdf(c) - cdf(lo)) - (pdf(lo) - pdf(c)) + (pdf(c) - pdf(hi)) - c * (cdf(hi) - cdf(c))
    return w1, math.sqrt(w2sq)


def _gn_reference(x: torch.Tensor, groups: int, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    n, c, h, wd = x.shape
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    xhat = ((xg - mean) / torch.sqrt(var + eps)).reshape(n, c, h, wd)
    return xhat * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _randomise(module: nn.Module, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "weight":
                p.copy_((0.5 + torch.rand(p.shape, generator=g, dtype=F64)).to(dtype))
            else:
                p.copy_((0.3 * torch.randn(p.shape, generator=g, dtype=F64)).to(dtype))


# ----------------------------------------------------------------------------------- GN / LN / BN
def test_gn_matches_hand_written_reference() -> None:
    m = create_norm_act("gn", 8, act=None)
    _randomise(m)
    x = torch.randn(3, 8, 5, 4) * 2 + 1
    assert m.num_groups == 4 and m.eps == 1e-3
    torch.testing.assert_close(m(x), _gn_reference(x, 4, m.weight, m.bias, 1e-3), rtol=1e-5, atol=1e-5)
    m_relu = create_norm_act("gn", 8, act="relu", groups=2)
    _randomise(m_relu)
    torch.testing.assert_close(m_relu(x), F.relu(_gn_reference(x, 2, m_relu.weight, m_relu.bias, 1e-3)))


def test_ln_is_gn_with_one_group_and_layer_norm_over_chw() -> None:
    x = torch.randn(2, 6, 4, 4) * 3 - 2
    ln = create_norm_act("ln", 6, act="silu")
    gn1 = create_norm_act("gn", 6, act="silu", groups=1)
    _randomise(ln)
    gn1.load_state_dict(ln.state_dict())
    assert ln.num_groups == 1
    torch.testing.assert_close(ln(x), gn1(x))
    # LayerNorm for convnets: normalise over (C, H, W), then a per-channel (not per-element) affine.
    ref = F.layer_norm(x, x.shape[1:], eps=ln.eps) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), F.silu(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["gn", "ln"])
def test_gn_invariant_to_per_example_shift_and_scale(norm: str) -> None:
    # eps -> 0 in float64 makes the invariance exact up to rounding; each example gets its own shift and
    # positive scale (and GN even its own per-group shift).
    m = create_norm_act(norm, 8, act="relu", eps=1e-12).double()
    _randomise(m, F64)
    x = torch.randn(4, 8, 3, 3, dtype=F64)
    a = torch.tensor([0.1, 1.0, 7.0, 300.0], dtype=F64).view(4, 1, 1, 1)
    b = torch.tensor([-5.0, 0.0, 2.0, 1e3], dtype=F64).view(4, 1, 1, 1)
    torch.testing.assert_close(m(a * x + b), m(x), rtol=1e-9, atol=1e-9)
    if norm == "gn":
        group_shift = torch.randn(4, m.num_groups, dtype=F64).repeat_interleave(8 // m.num_groups, 1)
        torch.testing.assert_close(m(x + group_shift[..., None, None]), m(x), rtol=1e-9, atol=1e-9)
    # ... but not to a per-channel shift inside a group (GN is not InstanceNorm).
    chan_shift = torch.zeros(1, 8, 1, 1, dtype=F64)
    chan_shift[0, 0] = 3.0
    assert (m(x + chan_shift) - m(x)).abs().max() > 1e-3


def test_gn_eps_matters_when_not_tiny() -> None:
    # With the default eps=1e-3 the invariance is only approximate for small-variance inputs: a sanity
    # check that eps is really inside the sqrt (a missing eps would make these equal).
    m = create_norm_act("gn", 4, act=None, groups=1).double()
    x = torch.randn(1, 4, 3, 3, dtype=F64)
    assert (m(1e-2 * x) - m(x)).abs().max() > 1e-2


def test_batchnorm_act_is_batchnorm2d() -> None:
    m = create_norm_act("bn", 5, act="relu")
    assert isinstance(m, BatchNormAct2d) and isinstance(m, nn.BatchNorm2d) and m.eps == 1e-5
    ref = nn.BatchNorm2d(5)
    assert m.state_dict().keys() == ref.state_dict().keys()
    _randomise(m)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(m.train()(x), F.relu(ref.train()(x)))
    torch.testing.assert_close(m.running_var, ref.running_var)
    torch.testing.assert_close(m.eval()(x), F.relu(ref.eval()(x)))


def test_bn_inplace_act_does_not_change_result() -> None:
    x = torch.randn(2, 3, 4, 4)
    a, b = create_norm_act("bn", 3, act="silu", inplace=True), create_norm_act("bn", 3, act="silu")
    torch.testing.assert_close(a(x), b(x))


# ------------------------------------------------------------------------------ PN statistics
def test_quantiles_match_python_statistics() -> None:
    q = gaussian_quantiles(200, dtype=F64)
    ref = torch.tensor(_quantiles_py(200), dtype=F64)
    torch.testing.assert_close(q, ref, rtol=0, atol=1e-12)
    assert gaussian_quantiles(200).dtype == torch.float32
    with pytest.raises(ValueError):
        gaussian_quantiles(1)


def test_quantiles_are_not_aliased_to_the_cache() -> None:
    # gaussian_quantiles is cached; an in-place change by one caller must not leak into the next call.
    q = gaussian_quantiles(200, dtype=F64)
    q.mul_(2.0)
    try:
        torch.testing.assert_close(gaussian_quantiles(200, dtype=F64), torch.tensor(_quantiles_py(200), dtype=F64))
    finally:
        q.div_(2.0)  # exact; undoes the damage if q was the cached tensor, so other tests are unaffected


@pytest.mark.parametrize("act", ACTS)
def test_proxy_stats_equal_float64_direct_computation(act: str) -> None:
    g = torch.Generator().manual_seed(3)
    c = 6
    params = [0.5 + torch.rand(c, generator=g, dtype=F64) * torch.tensor([1, -1] * 3, dtype=F64)]  # gamma < 0 too
    params += [0.7 * torch.randn(c, generator=g, dtype=F64) for _ in range(3)]
    mean, var = proxy_stats(*params, act=act)
    assert mean.dtype == var.dtype == F64
    for i in range(c):
        m_ref, v_ref = _stats_py(act, *(float(p[i]) for p in params))
        assert abs(mean[i].item() - m_ref) <= 1e-12 * max(1.0, abs(m_ref))
        assert abs(var[i].item() - v_ref) <= 1e-12 * max(1.0, v_ref)
    # The fp32 path agrees to fp32 rounding.
    mean32, var32 = proxy_stats(*(p.float() for p in params), act=act)
    assert mean32.dtype == torch.float32
    torch.testing.assert_close(mean32.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var32.double(), var, rtol=1e-5, atol=1e-6)


_A_B_GRID = [(a, b) for a in (0.1, 0.5, 1.0, 2.0, 5.0, -1.5) for b in (-3.0, -1.0, -0.3, 0.0, 0.4, 1.0, 3.0)]


def test_relu_proxy_stats_vs_continuous_closed_form() -> None:
    """Finite 200-quantile stats vs E/Var of relu(a q + b), q ~ N(0, 1), with a derived tolerance.

    The midpoint quantiles q_i are the quantile coupling of N(0, 1) onto 200 atoms. relu(a . + b) is
    |a|-Lipschitz, so |mean~ - E| <= |a| W1 and (std being a seminorm) |std~ - Std| <= |a| W2, where W1, W2
    are the Wasserstein distances of that coupling, computed exactly from truncated-normal moments
    (W1 = 0.0085, W2 = 0.0327 for n = 200). The observed errors are ~15x smaller (the tails cancel), so the
    bound is safe and still fails on e.g. a wrong sign of beta or a missing (1 + gamma~).
    """
    w1, w2 = _wasserstein_quantile_grid(200)
    assert 0.008 < w1 < 0.009 and 0.03 < w2 < 0.035
    # Parametrise a = gamma * (1 + gamma~), b = gamma * beta~ + beta with all four parameters non-trivial.
    gamma = torch.tensor([a for a, _ in _A_B_GRID], dtype=F64) / 1.25
    proxy_gamma = torch.full_like(gamma, 0.25)
    proxy_beta = torch.full_like(gamma, 0.2)
    beta = torch.tensor([b for _, b in _A_B_GRID], dtype=F64) - gamma * proxy_beta
    mean, var = proxy_stats(gamma, beta, proxy_gamma, proxy_beta, "relu")
    for i, (a, b) in enumerate(_A_B_GRID):
        m_ref, v_ref = _relu_moments(a, b)
        assert abs(mean[i].item() - m_ref) <= abs(a) * w1 + 1e-12, (a, b)
        v_ref = max(v_ref, 0.0)  # the closed form cancels to ~ -1e-197 deep in the dead zone
        assert abs(math.sqrt(var[i].item()) - math.sqrt(v_ref)) <= abs(a) * w2 + 1e-12, (a, b)
        # Tighter empirical envelope measured for this grid (documents the size of the finite-n effect):
        assert abs(mean[i].item() - m_ref) <= 6e-4 * abs(a)
        assert abs(var[i].item() - v_ref) <= 7e-3 * a * a


def test_relu_proxy_stats_in_linear_regime_exact() -> None:
    # If every proxy sample is positive, relu is the identity: mean~ = b exactly (the quantiles are
    # symmetric) and var~ = a^2 mean(q_i^2), which is slightly below a^2 (0.99360 for n = 200).
    q = _quantiles_py(200)
    m2 = math.fsum(v * v for v in q) / 200
    assert 0.99 < m2 < 0.995
    a, b = 0.7, 0.7 * 2.9  # a * q_min + b > 0
    mean, var = proxy_stats(*(torch.tensor([v], dtype=F64) for v in (a, b, 0.0, 0.0)), act="relu")
    assert mean.item() == pytest.approx(b, abs=1e-14)
    assert var.item() == pytest.approx(a * a * m2, rel=1e-13)


def test_proxy_stats_under_autocast_are_fp32() -> None:
    c = 8
    params = [torch.rand(c) + 0.5] + [0.3 * torch.randn(c) for _ in range(3)]
    ref_mean, ref_var = proxy_stats(*params, act="silu")
    bf = [p.bfloat16() for p in params]
    ref_bf_mean, ref_bf_var = proxy_stats(*(p.float() for p in bf), act="silu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, var = proxy_stats(*params, act="silu")
        mean_bf, var_bf = proxy_stats(*bf, act="silu")
        layer = ProxyNormAct(c, "gelu")
        scale, shift = layer.proxy_affine()
    assert mean.dtype == var.dtype == mean_bf.dtype == scale.dtype == shift.dtype == torch.float32
    # fp32 params: identical to the computation without autocast; bf16 params: identical to upcasting them.
    assert torch.equal(mean, ref_mean) and torch.equal(var, ref_var)
    assert torch.equal(mean_bf, ref_bf_mean) and torch.equal(var_bf, ref_bf_var)


def test_gn_pn_forward_under_autocast_bf16() -> None:
    m = create_norm_act("ln+pn", 8, act="relu")
    _randomise(m)
    x = torch.randn(2, 8, 4, 4)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16())
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------ PN layers
def test_proxy_params_init_zero_and_gain_one() -> None:
    pn = ProxyNormAct(5, "relu")
    assert torch.all(pn.weight == 1) and torch.all(pn.bias == 0)
    gn = create_norm_act("gn+pn", 8, act="silu")
    ln = create_norm_act("ln+pn", 8, act="gelu")
    for layer in (pn, gn, ln):
        for name in PROXY_PARAM_NAMES:
            p = getattr(layer, name)
            assert isinstance(p, nn.Parameter) and p.requires_grad and torch.all(p == 0)
    assert isinstance(gn, GroupNormAct) and gn.proxy and gn.num_groups == 4 and gn.proxy_eps == 0.03
    assert isinstance(ln, GroupNormAct) and ln.proxy and ln.num_groups == 1


@pytest.mark.parametrize("act", ACTS)
def test_pn_formula(act: str) -> None:
    """out = (phi(gamma x + beta) - mu~) / sqrt(var~ + 0.03), with stats from the float64 direct computation."""
    c = 3
    pn = ProxyNormAct(c, act).double()
    _randomise(pn, F64, seed=4)
    x = torch.randn(2, c, 3, 3, dtype=F64)
    z = F.gelu if act == "gelu" else F.silu if act == "silu" else F.relu
    pre = x * pn.weight.view(1, -1, 1, 1) + pn.bias.view(1, -1, 1, 1)
    names = ("weight", "bias", "proxy_weight", "proxy_bias")
    stats = [_stats_py(act, *(float(getattr(pn, n)[i].detach()) for n in names)) for i in range(c)]
    mu = torch.tensor([s[0] for s in stats], dtype=F64).view(1, -1, 1, 1)
    var = torch.tensor([s[1] for s in stats], dtype=F64).view(1, -1, 1, 1)
    torch.testing.assert_close(pn(x), (z(pre) - mu) / torch.sqrt(var + 0.03), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("groups", [1, 2])
def test_fused_gn_pn_equals_gn_then_proxy_norm_act(act: str, groups: int) -> None:
    fused = GroupNormAct(6, groups, act, proxy=True)
    _randomise(fused)
    pn = ProxyNormAct(6, act)
    pn.load_state_dict({k: v for k, v in fused.state_dict().items()})
    x = torch.randn(2, 6, 4, 4) * 2 + 0.5
    ref = pn(F.group_norm(x, groups, eps=fused.eps))
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)


def test_pn_normalises_a_gaussian_input() -> None:
    # When the pre-activation really is N(beta~-shifted...) the proxy, PN's output has ~zero mean and
    # variance var/(var + eps): the whole point of the method.
    pn = ProxyNormAct(2, "relu")
    with torch.no_grad():
        pn.weight.copy_(torch.tensor([1.5, 0.5]))
        pn.bias.copy_(torch.tensor([0.5, -0.2]))
    x = torch.randn(20000, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    out = pn(x)
    _, var = proxy_stats(pn.weight, pn.bias, pn.proxy_weight, pn.proxy_bias, "relu")
    assert out.mean((0, 2, 3)).abs().max() < 0.03
    torch.testing.assert_close(out.var((0, 2, 3)), var / (var + 0.03), rtol=0.05, atol=0.0)


@pytest.mark.parametrize("layer_fn", [lambda: ProxyNormAct(4, "silu"), lambda: create_norm_act("gn+pn", 4, "relu"),
                                      lambda: create_norm_act("ln+pn", 4, "gelu")])
def test_pn_output_independent_of_other_examples(layer_fn) -> None:  # noqa: ANN001
    layer = layer_fn()
    _randomise(layer)
    x = torch.randn(5, 4, 3, 3)
    other = x.clone()
    other[1:] = torch.randn(4, 4, 3, 3) * 10 - 3
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x)[:1], layer(other)[:1], rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x[:1]), layer(x)[:1], rtol=1e-6, atol=1e-6)


def _gradcheck_module(module: nn.Module, x: torch.Tensor) -> None:
    names = ["weight", "bias", "proxy_weight", "proxy_bias"]
    params = tuple(getattr(module, n).detach().clone().requires_grad_(True) for n in names)

    def fn(inp: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(module, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True),) + params, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_proxy_norm_act(act: str) -> None:
    m = ProxyNormAct(3, act).double()
    _randomise(m, F64, seed=5)
    _gradcheck_module(m, torch.randn(2, 3, 2, 2, dtype=F64))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_group_norm_act_proxy(act: str, groups: int) -> None:
    m = GroupNormAct(4, groups, act, proxy=True).double()
    _randomise(m, F64, seed=6)
    _gradcheck_module(m, torch.randn(2, 4, 2, 3, dtype=F64))


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_proxy_stats(act: str) -> None:
    ps = [torch.rand(3, dtype=F64) + 0.5] + [0.4 * torch.randn(3, dtype=F64) for _ in range(3)]
    ps = [p.requires_grad_(True) for p in ps]
    assert torch.autograd.gradcheck(lambda *a: proxy_stats(*a, act=act), ps, eps=1e-6, atol=1e-7)


def test_pn_gradients_reach_proxy_params() -> None:
    m = create_norm_act("ln+pn", 4, "relu")
    _randomise(m)
    m(torch.randn(2, 4, 3, 3)).pow(3).sum().backward()
    for name in ("weight", "bias", *PROXY_PARAM_NAMES):
        assert getattr(m, name).grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------ factory
@pytest.mark.parametrize("bad", ["batch", "bn+pn", "gn+ws", "pn", "", "gn+pn+pn", "group", "bn-pn"])
def test_create_norm_act_rejects_bad_norm_strings(bad) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="unknown norm"):
        create_norm_act(bad, 8)


def test_create_norm_act_other_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        create_norm_act("gn", 6, groups=4)
    with pytest.raises(ValueError, match="activation"):
        create_norm_act("gn", 8, act="swishy")
    with pytest.raises(ValueError, match="Proxy Norm"):
        create_norm_act("ln+pn", 8, act="tanh")  # no PN kernel for tanh
    with pytest.raises(ValueError, match="zero_init"):
        create_norm_act("none", 8, zero_init=True)


def test_create_norm_act_variants() -> None:
    assert parse_norm(" LN + PN ") == parse_norm("ln+pn") and str(parse_norm("gn+pn")) == "gn+pn"
    assert parse_norm("bn").batch_dependent and not parse_norm("ln+pn").batch_dependent
    none = create_norm_act("none", 4, act="relu")
    assert isinstance(none, ActOnly) and not list(none.parameters())
    # PN without an activation falls back to the base norm with a plain affine.
    plain = create_norm_act("gn+pn", 8, act=None)
    assert isinstance(plain, GroupNormAct) and not plain.proxy and not hasattr(plain, "proxy_weight")
    z = create_norm_act("ln+pn", 8, act=None, zero_init=True)
    assert torch.all(z.weight == 0) and torch.all(z.bias == 0)
    assert create_norm_act("gn", 8, eps=1e-5).eps == 1e-5 and create_norm_act("ln", 8).eps == 1e-3
    pn = create_norm_act("gn+pn", 8, act="swish", proxy_eps=0.1)
    assert pn.act_name == "silu" and pn.proxy_eps == 0.1


# ------------------------------------------------------------------------------ weight decay groups
def test_param_groups_weight_decay_pn() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=True),
        create_norm_act("ln+pn", 8, "relu"),
        nn.Conv2d(8, 8, 1, bias=False),
        create_norm_act("gn", 8, "relu"),
        ProxyNormAct(8, "silu"),
        create_norm_act("bn", 8, None),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    flags = {name: decayed for name, _, decayed in iter_decay_flags(model)}
    expected_decay = {"0.weight", "1.proxy_weight", "1.proxy_bias", "2.weight", "4.proxy_weight", "4.proxy_bias",
                      "7.weight"}
    assert {n for n, d in flags.items() if d} == expected_decay
    assert {n for n, d in flags.items() if not d} == {"0.bias", "1.weight", "1.bias", "3.weight", "3.bias",
                                                      "4.weight", "4.bias", "5.weight", "5.bias", "7.bias"}
    groups = param_groups_weight_decay(model, 5e-5)
    assert groups[0]["weight_decay"] == 5e-5 and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == 7 and len(groups[1]["params"]) == 10
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_param_groups_shared_and_frozen_params() -> None:
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, lin, ProxyNormAct(3))
    model[2].proxy_bias.requires_grad_(False)
    names = [n for n, _, _ in iter_decay_flags(model)]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "2.proxy_weight"]
