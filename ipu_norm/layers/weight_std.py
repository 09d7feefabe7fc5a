"""Scaled Weight Standardization (Brock et al. 2021, arXiv 2101.08692) for normalizer-free networks.

Each output channel's weights W_o (fan-in N = in/groups * kh * kw values) are standardized on every forward:

- ``form="deepmind"`` (DeepMind's nfnets ``WSConv2D``, REFERENCE.md):
  ``W_hat = gamma * gain * (W - mean) / sqrt(max(N * var, eps))`` with eps = 1e-4.
- ``form="timm"`` (timm's ``ScaledStdConv2d`` / ``ScaledStdConv2dSame``):
  ``W_hat = gamma * gain / sqrt(N) * (W - mean) / sqrt(var + eps)`` with eps = 1e-5.

``var`` is the biased (population) variance over the fan-in in both forms. The two differ by the eps term
only, but not negligibly: with the usual N(0, 1/N) init N * var ~ 1 and timm's term N * eps is 0.015 for
N = 1536, a ~0.8% change of every weight, far above a 1e-4 logit tolerance after 20+ layers.

Which model uses which (see ipu_norm/models/nfnet.py):

- ``nfnet_f0`` .. ``nfnet_f7`` default to ``"deepmind"``: they follow DeepMind's reference architecture.
- ``nf_resnet50`` defaults to ``"timm"``: its reference implementation is timm's ``nf_resnet50``.
- ``ipu_norm.models.import_timm.load_timm_weights`` switches every layer to ``"timm"`` with the source
  layer's eps, because timm's ``dm_nfnet_f*`` (DeepMind-weight compatible) also use timm's form with
  eps = 1e-5, not DeepMind's; that is what makes the imported logits identical to timm's.

``gamma`` is a fixed (non-learnable) multiplier: timm's NF-ResNets fold the activation's NF gamma into the
following conv this way instead of scaling the activation output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ipu_norm import compat
from ipu_norm.ops.agc_micro import MicroBatchAGC
from ipu_norm.ops.proxy_stats import uses_plain_ops

WS_FORMS = ("deepmind", "timm")
# Default eps of each form: DeepMind's WSConv2D and timm's NfCfg.std_conv_eps.
WS_DEFAULT_EPS = {"deepmind": 1e-4, "timm": 1e-5}


def _check_form(form: str, eps: float | None) -> float:
    """Validate `form` and return its eps (eps=None takes the form's default)."""
    if form not in WS_FORMS:
        raise ValueError(f"unknown weight-standardization form {form!r}; expected one of {WS_FORMS}")
    return WS_DEFAULT_EPS[form] if eps is None else float(eps)


def _row_stats(w: torch.Tensor, form: str, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor | None]:
    """(mean, centred rows, r, clamped) of a (out, N) weight, per row (keepdim).

    r is the factor with W_hat = gamma * gain * centred * r; clamped (DeepMind's form only, else None) marks
    the rows where max(N var, eps) takes eps.

    Two-pass mean/variance (centre first: exact in fp32 for small-variance weights, unlike E[w^2] - mean^2).
    `torch.var_mean` is not used: its CPU kernel (Welford) measured ~4x slower than mean + sub + norm together.
    """
    fan_in = w.shape[1]
    mean = w.mean(dim=1, keepdim=True)
    centred = w - mean
    sq = torch.linalg.vector_norm(centred, dim=1, keepdim=True).square()  # N * var (biased var)
    if form == "deepmind":
        # torch.clamp's own gradient flows where sq >= eps: the same boundary convention as `clamped`.
        return mean, centred, torch.rsqrt(torch.clamp(sq, min=eps)), sq < eps
    return mean, centred, torch.rsqrt(sq * (1.0 / fan_in) + eps) * (1.0 / math.sqrt(fan_in)), None


def _scaled_std_weight_ops(w: torch.Tensor, gain: torch.Tensor | None, form: str, eps: float,
                           gamma: float) -> torch.Tensor:
    """scaled_std_weight on (out, N) rows with plain differentiable ops (autograd differentiates them).

    The path under PopTorch tracing (PopART differentiates the traced forward itself and lowers only these
    plain ops) and for half-precision weights; also the reference the fused path is tested against.
    """
    mean = w.mean(dim=1, keepdim=True)
    centred = w - mean
    var = centred.square().mean(dim=1, keepdim=True)
    fan_in = w.shape[1]
    if form == "deepmind":
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=eps))
    else:
        scale = torch.rsqrt(var + eps) * (1.0 / math.sqrt(fan_in))
    if gamma != 1.0:
        scale = scale * gamma
    if gain is not None:
        scale = scale * gain.reshape(-1, 1)
    return centred * scale


class _ScaledStdWeightFn(torch.autograd.Function):
    """W_hat = gamma * gain * (W - mean) * r per row, with an analytic backward in one fused ATen kernel.

    Autograd over the plain ops (`_scaled_std_weight_ops`) runs ~15 elementwise passes over every weight per
    step (forward + backward) and saves the centred weight; here the forward is mean, sub, norm and one
    in-place scale, and only the weight itself (a parameter, no extra memory) and per-row vectors are saved.

    Backward: with var_eff = 1 / (N r^2) (DeepMind: max(N var, eps) / N; timm: var + eps), W_hat is a batch
    norm of the (1, out, N) weight with batch statistics (mean, var_eff) and affine weight c = gamma * gain /
    sqrt(N), so ATen's `native_batch_norm_backward` (training mode, given the saved statistics) yields both
    dL/dW and sum(dL/dW_hat * x_hat) = dL/dc in one fused pass, as timm's `F.batch_norm` form gets them.
    That is the exact gradient wherever var_eff depends on W (timm always; DeepMind when N var >= eps). Rows
    where DeepMind's clamp is active (N var < eps, e.g. constant weights) have a constant denominator, so their
    gradient lacks batch norm's projection term c r_bn x_hat mean(g x_hat); it is added back for those rows.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, gain: torch.Tensor | None, form: str, eps: float,  # noqa: ANN001
                gamma: float) -> torch.Tensor:
        out = weight.shape[0]
        ctx.has_gain = gain is not None
        ctx.gain_shape = None if gain is None else gain.shape
        w = weight.reshape(out, -1)
        fan_in = w.shape[1]
        mean, centred, r, clamped = _row_stats(w, form, eps)
        # Batch-norm view of the same product: invstd_bn * weight_bn == r * gamma * gain.
        root_n = math.sqrt(fan_in)
        c = gamma / root_n if gain is None else gain.reshape(out, 1) * (gamma / root_n)
        invstd = r * root_n
        y = centred.mul_(invstd * c)  # in place on the fresh centred rows (nothing else holds them)
        c_vec = c.reshape(out) if isinstance(c, torch.Tensor) else torch.full((out,), c, dtype=w.dtype,
                                                                              device=w.device)
        ctx.gamma_over_root_n = gamma / root_n
        ctx.save_for_backward(weight, mean.reshape(out), invstd.reshape(out), c_vec,
                              None if clamped is None else clamped.reshape(out))
        return y.reshape(weight.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        weight, mean, invstd, c, clamped = ctx.saved_tensors
        need_w, need_gain = ctx.needs_input_grad[0], ctx.has_gain and ctx.needs_input_grad[1]
        out = weight.shape[0]
        w = weight.reshape(1, out, -1)
        g = grad_out.reshape(1, out, -1)
        fan_in = w.shape[2]
        # On CPU the host can see for free whether a clamp was active; elsewhere the correction is always
        # applied (zero for unclamped rows) rather than synchronising on every conv.
        fix = clamped is not None and need_w and (not clamped.is_cpu or bool(clamped.any()))
        grad_w, grad_c, _ = torch.ops.aten.native_batch_norm_backward(
            g, w, c, None, None, mean, invstd, True, 0.0, [need_w, need_gain or fix, False])
        if fix:
            coef = torch.where(clamped, c * invstd.square() * grad_c * (1.0 / fan_in), 0.0)
            grad_w.add_((w - mean.view(1, out, 1)) * coef.view(1, out, 1))
        grad_weight = grad_w.reshape(weight.shape) if need_w else None
        grad_gain = (grad_c * ctx.gamma_over_root_n).reshape(ctx.gain_shape) if need_gain else None
        return grad_weight, grad_gain, None, None, None


def scaled_std_weight(
    weight: torch.Tensor,
    gain: torch.Tensor | None = None,
    *,
    form: str = "deepmind",
    eps: float | None = None,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Scaled-standardized copy of a conv weight (out, in/groups, kh, kw), per output channel.

    gain: learnable per-output-channel gain, shape (out, 1, 1, 1) (or anything with `out` elements); None = 1.
    form / eps: see the module docstring; eps=None takes the form's default.
    Vectorised over output channels (one reduction over the fan-in), differentiable in weight and gain:
    fp32/fp64 weights go through a fused autograd function (`_ScaledStdWeightFn`: 4 passes forward and one fused
    batch-norm backward); under PopTorch tracing, under torch.compile (which fuses
    the plain ops itself) and for other dtypes, plain ops.
    """
    eps = _check_form(form, eps)
    out = weight.shape[0]
    fused = weight.dtype in (torch.float32, torch.float64) and not compat.is_compiling()
    if fused and not uses_plain_ops():
        return _ScaledStdWeightFn.apply(weight, gain, form, eps, float(gamma))
    return _scaled_std_weight_ops(weight.reshape(out, -1), gain, form, eps, float(gamma)).reshape_as(weight)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _tf_same_pad(size: int, k: int, s: int, d: int) -> int:
    """Total TF 'SAME' padding along one spatial dim (output size ceil(size / s))."""
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


class ScaledStdConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is Scaled-Weight-Standardized on every forward, with a learnable gain.

    Args:
        padding: an int / pair (symmetric, PyTorch style), None for ``((stride - 1) + dilation * (k - 1)) // 2``
            (timm's default), or ``"same"`` for TensorFlow/Haiku 'SAME' padding (output = ceil(in / stride);
            strided layers pad asymmetrically, more at the bottom/right), which DeepMind's NFNets use.
        form: ``"deepmind"`` or ``"timm"`` (module docstring); eps: None = the form's default.
        gamma: fixed multiplier folded into the weight (timm's NF-ResNets put the activation gamma here).
        gain_init: initial value of the learnable gain, shape (out, 1, 1, 1).

    State dict: ``weight``, ``bias`` (if any) and ``gain``, as timm's layer (so weights map one to one).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        form: str = "deepmind",
        eps: float | None = None,
        gamma: float = 1.0,
        gain_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        ks, st, dl = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding.lower() != "same":
                raise ValueError(f"padding must be an int, a pair, None or 'same', got {padding!r}")
            # Stride 1 with odd effective kernel: TF SAME is symmetric and static.
            static = all(s == 1 and (d * (k - 1)) % 2 == 0 for k, s, d in zip(ks, st, dl))
            pad: int | tuple[int, int] = tuple(d * (k - 1) // 2 for k, d in zip(ks, dl)) if static else 0
            tf_same = not static
        else:
            pad = tuple(((s - 1) + d * (k - 1)) // 2 for k, s, d in zip(ks, st, dl)) if padding is None else padding
            tf_same = False
        super().__init__(
            in_channels, out_channels, ks, stride=st, padding=pad, dilation=dl, groups=groups, bias=bias,
            device=device, dtype=dtype,
        )
        self.eps = _check_form(form, eps)
        self.tf_same = tf_same
        self.form = form
        self.gamma = float(gamma)
        self.gain_init = float(gain_init)
        self.gain = nn.Parameter(torch.empty((out_channels, 1, 1, 1), device=device, dtype=dtype))
        # Micro-batch AGC (optim.agc_scope: micro_batch, set by ipu_norm.optim.agc_scope): weight, gain and bias
        # pass through an identity whose backward clips their gradients unit-wise. None = plain layer.
        self.micro_batch_agc: MicroBatchAGC | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fan-in normal init of the weight (WS makes the scale irrelevant), zero bias, gain = gain_init."""
        # nn.Conv2d.__init__ calls this before `gain` exists.
        if not hasattr(self, "gain"):
            return
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.constant_(self.gain, self.gain_init)

    def set_form(self, form: str, eps: float | None = None) -> None:
        """Switch the standardization form (and eps; None = the form's default)."""
        self.eps = _check_form(form, eps)
        self.form = form

    def standardized_weight(self) -> torch.Tensor:
        """The weight actually convolved: gamma * gain * standardized(W)."""
        return scaled_std_weight(self.weight, self.gain, form=self.form, eps=self.eps, gamma=self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
            ph = _tf_same_pad(x.shape[-2], kh, sh, dh)
            pw = _tf_same_pad(x.shape[-1], kw, sw, dw)
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        weight, gain, bias, clip = self.weight, self.gain, self.bias, self.micro_batch_agc
        if clip is not None:
            weight, gain, bias = clip(weight), clip(gain), None if bias is None else clip(bias)
        weight = scaled_std_weight(weight, gain, form=self.form, eps=self.eps, gamma=self.gamma)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.tf_same:
            s += ", padding=SAME(tf)"
        s += f", form={self.form}, eps={self.eps:g}"
        if self.gamma != 1.0:
            s += f", gamma={self.gamma:.6f}"
        return s
