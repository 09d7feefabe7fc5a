"""Timing harness: one training step (forward, backward, optional clip, optimizer step), timed interleaved.

Variants of one comparison group are stepped in turn (A, B, C, A, B, C, ...) so that slow drift of a
shared machine (other processes, thermal state, frequency scaling) hits every variant alike; each
variant's figure is the median over its timed steps. Every step has the same synchronisation points
(after backward, after the clip, after the optimizer step), whether or not the variant clips, so the
clip time can be read off without changing what the step without clipping costs.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

# A clip factory takes the built model and returns the clip call for its gradients (None: no clipping).
ClipFactory = Callable[[nn.Module], Callable[[], None]]


@dataclass
class Variant:
    """One row of a benchmark: a model builder, where it comes from, and an optional gradient clip."""

    name: str
    source: str  # 'ipu_norm' or 'timm'
    build: Callable[[], nn.Module]
    clip: ClipFactory | None = None
    note: str = ""


@dataclass
class StepTimes:
    """Per-step wall times in seconds of one variant (lists, one entry per timed step)."""

    step: list[float] = field(default_factory=list)
    fwd_bwd: list[float] = field(default_factory=list)
    clip: list[float] = field(default_factory=list)
    opt: list[float] = field(default_factory=list)

    def median(self, key: str = "step") -> float:
        return statistics.median(getattr(self, key))

    def iqr(self, key: str = "step") -> tuple[float, float]:
        """(25th, 75th) percentile of one of the time lists (the spread a reader should see)."""
        vals = sorted(getattr(self, key))
        if len(vals) < 4:
            return vals[0], vals[-1]
        q = statistics.quantiles(vals, n=4)
        return q[0], q[2]


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so that host timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """A ready-to-run training step of one model on a fixed random batch.

    SGD with momentum (the same optimizer for every variant, foreach kernels where available), cross
    entropy on random labels. The batch stays on the device: data loading is not part of the figure.
    """

    def __init__(
        self,
        model: nn.Module,
        clip: Callable[[], None] | None,
        batch: int,
        resolution: int,
        num_classes: int,
        device: torch.device,
        channels_last: bool = False,
        amp_dtype: torch.dtype | None = None,
        compile_model: bool = False,
        seed: int = 0,
    ) -> None:
        self.device = device
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format).train()
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.clip = clip
        self.amp_dtype = amp_dtype
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, resolution, resolution, generator=gen)
        self.x = x.to(device).contiguous(memory_format=memory_format)
        self.y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()

    def __call__(self) -> tuple[float, float, float, float]:
        """Run one step; return (step, forward+backward, clip, optimizer) wall times in seconds."""
        dev = self.device
        synchronize(dev)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.loss_fn(self.forward(self.x), self.y)
        loss.backward()
        synchronize(dev)
        t1 = time.perf_counter()
        if self.clip is not None:
            self.clip()
        synchronize(dev)
        t2 = time.perf_counter()
        self.optimizer.step()
        synchronize(dev)
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2


def time_interleaved(
    steps: Sequence[TrainStep], timed_steps: int, warmup: int, progress: Callable[[str], None] | None = None
) -> list[StepTimes]:
    """Warm every step up, then time them round-robin; returns one StepTimes per step, in order."""
    for i, step in enumerate(steps):
        for _ in range(warmup):
            step()
        if progress:
            progress(f"warmed up {i + 1}/{len(steps)}")
    results = [StepTimes() for _ in steps]
    for r in range(timed_steps):
        # Alternate the order every round too, so no variant always runs right after the same one.
        order = list(range(len(steps)))
        if r % 2:
            order.reverse()
        for i in order:
            s, fb, c, o = steps[i]()
            res = results[i]
            res.step.append(s)
            res.fwd_bwd.append(fb)
            res.clip.append(c)
            res.opt.append(o)
    return results


def gemm_peak_flops(
    device: torch.device, size: int, dtype: torch.dtype = torch.float32, reps: int = 10
) -> float:
    """Measured matmul throughput (FLOP/s) of torch.mm on size x size matrices: the practical peak."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up (library init, kernel selection)
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    # min, not median: the peak is what the hardware can do when nothing else interferes.
    return 2.0 * size**3 / min(times)


def forward_flops(model: nn.Module, resolution: int) -> tuple[float, str]:
    """Forward FLOPs of one image (a multiply-add counts 2) and how they were counted.

    Uses the library's shape-only counter (ipu_norm.models.flops: conv + linear MACs, x2) for every
    model, timm's included, so both sides of a ratio are counted alike; falls back to torch's
    FlopCounterMode if that module is unavailable.
    """
    try:
        from ipu_norm.models.flops import count_flops  # noqa: PLC0415
    except ImportError:
        return count_forward_flops(model, resolution), "torch.utils.flop_counter"
    return float(count_flops(model, resolution).flops_2x), "ipu_norm.models.flops (2 x conv/linear MACs)"


def count_forward_flops(model: nn.Module, resolution: int) -> float:
    """Forward FLOPs for one image counted by torch's FlopCounterMode (convs, matmuls; no elementwise)."""
    from ipu_norm.compat import FlopCounter  # noqa: PLC0415

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(1, 3, resolution, resolution, device=device)
    counter = FlopCounter()
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())


def free_memory(device: torch.device) -> None:
    """Drop cached allocations between groups so one group's models do not crowd the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_step(step: TrainStep, steps: int = 3, row_limit: int = 25, sort_by: str | None = None) -> str:
    """torch.profiler table (ops by self time) of a few training steps, for finding what costs what."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CPU]
    if step.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    step()
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
    key = sort_by or ("self_cuda_time_total" if step.device.type == "cuda" else "self_cpu_time_total")
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


def params_excluding(model: nn.Module, excluded: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Trainable parameters of model not owned by any of the excluded modules (e.g. the classifier)."""
    skip = {id(p) for m in excluded for p in m.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
