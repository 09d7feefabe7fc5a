"""Adaptive Gradient Clipping (Brock et al. 2021, arXiv 2102.06171), unit-wise, vectorised.

For every unit i of a parameter W (a row: output channel of a conv OIHW, output unit of a Linear (out, in);
the whole tensor for vectors and scalars), with G the gradient:

    G_i <- lambda * (||W_i||* / ||G_i||) * G_i   if ||G_i|| / ||W_i||* > lambda,   else G_i
    ||W_i||* = max(||W_i||_F, eps = 1e-3),  ||G_i|| guarded with max(., 1e-6)

The final classifier is not clipped (`agc_parameters` excludes `model.get_classifier()` by module).

Where to call it (the gradient must be the one the optimizer is about to apply):

1. Gradient accumulation: clip ONCE per optimizer step, after the backward of the last micro-batch, on the
   accumulated gradient. Clipping is non-linear, so clipping each micro-batch and summing is a different
   (wrong) update.
2. Mixed precision with ``torch.amp.GradScaler``: call ``scaler.unscale_(optimizer)`` first; on scaled
   gradients the ratio ||G||/||W|| is off by the loss scale. Then ``scaler.step(optimizer)`` (which skips
   the step if the unscale found inf/nan; clipping such gradients is harmless since they are discarded)
   and ``scaler.update()``. `AGC.step_` does exactly this order.
3. DDP: DistributedDataParallel all-reduces (averages) gradients during the last backward (with
   ``no_sync()`` on the earlier micro-batches), so calling AGC after that backward clips the global
   gradient, identically on every replica. Clipping before the all-reduce would give a different update.
4. On IPUs the optimizer runs on device inside PopTorch's compiled step, where this eager function never
   sees the gradients; AGC there would have to be part of the compiled graph (not provided by this module).

Clipping is applied before weight decay and momentum (the optimizer sees the clipped gradient).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["AGC", "adaptive_clip_grad_", "agc_parameters", "unitwise_norm"]

GRAD_NORM_EPS = 1e-6  # guard of ||G_i|| (REFERENCE.md)
# AGC(prefetch_norms=True) hooks only tensors this large: on NFNet-F0 (1 CPU thread) the norms of smaller ones
# were not cheaper in a backward hook than at clip time, the hook call itself then dominating.
PREFETCH_MIN_BYTES = 1 << 20


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of every unit of x, broadcastable against x.

    ndim <= 1 (bias, gain vector, scalar): one norm of the whole tensor (0-d result).
    ndim >= 2 (Linear (out, in), conv (out, in, kh, kw), WS gain (out, 1, 1, 1)): one norm per row over all
    dims but the first, keepdim (shape (out, 1, ...)).
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def _unitwise_norms_grouped(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """unitwise_norm of every tensor, computed with one reduction per (device, dtype, row length) group.

    On accelerators, matrices/conv weights are viewed as (rows, row_len) and concatenated along rows inside a
    group, so a network with hundreds of parameters costs a handful of kernels (on CPU each view is reduced in
    place instead, see below); vectors/scalars go through a single
    torch._foreach_norm. Norms are accumulated in fp32 for half-precision tensors.
    """
    out: list[torch.Tensor | None] = [None] * len(tensors)
    whole: list[int] = []
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):  # only builds index lists
        if t.ndim <= 1:
            whole.append(i)
        else:
            groups[(t.device, t.dtype, t[0].numel())].append(i)
    if whole:
        half = (torch.float16, torch.bfloat16)
        norms = torch._foreach_norm([tensors[i].float() if tensors[i].dtype in half else tensors[i] for i in whole])
        for i, n in zip(whole, norms):
            out[i] = n
    for (device, dtype, row_len), idx in groups.items():
        acc = _acc_dtype(dtype)
        if device.type == "cpu":
            # On CPU, concatenating first would copy every weight and gradient (2x the model per step, measured
            # 2.6x slower than per-tensor reductions on NFNet-F0) while there is no kernel-launch overhead to
            # amortise: reduce each (rows, row_len) view in place. PyTorch's optimizers likewise use their
            # multi-tensor (foreach) paths on accelerators only.
            for i in idx:
                out[i] = _cpu_row_norms(tensors[i], row_len, acc)
            continue
        rows = torch.cat([tensors[i].reshape(-1, row_len) for i in idx]).to(acc)
        norms = torch.linalg.vector_norm(rows, dim=1)
        sizes = [tensors[i].shape[0] for i in idx]
        for i, n in zip(idx, norms.split(sizes)):
            out[i] = n.view((-1,) + (1,) * (tensors[i].ndim - 1))
    return out  # type: ignore[return-value]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms of `dtype` tensors are accumulated in: fp32 for half precision, else their own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cpu_row_norms(t: torch.Tensor, row_len: int, acc: torch.dtype) -> torch.Tensor:
    """Row norms of a CPU matrix/conv weight (ndim >= 2), shape (out, 1, ...): the one call clip time and the
    backward hooks both use, so that a norm taken in a hook is bitwise the one clip time would take."""
    norms = torch.linalg.vector_norm(t.reshape(-1, row_len), dim=1, dtype=acc)
    return norms.view((-1,) + (1,) * (t.ndim - 1))


def _params_with_grads(parameters: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """The parameters that have a .grad (a single tensor is accepted); sparse gradients are refused."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError("adaptive_clip_grad_ does not support sparse gradients")
    return params


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
) -> None:
    """Clip the .grad of `parameters` in place, unit-wise (module docstring). Parameters without grad are skipped.

    Call on the fully accumulated, all-reduced, unscaled gradient, once per optimizer step.
    """
    params = _params_with_grads(parameters)
    if not params:
        return
    grads = [p.grad for p in params]
    w_norms = _unitwise_norms_grouped([p.detach() for p in params])
    g_norms = _unitwise_norms_grouped(grads)
    _clip_with_norms(grads, w_norms, g_norms, clip_factor, eps)


def _clip_with_norms(grads: list[torch.Tensor], w_norms: list[torch.Tensor], g_norms: list[torch.Tensor],
                     clip_factor: float, eps: float) -> None:
    """Scale `grads` in place given their weights' and their own unit-wise norms (`_unitwise_norms_grouped`)."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, g in enumerate(grads):  # only builds index lists
        by_device[g.device].append(i)
    for device, idx in by_device.items():
        # All units of all tensors on this device as one flat vector: one where() for the whole model.
        acc = torch.float64 if any(w_norms[i].dtype == torch.float64 for i in idx) else torch.float32
        w = torch.cat([w_norms[i].reshape(-1).to(acc) for i in idx])
        g = torch.cat([g_norms[i].reshape(-1).to(acc) for i in idx])
        max_norm = w.clamp_min(eps) * clip_factor
        clipped = g > max_norm
        f = torch.where(clipped, max_norm / g.clamp_min(GRAD_NORM_EPS), torch.ones_like(g))
        sizes = [w_norms[i].numel() for i in idx]
        if device.type == "cpu":
            _scale_clipped_rows_cpu([grads[i] for i in idx], f, clipped, sizes)
        else:
            factors = [fi.view(w_norms[i].shape).to(grads[i].dtype) for i, fi in zip(idx, f.split(sizes))]
            torch._foreach_mul_([grads[i] for i in idx], factors)


def _scale_clipped_rows_cpu(grads: list[torch.Tensor], factors: torch.Tensor, clipped: torch.Tensor,
                            sizes: list[int]) -> None:
    """Multiply only the clipped units of CPU gradients by their factor (the others' factor is exactly 1).

    Bitwise the same as multiplying every gradient by its factor (x * 1.0 == x), but the multiply is a full
    read-modify-write pass over the model's gradients while AGC usually clips a small minority of units
    (NFNet-F0 in the benchmark: ~550 of 112k units, in 35 of 231 tensors); the host reads the per-tensor counts
    of clipped units with one `.tolist()`, free on CPU. Accelerators keep the single fused multi-tensor multiply
    instead (no synchronisation).
    """
    running = torch.zeros(clipped.numel() + 1, dtype=torch.long)
    torch.cumsum(clipped, 0, out=running[1:])
    bounds = torch.tensor([0, *itertools.accumulate(sizes)])
    counts = (running[bounds[1:]] - running[bounds[:-1]]).tolist()
    start = 0
    for grad, units, count in zip(grads, sizes, counts):
        if count:
            f = factors[start:start + units].to(grad.dtype)
            if count == units or not grad.is_contiguous():
                grad.mul_(f.view((-1,) + (1,) * (grad.ndim - 1)) if grad.ndim > 1 else f.view(()))
            else:
                rows = clipped[start:start + units].nonzero().squeeze(1)
                g2 = grad.view(units, -1)
                g2.index_copy_(0, rows, g2.index_select(0, rows).mul_(f[rows].unsqueeze(1)))
        start += units


def agc_parameters(model: nn.Module, exclude: Iterable[nn.Module] = ()) -> list[nn.Parameter]:
    """Trainable parameters of model that AGC clips: all but the classifier's (and those of `exclude`).

    The classifier is `model.get_classifier()` (selected by module, not by parameter order); a DDP or
    similar wrapper exposing `.module` is unwrapped first.
    """
    inner = getattr(model, "module", model)
    if not hasattr(inner, "get_classifier"):
        raise TypeError(f"{type(inner).__name__} has no get_classifier(); pass the classifier through `exclude`")
    skip = {id(p) for m in (inner.get_classifier(), *exclude) for p in m.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]


def _norm_key(t: torch.Tensor) -> tuple:
    """What identifies the contents of t for a cached norm: storage address, version counter, shape, dtype.

    `_version` is bumped by every in-place op on t or on a view of it (optimizer steps, `copy_` in
    load_state_dict, `+=` accumulation, GradScaler's unscale); a new tensor gets a new address or, if the
    allocator reuses one, still not the cached Python object (the grad entries also keep a weakref). Edits that
    bypass the version counter (in-place ops on `t.data`) are not seen: `AGC.invalidate_norms()` after them.
    """
    return t.data_ptr(), t._version, t.shape, t.dtype


class _CachedNorms:
    """Unit-wise norms of one parameter and of its gradient, computed during backward, with validity keys."""

    __slots__ = ("g_key", "g_norm", "g_ref", "w_key", "w_norm")

    def __init__(self) -> None:
        self.w_key: tuple | None = None
        self.w_norm: torch.Tensor | None = None
        self.g_ref: weakref.ref | None = None
        self.g_key: tuple | None = None
        self.g_norm: torch.Tensor | None = None

    def weight_norm(self, p: torch.Tensor) -> torch.Tensor | None:
        """The cached norm of p if p has not changed since, else None."""
        return self.w_norm if self.w_key is not None and self.w_key == _norm_key(p) else None

    def grad_norm(self, g: torch.Tensor) -> torch.Tensor | None:
        """The cached norm of g if it is the very tensor the norm was taken of, unchanged since, else None."""
        if self.g_ref is None or self.g_ref() is not g or self.g_key != _norm_key(g):
            return None
        return self.g_norm


class AGC:
    """Holds the clip factor and the clipped parameters; `clip_()` once per optimizer step.

    >>> agc = AGC(model, clip_factor=0.01)       # or AGC(list_of_params, ...)
    >>> for i, (x, y) in enumerate(micro_batches):
    ...     (loss_fn(model(x), y) / n_micro).backward()   # scaler.scale(...).backward() with AMP
    >>> agc.step_(optimizer, scaler)              # [unscale_] -> clip_ -> step -> [update]
    >>> optimizer.zero_grad()

    ``prefetch_norms=True`` (or `attach()`) registers a post-accumulate-grad hook on every clipped CPU parameter
    that computes the unit-wise norms of the weight and of the freshly accumulated gradient during backward,
    while both are still in cache (weight-standardized convs read the weight right before its AccumulateGrad);
    `clip_` then only computes factors and scales the clipped units. The cached norms are the very
    `_unitwise_norms_grouped` results clip time would compute on the same tensors, so the clipped gradients are
    bitwise those of `adaptive_clip_grad_`; any norm whose tensor changed since (see `_norm_key`) is recomputed
    at clip time. Set `grad_norms_in_backward = False` for backwards whose gradient is not the one clipped:
    the earlier micro-batches of an accumulation (wasted work otherwise, not wrong), and always when something
    rewrites the gradients between backward and clip (DDP's all-reduce, an enabled GradScaler's unscale: their
    norms would be recomputed anyway). Weight norms are taken in the first backward after each weight change.
    Accelerator parameters get no hooks (their grouped multi-tensor reduction at clip time is cheap).
    """

    def __init__(self, params_or_model: nn.Module | Iterable[torch.Tensor], clip_factor: float = 0.01,
                 eps: float = 1e-3, prefetch_norms: bool = False,
                 prefetch_min_bytes: int = PREFETCH_MIN_BYTES) -> None:
        if clip_factor <= 0:
            raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
        if isinstance(params_or_model, nn.Module):
            self.params = agc_parameters(params_or_model)
        else:
            self.params = list(params_or_model)
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.num_clips = 0  # how many times clip_ ran (tests / logging: one per optimizer step)
        self.prefetch_min_bytes = int(prefetch_min_bytes)
        self.grad_norms_in_backward = True
        # (weight norms, grad norms) the last clip_ computed itself rather than taking from the hooks.
        self.last_recomputed = (0, 0)
        self._cache: dict[int, _CachedNorms] = {}  # id(param) -> norms; only while attached
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if prefetch_norms:
            self.attach()

    @property
    def attached(self) -> bool:
        """Whether the backward hooks are registered."""
        return bool(self._handles)

    @property
    def num_hooked(self) -> int:
        """How many parameters have a norm-prefetching hook."""
        return len(self._handles)

    def attach(self) -> None:
        """Register the norm-prefetching hooks (idempotent).

        On the clipped CPU parameters that require grad, are matrices/conv weights (ndim >= 2) and hold at least
        `prefetch_min_bytes`: for smaller tensors the hook call costs more than the cache saves.
        """
        if self._handles:
            return
        # The hook holds the AGC weakly: the model's parameters must not keep a discarded AGC (and its norms)
        # alive, and a dead AGC's hooks do nothing.
        hook = functools.partial(_prefetch_hook, weakref.ref(self))
        for p in self.params:
            if (p.requires_grad and p.grad_fn is None and p.device.type == "cpu" and p.ndim >= 2 and p.shape[0] > 0
                    and p.numel() * p.element_size() >= self.prefetch_min_bytes and id(p) not in self._cache):
                self._cache[id(p)] = _CachedNorms()
                self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def detach(self) -> None:
        """Remove the hooks and drop the cached norms; `clip_` computes every norm itself again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()

    def invalidate_norms(self) -> None:
        """Forget the cached norms (after edits the version counters cannot see, e.g. via `param.data`)."""
        for entry in self._cache.values():
            entry.__init__()

    def _on_grad_accumulated(self, p: torch.Tensor) -> None:
        """Take p's weight norm (if p changed since the last one) and its gradient's norm, while they are hot."""
        entry = self._cache.get(id(p))
        if entry is None:
            return
        g = p.grad
        # Compiled autograd would trace the hook; a parameter moved off the CPU keeps its hook: clip time then.
        if torch.compiler.is_compiling() or p.device.type != "cpu" or p.ndim < 2:
            entry.g_ref = entry.g_norm = None
            return
        with torch.no_grad():  # hooks run with grad enabled under create_graph=True
            if entry.weight_norm(p) is None:
                w = p.detach()
                entry.w_norm = _cpu_row_norms(w, w.numel() // w.shape[0], _acc_dtype(w.dtype))
                entry.w_key = _norm_key(p)
            if (self.grad_norms_in_backward and g is not None and g.layout == torch.strided and g.device.type == "cpu"
                    and g.shape == p.shape):
                entry.g_norm = _cpu_row_norms(g, g.numel() // g.shape[0], _acc_dtype(g.dtype))
                entry.g_ref, entry.g_key = weakref.ref(g), _norm_key(g)
            else:
                entry.g_ref = entry.g_norm = None

    @torch.no_grad()
    def clip_(self) -> None:
        """Clip the current (accumulated, all-reduced, unscaled) gradients in place."""
        if not self._cache:
            adaptive_clip_grad_(self.params, self.clip_factor, self.eps)
            self.last_recomputed = (-1, -1)  # not tracked without hooks
        else:
            params = _params_with_grads(self.params)
            if params:
                grads = [p.grad for p in params]
                w_norms: list[torch.Tensor | None] = []
                g_norms: list[torch.Tensor | None] = []
                for p, g in zip(params, grads):
                    entry = self._cache.get(id(p))
                    w_norms.append(None if entry is None else entry.weight_norm(p))
                    g_norms.append(None if entry is None else entry.grad_norm(g))
                self.last_recomputed = (_fill_missing(w_norms, [p.detach() for p in params]),
                                        _fill_missing(g_norms, grads))
                _clip_with_norms(grads, w_norms, g_norms, self.clip_factor, self.eps)  # type: ignore[arg-type]
        self.num_clips += 1

    def step_(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        """One optimizer step in the correct order: scaler.unscale_ -> clip_ -> (scaler.)step -> scaler.update."""
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(optimizer)
            self.clip_()
            scaler.step(optimizer)
            scaler.update()
        else:
            self.clip_()
            optimizer.step()

    def __repr__(self) -> str:
        return (f"AGC(clip_factor={self.clip_factor}, eps={self.eps}, num_params={len(self.params)}, "
                f"prefetch_norms={self.attached})")


def _prefetch_hook(agc_ref: weakref.ref, p: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a clipped parameter: forwards to its AGC while that still exists."""
    agc = agc_ref()
    if agc is not None:
        agc._on_grad_accumulated(p)


def _fill_missing(norms: list[torch.Tensor | None], tensors: list[torch.Tensor]) -> int:
    """Compute the None entries of `norms` (unit-wise norms of the matching `tensors`) in one grouped call.

    Returns how many were computed.
    """
    missing = [i for i, n in enumerate(norms) if n is None]
    if missing:
        for i, n in zip(missing, _unitwise_norms_grouped([tensors[i] for i in missing])):
            norms[i] = n
    return len(missing)
