"""ScaledStdConv2d: both standardization forms against independent formulas, timm parity, SAME padding,
eps guards, variance preservation and float64 gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ipu_norm.layers.weight_std import WS_DEFAULT_EPS, ScaledStdConv2d, scaled_std_weight


def _reference_weight(w: torch.Tensor, gain: torch.Tensor, form: str, eps: float, gamma: float = 1.0) -> torch.Tensor:
    """Per-output-channel loop, straight from REFERENCE.md's formulas."""
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        row = w[o].flatten()
        n = row.numel()
        mean = row.mean()
        var = ((row - mean) ** 2).sum() / n  # population variance
        if form == "deepmind":
            denom = math.sqrt(max(n * var.item(), eps))
        else:
            denom = math.sqrt(var.item() + eps) * math.sqrt(n)
        out[o] = gamma * gain.flatten()[o] * (w[o] - mean) / denom
    return out


@pytest.mark.parametrize("form", ["deepmind", "timm"])
def test_scaled_std_weight_matches_per_channel_formula(form: str) -> None:
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.3 + 0.1
    gain = torch.rand(6, 1, 1, 1, dtype=torch.float64) + 0.5
    got = scaled_std_weight(w, gain, form=form, gamma=1.7)
    ref = _reference_weight(w, gain, form, WS_DEFAULT_EPS[form], gamma=1.7)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_deepmind_form_rows_have_zero_mean_and_unit_norm() -> None:
    # With N*var >> eps: sum_j W_hat_j = 0 and sum_j W_hat_j^2 = gain^2 (N*var normalisation).
    conv = ScaledStdConv2d(16, 8, 3, form="deepmind").double()
    with torch.no_grad():
        conv.gain.copy_(torch.linspace(0.5, 2.0, 8).view(8, 1, 1, 1))
    w = conv.standardized_weight().reshape(8, -1)
    torch.testing.assert_close(w.sum(1), torch.zeros(8, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(w.square().sum(1), conv.gain.flatten() ** 2, rtol=1e-6, atol=0)


def test_eps_guards_constant_and_tiny_weights() -> None:
    # A constant row has var 0: DeepMind's max(N var, eps) and timm's var + eps keep it finite (all zeros).
    w = torch.ones(2, 3, 3, 3)
    for form in ("deepmind", "timm"):
        out = scaled_std_weight(w, torch.ones(2, 1, 1, 1), form=form)
        assert torch.isfinite(out).all() and out.abs().max() == 0
    # Tiny variance: N*var < 1e-4, so DeepMind's form divides by sqrt(eps), not by sqrt(N*var).
    w = torch.randn(1, 27, dtype=torch.float64) * 1e-4
    n_var = 27 * w.var(unbiased=False)
    assert n_var < 1e-4
    out = scaled_std_weight(w, None, form="deepmind")
    torch.testing.assert_close(out, (w - w.mean()) / math.sqrt(1e-4))


def test_forms_differ_by_the_eps_term() -> None:
    # The point of supporting both: timm's eps (1e-5 per weight, i.e. N*1e-5 on N*var) changes W by ~N*eps/2.
    w = torch.randn(8, 1536, 1, 1) / math.sqrt(1536)
    a = scaled_std_weight(w, None, form="deepmind")
    b = scaled_std_weight(w, None, form="timm")
    ratio = (a / b).mean().item()
    n_var = (1536 * w.reshape(8, -1).var(1, unbiased=False)).mean().item()
    assert ratio == pytest.approx(math.sqrt(1 + 1536e-5 / n_var), rel=2e-3)
    assert ratio > 1.005


@pytest.mark.parametrize("stride,size", [(1, 9), (2, 8), (2, 9)])
def test_timm_form_matches_timm_layers(stride: int, size: int) -> None:
    timm_std = pytest.importorskip("timm.layers.std_conv")
    gamma = 1.7139588594436646
    ours = ScaledStdConv2d(8, 6, 3, stride=stride, padding="same", groups=2, form="timm", gamma=gamma)
    ref = timm_std.ScaledStdConv2dSame(8, 6, 3, stride=stride, groups=2, gamma=gamma, eps=1e-5)
    ref_sym = timm_std.ScaledStdConv2d(8, 6, 3, stride=stride, groups=2, gamma=gamma, eps=1e-5)
    ours_sym = ScaledStdConv2d(8, 6, 3, stride=stride, groups=2, form="timm", gamma=gamma)
    with torch.no_grad():
        for m in (ref, ref_sym, ours_sym):
            m.load_state_dict(ours.state_dict())
        ours.gain.uniform_(0.5, 1.5)
        ours.bias.normal_()
        for m in (ref, ref_sym, ours_sym):
            m.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, size, size)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_sym(x), ref_sym(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [8, 9])
def test_tf_same_padding(size: int) -> None:
    conv = ScaledStdConv2d(3, 4, 3, stride=2, padding="same")
    x = torch.randn(1, 3, size, size)
    y = conv(x)
    assert y.shape[-1] == math.ceil(size / 2)
    # TF SAME: total pad = max((ceil(n/s)-1)*s + k - n, 0), the extra pixel goes to the bottom/right.
    total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
    xp = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
    ref = F.conv2d(xp, conv.standardized_weight(), conv.bias, stride=2)
    torch.testing.assert_close(y, ref)
    # Stride 1 with an odd kernel is symmetric and static (no runtime pad).
    assert not ScaledStdConv2d(3, 4, 3, padding="same").tf_same


def test_unit_variance_is_preserved() -> None:
    # sum_j W_hat_j^2 = 1 per output channel, so i.i.d. unit-variance inputs give unit-variance outputs.
    conv = ScaledStdConv2d(256, 128, 1)
    x = torch.randn(32, 256, 8, 8)
    with torch.no_grad():
        y = conv(x)
    assert y.var().item() == pytest.approx(1.0, abs=0.05)


def test_parameters_and_init() -> None:
    conv = ScaledStdConv2d(4, 6, 3, gain_init=0.0)
    assert conv.gain.shape == (6, 1, 1, 1) and (conv.gain == 0).all()
    assert (conv.bias == 0).all() and conv.weight.std() > 0
    assert set(conv.state_dict()) == {"weight", "bias", "gain"}
    with torch.device("meta"):
        big = ScaledStdConv2d(1536, 3072, 1)
    assert big.weight.is_meta and big.gain.shape == (3072, 1, 1, 1)
    with pytest.raises(ValueError):
        ScaledStdConv2d(4, 6, 3, form="bogus")
    with pytest.raises(ValueError):
        ScaledStdConv2d(4, 6, 3, padding="valid-ish")


@pytest.mark.parametrize("form", ["deepmind", "timm"])
def test_gradcheck_float64(form: str) -> None:
    # Small on purpose (gradcheck is one forward per input element): grouped, strided, asymmetric SAME pad.
    conv = ScaledStdConv2d(4, 2, 3, stride=2, padding="same", groups=2, form=form, gamma=1.3).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_(True)
    g = (torch.rand(2, 1, 1, 1, dtype=torch.float64) + 0.5).requires_grad_(True)

    def fn(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(conv, {"weight": w, "gain": g, "bias": conv.bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, g), eps=1e-6, atol=1e-6)


def _fused_and_plain(w: torch.Tensor, gain: torch.Tensor | None, form: str, gamma: float, eps: float | None = None):
    """(output, grads) of the fused autograd path and of autograd over the plain ops, same upstream gradient."""
    from ipu_norm.layers.weight_std import _check_form, _scaled_std_weight_ops

    upstream = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(1))
    inputs = (w,) if gain is None else (w, gain)
    fused = scaled_std_weight(w, gain, form=form, gamma=gamma, eps=eps)
    plain = _scaled_std_weight_ops(w.reshape(w.shape[0], -1), gain, form, _check_form(form, eps), gamma).reshape_as(w)
    return (fused, torch.autograd.grad(fused, inputs, upstream)), (plain, torch.autograd.grad(plain, inputs, upstream))


@pytest.mark.parametrize("form", ["deepmind", "timm"])
@pytest.mark.parametrize("with_gain", [True, False])
def test_fused_path_matches_plain_autograd_float64(form: str, with_gain: bool, threads: int) -> None:
    # Rows 0-1 are constant and row 2 tiny (N var < eps: DeepMind's clamp is active there), row 3 has a large
    # mean, the rest are ordinary; one gain is 0 (timm NF-ResNet's zero-initialised last gain).
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=g) * 0.3
    w[0] = 0.0
    w[1] = 0.7
    w[2] = w[2] * 1e-4
    w[3] = w[3] + 5.0
    w.requires_grad_(True)
    gain = None
    if with_gain:
        gain = (torch.rand(8, 1, 1, 1, dtype=torch.float64, generator=g) + 0.5)
        gain[5] = 0.0
        gain.requires_grad_(True)
    (out_f, grads_f), (out_p, grads_p) = _fused_and_plain(w, gain, form, gamma=1.7)
    torch.testing.assert_close(out_f, out_p, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_f, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_path_float32(channels_last: bool, threads: int) -> None:  # noqa: ARG001
    # fp32, also a channels_last (non-contiguous: always the ATen path) weight, and rows longer than the kernel's
    # summation block (512): the plain ops' values to fp32 rounding.
    for shape in [(16, 8, 3, 3), (8, 160, 3, 3)]:
        w = torch.randn(shape)
        if channels_last:
            w = w.to(memory_format=torch.channels_last)
        w.requires_grad_(True)
        gain = (torch.rand(shape[0], 1, 1, 1) + 0.5).requires_grad_(True)
        (out_f, grads_f), (out_p, grads_p) = _fused_and_plain(w, gain, "deepmind", gamma=1.0)
        torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_f, grads_p):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_path_saves_no_weight_sized_tensor(threads: int) -> None:  # noqa: ARG001
    # The fused path keeps only the weight itself (a parameter) and per-row vectors for backward; autograd over
    # the plain ops saves the centred weight too.
    w = torch.randn(64, 32, 3, 3, requires_grad=True)
    gain = torch.ones(64, 1, 1, 1, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scaled_std_weight(w, gain).sum().backward()
    big = [t for t in saved if t.numel() >= w.numel()]
    assert len(big) == 1 and big[0].data_ptr() == w.data_ptr()


def test_plain_ops_under_poptorch_tracing_and_for_bf16() -> None:
    # PopART differentiates the traced forward itself: no custom autograd function there (the path taken while
    # PopTorch traces, or inside plain_ops()); bf16 weights also take the plain ops. Both give the fused path's values.
    from ipu_norm.ops.proxy_stats import plain_ops

    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    fused = scaled_std_weight(w, None)
    assert type(fused.grad_fn).__name__ == "_ScaledStdWeightFnBackward"
    with plain_ops():
        traced = scaled_std_weight(w, None)
    assert type(traced.grad_fn).__name__ != "_ScaledStdWeightFnBackward"
    torch.testing.assert_close(traced, fused)
    half = scaled_std_weight(w.detach().bfloat16(), None)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), fused.detach(), rtol=2e-2, atol=2e-2)
