"""Measure the training memory of one step on CPU/GPU, split by kind and by block.

What is measured, and how:

- **weights**: bytes of the parameters (deduplicated by storage).
- **gradients**: bytes of ``p.grad`` after one real backward pass.
- **optimizer state**: bytes of every tensor in ``optimizer.state`` after one real ``optimizer.step()``
  on a deep copy of the model (SGD momentum: 1x the weights, Adam: 2x, RMSprop: 1x, 2x with momentum,
  3x centered with momentum) - measured, not assumed.
- **activations**: bytes of the tensors autograd saves for backward, caught with
  ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage (a tensor saved by two ops,
  e.g. a ReLU output that the next conv also saves, counts once). Parameters/buffers that autograd saves
  are weights, not activations, and are left out. Each saved tensor is attributed to the block that was
  running when it was first saved (forward hooks on ``stem``, ``blocks.i``, ``head``), which is what the
  IPU estimate needs to place activations on pipeline stages.
- **peak**: on CUDA ``torch.cuda.max_memory_allocated``; on CPU a live-storage tracker (a
  ``TorchDispatchMode`` that records every storage an op creates and releases it when the storage is
  freed), over forward + backward.
- **recomputation**: each block is wrapped in ``torch.utils.checkpoint`` (reentrant variant, so that the
  checkpoint's own saved inputs pass through the hooks): only block inputs are saved during forward;
  during backward one block at a time is recomputed.

- **forward ops** (for PopART's Standard recomputation, which picks checkpoints among ops): every ATen op of the
  forward in order, with the float elements of the new storages it creates, which earlier ops it reads, and how much
  of its output autograd saves (a ``TorchDispatchMode`` beside the saved-tensor hooks).
- **plain ops**: with ``plain_ops=True`` the layers run the plain ATen ops PopTorch traces for the IPU
  (``ipu_norm.ops.proxy_stats.plain_ops``), not CPU-only fused kernels; the IPU estimate profiles that way.

Activations are affine in the micro-batch (per-sample tensors grow linearly; BN's saved per-channel
statistics and PN's per-channel scale/shift do not). ``fit_activation_scaling`` measures two
micro-batch sizes, fits ``a + b * mb`` per block, and ``verify`` checks the fit against a third size.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from ipu_norm.compat import finalize_with_storage

OPTIMIZERS = ("sgd", "sgd_momentum", "nesterov", "adam", "adamw", "rmsprop", "rmsprop_momentum", "lamb")


def _storage_key(t: torch.Tensor) -> int:
    """Identity of the memory a tensor lives in (views and in-place results share it)."""
    return t.untyped_storage()._cdata


def _storage_nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def tensor_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes of a collection of tensors, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += _storage_nbytes(t)
    return total


def make_optimizer(name: str, params, lr: float = 0.1) -> torch.optim.Optimizer:  # noqa: ANN001
    """Build one of OPTIMIZERS with the settings whose state size matters (momentum, betas)."""
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name in ("sgd_momentum", "momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name in ("adamw", "lamb"):
        # LAMB keeps the same two moments as Adam; torch has no LAMB, AdamW stands in for its state size.
        return torch.optim.AdamW(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "rmsprop_momentum":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


# ----------------------------------------------------------------------------------------------------------
# Blocks: the units that pipeline stages are made of.


def model_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the pipeline units: stem, blocks.0..N-1, head (the model contract).

    A model without that contract (e.g. a plain nn.Sequential in tests) uses its direct children.
    """
    if all(hasattr(model, a) for a in ("stem", "blocks", "head")):
        units = [("stem", model.stem)]
        units += [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        units.append(("head", model.head))
        return units
    return [(n, m) for n, m in model.named_children()]


@dataclass
class BlockRecord:
    """Activation memory of one block for one micro-batch, in float elements plus non-float bytes.

    Elements (not bytes) for floats so that the IPU estimate can price them at the precision's dtype size.
    """

    name: str
    saved_float_elems: int = 0  # float elements autograd saved for backward (dedup by storage)
    saved_other_bytes: int = 0  # non-float saved bytes (bool masks, int indices)
    input_elems: int = 0  # elements of the block input: what a recomputation checkpoint stashes
    output_elems: int = 0  # elements of the block output (the largest tensor it hands on)
    param_elems: int = 0  # parameters owned by the block

    def saved_bytes(self, float_bytes: int = 4) -> int:
        return self.saved_float_elems * float_bytes + self.saved_other_bytes


@dataclass
class OpRecord:
    """One forward ATen op: where it ran, what it created, what it read, what of it autograd saved."""

    block: int  # index into the unit list; -1 = outside every unit (the loss)
    out_elems: int  # float elements of the new storages it created (views and in-place results create none)
    inputs: tuple[int, ...]  # indices of the earlier ops whose outputs it reads
    saved_elems: int = 0  # of out_elems, the elements autograd saved for backward


@dataclass
class ActivationMeasurement:
    """Saved-for-backward memory per block for one forward pass at a given micro-batch and resolution."""

    micro_batch: int
    resolution: int
    blocks: list[BlockRecord]
    recompute: bool = False
    extra_float_elems: int = 0  # saved outside any block (the loss)
    wall_s: float = 0.0
    ops: list[OpRecord] = field(default_factory=list)

    def total_bytes(self, float_bytes: int = 4) -> int:
        return sum(b.saved_bytes(float_bytes) for b in self.blocks) + self.extra_float_elems * float_bytes


def _first_tensor(obj) -> torch.Tensor | None:  # noqa: ANN001
    leaves, _ = tree_flatten(obj)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


@contextmanager
def _checkpointed_blocks(units: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Run every unit under torch.utils.checkpoint (instance-level forward override, restored after)."""
    patched = []
    for _, mod in units:
        orig = mod.forward

        def fwd(*args, _orig: Callable = orig, **kwargs):  # noqa: ANN002, ANN003, ANN202
            # Reentrant checkpoint: its forward runs without grad and saves only the inputs (through
            # ctx.save_for_backward, so the saved-tensor hooks see exactly the stash).
            return checkpoint(_orig, *args, use_reentrant=True, **kwargs)

        mod.forward = fwd
        patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


class _OpRecorder(TorchDispatchMode):
    """Records the forward's ATen ops (see `OpRecord`); `current` is the measuring pass's unit stack."""

    def __init__(self, current: list[int]) -> None:
        super().__init__()
        self.current = current
        self.ops: list[OpRecord] = []
        self.producer: dict[int, int] = {}  # live storage -> index of the op that created it

    def _forget(self, key: int) -> None:
        self.producer.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        idx = len(self.ops)
        inputs = set()
        for leaf in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                p = self.producer.get(_storage_key(leaf))
                if p is not None:
                    inputs.add(p)
        created = []
        for leaf in tree_flatten(out)[0]:
            if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta" or not leaf.is_floating_point():
                continue
            st = leaf.untyped_storage()
            key = st._cdata
            if key in self.producer:
                continue  # a view or an in-place result: no new memory
            self.producer[key] = idx
            # A freed storage's address may be reused: forget it when it dies.
            finalize_with_storage(leaf, self._forget, key)
            created.append(st.nbytes() // leaf.element_size())
        self.ops.append(OpRecord(self.current[-1], sum(created), tuple(sorted(inputs))))
        return out


def _loss(out: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if out.dim() == 2 and target is not None:
        return F.cross_entropy(out, target)
    return out.float().square().mean()


def measure_activations(
    model: nn.Module,
    micro_batch: int,
    resolution: int,
    *,
    recompute: bool = False,
    in_chans: int = 3,
    device: str | torch.device = "cpu",
    input_shape: tuple[int, ...] | None = None,
    plain_ops: bool = False,
    record_ops: bool = False,
) -> ActivationMeasurement:
    """Bytes of the tensors saved for backward during one training-mode forward pass, per block.

    Only the forward is run (the saved tensors are all known once it ends), which is what makes
    measuring ResNet-50 at 224 px cheap on a CPU. ``input_shape`` overrides (C, H, W) for non-image toys.
    ``plain_ops``: run the layers' plain-op path (what PopTorch traces); ``record_ops``: also record the forward's
    ATen ops (`OpRecord`).
    """
    from ipu_norm.ops.proxy_stats import plain_ops as plain_ops_context

    model.train()
    units = model_blocks(model)
    records = [BlockRecord(name) for name, _ in units]
    for rec, (_, mod) in zip(records, units):
        rec.param_elems = sum(p.numel() for p in mod.parameters())
    weight_keys = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    current: list[int] = [-1]  # stack of unit indices; -1 = outside every unit
    extra = [0]
    recorder = _OpRecorder(current) if record_ops else None

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key in weight_keys or key in seen:
            return t
        seen.add(key)
        nbytes = _storage_nbytes(t)
        idx = current[-1]
        if t.is_floating_point():
            elems = nbytes // t.element_size()
            if recorder is not None and key in recorder.producer:
                recorder.ops[recorder.producer[key]].saved_elems += elems
            if idx < 0:
                extra[0] += elems
            else:
                records[idx].saved_float_elems += elems
        elif idx >= 0:
            records[idx].saved_other_bytes += nbytes
        return t

    handles = []
    for i, (_, mod) in enumerate(units):

        def pre(_m, args, kwargs, _i=i):  # noqa: ANN001, ANN202
            x = _first_tensor(args) if args else _first_tensor(kwargs)
            if x is not None:
                records[_i].input_elems = x.numel()
            current.append(_i)

        def post(_m, _args, _kwargs, out, _i=i):  # noqa: ANN001, ANN202
            y = _first_tensor(out)
            if y is not None:
                records[_i].output_elems = y.numel()
            current.pop()

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))

    shape = input_shape if input_shape is not None else (in_chans, resolution, resolution)
    x = torch.randn(micro_batch, *shape, device=device)
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if plain_ops:
                stack.enter_context(plain_ops_context())
            if recorder is not None:
                stack.enter_context(recorder)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            if recompute:
                x.requires_grad_(True)  # else the reentrant checkpoint cuts the graph at the first block
                with _checkpointed_blocks(_recomputable(units)):
                    out = model(x)
            else:
                out = model(x)
            target = torch.zeros(micro_batch, dtype=torch.long, device=device) if out.dim() == 2 else None
            loss = _loss(out, target)
        ops = recorder.ops if recorder is not None else []
        del loss, out
    finally:
        for h in handles:
            h.remove()
    return ActivationMeasurement(
        micro_batch, resolution, records, recompute, extra[0], wall_s=time.perf_counter() - t0, ops=ops
    )


# ----------------------------------------------------------------------------------------------------------
# Peak memory: CUDA allocator statistics, or a live-storage tracker on CPU.


class LiveStorageTracker(TorchDispatchMode):
    """Tracks the bytes of live storages created by ops (and of tensors registered up front); records the peak.

    Every op output whose storage was not seen before is counted until the storage is freed (a weakref
    finalizer on the storage). Works for forward and backward, which the autograd engine dispatches through
    the same mode on CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()

    def track(self, t: torch.Tensor) -> None:
        """Count an existing tensor (weights, inputs) as live."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._keys:
            return
        self._keys.add(key)
        n = st.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        finalize_with_storage(t, self._release, key, n)

    def _release(self, key: int, n: int) -> None:
        self._keys.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        for leaf in leaves:
            self.track(leaf)
        return out


@dataclass
class StepMeasurement:
    """One measured training step: memory by kind (bytes, at the model's dtype) and the measured peak."""

    micro_batch: int
    resolution: int
    optimizer: str
    recompute: bool
    weight_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int  # saved-for-backward bytes (hooks)
    peak_bytes: int | None  # measured peak over forward + backward (weights, activations, grads)
    peak_step_bytes: int | None  # measured peak of the whole step (optimizer.step included)
    peak_method: str
    wall_s: float
    activations: ActivationMeasurement | None = None

    @property
    def component_sum(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_state_bytes + self.activation_bytes


def _recomputable(units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Units worth checkpointing: those with parameters (a bare ReLU/pool unit would gain nothing, and an
    in-place activation cannot run on a checkpoint's detached leaf input)."""
    return [(n, m) for n, m in units if any(True for _ in m.parameters())]


@dataclass
class PeakMeasurement:
    """Measured memory of one real training step (bytes, at the model's dtype)."""

    peak_fwd_bwd: int  # live bytes at the worst point of forward + backward (weights, input, activations, grads)
    peak_step: int  # worst point of the whole step, optimizer.step (state allocation) included
    method: str
    grad_bytes: int
    optimizer_state_bytes: int
    saved_bytes: int  # saved-for-backward bytes of this forward (hooks, parameters excluded)


def _train_step(
    model: nn.Module,
    micro_batch: int,
    shape: tuple[int, ...],
    dev: torch.device,
    recompute: bool,
) -> int:
    """Forward (counting saved tensors) and backward; returns the saved-for-backward bytes."""
    weight_keys = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in weight_keys and key not in seen:
            seen.add(key)
            saved[0] += _storage_nbytes(t)
        return t

    x = torch.randn(micro_batch, *shape, device=dev)
    # Hooks on the forward only: the reentrant checkpoint's recomputation in backward would count twice.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if recompute:
            x.requires_grad_(True)  # reentrant checkpoint needs an input that requires grad
            with _checkpointed_blocks(_recomputable(model_blocks(model))):
                out = model(x)
        else:
            out = model(x)
        target = torch.zeros(micro_batch, dtype=torch.long, device=dev) if out.dim() == 2 else None
        loss = _loss(out, target)
    del out, x
    loss.backward()
    return saved[0]


def measure_peak(
    model: nn.Module,
    micro_batch: int,
    resolution: int,
    *,
    optimizer: str | None = "sgd_momentum",
    recompute: bool = False,
    in_chans: int = 3,
    device: str | torch.device = "cpu",
    input_shape: tuple[int, ...] | None = None,
) -> PeakMeasurement:
    """Measure one real training step (forward, backward, first optimizer.step) on a deep copy of `model`.

    Peaks come from ``torch.cuda.max_memory_allocated`` on CUDA, from ``LiveStorageTracker`` on CPU; gradient
    and optimizer-state bytes are read after the step.
    """
    m = copy.deepcopy(model).to(device).train()
    opt = make_optimizer(optimizer, m.parameters()) if optimizer else None
    shape = input_shape if input_shape is not None else (in_chans, resolution, resolution)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        saved = _train_step(m, micro_batch, shape, dev, recompute)
        torch.cuda.synchronize(dev)
        fwd_bwd = torch.cuda.max_memory_allocated(dev)
        if opt is not None:
            opt.step()
        torch.cuda.synchronize(dev)
        step_peak, method = torch.cuda.max_memory_allocated(dev), "cuda.max_memory_allocated"
    else:
        tracker = LiveStorageTracker()
        for t in list(m.parameters()) + list(m.buffers()):
            tracker.track(t)
        with tracker:
            saved = _train_step(m, micro_batch, shape, dev, recompute)
            fwd_bwd = tracker.peak
            if opt is not None:
                opt.step()
        step_peak, method = tracker.peak, "cpu live-storage tracker"
    grads = tensor_bytes(p.grad for p in m.parameters() if p.grad is not None)
    state = 0
    if opt is not None:
        state = tensor_bytes(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    return PeakMeasurement(fwd_bwd, step_peak, method, grads, state, saved)


def measure_step(
    model: nn.Module,
    micro_batch: int,
    resolution: int,
    *,
    optimizer: str = "sgd_momentum",
    recompute: bool = False,
    device: str | torch.device = "cpu",
    input_shape: tuple[int, ...] | None = None,
) -> StepMeasurement:
    """Measure one training step: weights, gradients, optimizer state, saved activations and the peak.

    Activations come from the saved-tensor hooks (forward only); gradients, optimizer state and the peak
    from one real forward + backward + optimizer.step on a deep copy of the model (the model is untouched).
    """
    t0 = time.perf_counter()
    weights = tensor_bytes(model.parameters())
    acts = measure_activations(
        model, micro_batch, resolution, recompute=recompute, device=device, input_shape=input_shape
    )
    pk = measure_peak(
        model, micro_batch, resolution, optimizer=optimizer, recompute=recompute, device=device,
        input_shape=input_shape,
    )
    float_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    return StepMeasurement(
        micro_batch, resolution, optimizer, recompute, weights, pk.grad_bytes, pk.optimizer_state_bytes,
        acts.total_bytes(float_bytes), pk.peak_fwd_bwd, pk.peak_step, pk.method, time.perf_counter() - t0, acts,
    )


# ----------------------------------------------------------------------------------------------------------
# Micro-batch scaling: fit a + b * mb per block from two sizes, verify on a third.


@dataclass
class BlockScaling:
    """Per-sample and per-micro-batch-constant activation sizes of one block (float elements, other bytes)."""

    name: str
    float_per_sample: float
    float_const: float
    other_per_sample: float
    other_const: float
    input_per_sample: float
    output_per_sample: float
    param_elems: int

    def saved_elems(self, micro_batch: int) -> float:
        return self.float_const + self.float_per_sample * micro_batch

    def saved_bytes(self, micro_batch: int, float_bytes: int = 4) -> float:
        return (self.float_const + self.float_per_sample * micro_batch) * float_bytes + (
            self.other_const + self.other_per_sample * micro_batch
        )


@dataclass(frozen=True)
class OpScaling:
    """One forward op of the profile: elements created and saved, affine in the micro-batch (see `OpRecord`)."""

    block: int
    out_per_sample: float
    out_const: float
    saved_per_sample: float
    saved_const: float
    inputs: tuple[int, ...]

    def out_elems(self, micro_batch: int) -> float:
        return self.out_const + self.out_per_sample * micro_batch

    def saved_elems(self, micro_batch: int) -> float:
        return self.saved_const + self.saved_per_sample * micro_batch


@dataclass
class ActivationProfile:
    """What the IPU estimate needs about a model: per-block activation scaling at one resolution."""

    resolution: int
    blocks: list[BlockScaling]
    extra_float_per_sample: float = 0.0  # saved outside every block (the loss)
    extra_float_const: float = 0.0
    ops: list[OpScaling] = field(default_factory=list)  # forward ops in order (empty: not recorded)
    plain_ops: bool = False  # measured on the plain ops PopTorch traces
    measured_at: tuple[int, ...] = ()
    verified_at: tuple[int, ...] = ()
    max_rel_error: float | None = None  # of the fit at the verification sizes
    notes: list[str] = field(default_factory=list)

    def total_bytes(self, micro_batch: int, float_bytes: int = 4) -> float:
        return sum(b.saved_bytes(micro_batch, float_bytes) for b in self.blocks) + (
            (self.extra_float_const + self.extra_float_per_sample * micro_batch) * float_bytes
        )

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]


def _fit(v1: float, v2: float, m1: int, m2: int) -> tuple[float, float]:
    slope = (v2 - v1) / (m2 - m1)
    return slope, v1 - slope * m1


def profile_from_measurements(a: ActivationMeasurement, b: ActivationMeasurement) -> ActivationProfile:
    """Fit per-block a + slope * mb from two measurements at different micro-batch sizes."""
    if a.micro_batch == b.micro_batch:
        raise ValueError("need two different micro-batch sizes to fit the scaling")
    m1, m2 = a.micro_batch, b.micro_batch
    blocks = []
    for ra, rb in zip(a.blocks, b.blocks):
        fs, fc = _fit(ra.saved_float_elems, rb.saved_float_elems, m1, m2)
        os_, oc = _fit(ra.saved_other_bytes, rb.saved_other_bytes, m1, m2)
        blocks.append(
            BlockScaling(
                ra.name, fs, fc, os_, oc, rb.input_elems / m2, rb.output_elems / m2, ra.param_elems
            )
        )
    extra_slope, extra_const = _fit(a.extra_float_elems, b.extra_float_elems, m1, m2)
    ops = []
    same_graph = len(a.ops) == len(b.ops) and all(
        (x.block, x.inputs) == (y.block, y.inputs) for x, y in zip(a.ops, b.ops))
    if same_graph:
        for x, y in zip(a.ops, b.ops):
            ops.append(OpScaling(x.block, *_fit(x.out_elems, y.out_elems, m1, m2),
                                 *_fit(x.saved_elems, y.saved_elems, m1, m2), x.inputs))
    return ActivationProfile(a.resolution, blocks, extra_slope, extra_const, measured_at=(m1, m2), ops=ops)


def fit_activation_scaling(
    model: nn.Module,
    resolution: int,
    *,
    fit_sizes: tuple[int, int] = (1, 2),
    verify_sizes: tuple[int, ...] = (4,),
    device: str | torch.device = "cpu",
    input_shape: tuple[int, ...] | None = None,
    plain_ops: bool = False,
    record_ops: bool = False,
) -> ActivationProfile:
    """Measure two micro-batch sizes, fit per-block scaling, and check it against the verify sizes.

    ``plain_ops``: measure the plain ops PopTorch traces (the IPU estimate's profile); ``record_ops``: keep the
    forward's op list (needed to price PopART's Standard recomputation).
    """
    ms = [
        measure_activations(model, mb, resolution, device=device, input_shape=input_shape, plain_ops=plain_ops,
                            record_ops=record_ops)
        for mb in fit_sizes
    ]
    prof = profile_from_measurements(ms[0], ms[1])
    prof.plain_ops = plain_ops
    errs = []
    for mb in verify_sizes:
        got = measure_activations(model, mb, resolution, device=device, input_shape=input_shape,
                                  plain_ops=plain_ops).total_bytes()
        pred = prof.total_bytes(mb)
        errs.append(abs(pred - got) / max(got, 1))
    prof.verified_at = tuple(verify_sizes)
    prof.max_rel_error = max(errs) if errs else None
    return prof
