"""Learning-rate schedules as multiplicative factors for ``torch.optim.lr_scheduler.LambdaLR``.

All schedules count optimizer steps (call ``scheduler.step()`` once per optimizer step). A linear warmup
from ``warmup_start_factor`` to 1 over ``warmup_steps`` comes first; ``t = step - warmup_steps`` then drives
the main schedule over ``T = total_steps - warmup_steps`` steps:

- ``cosine``:      ``min_factor + (1 - min_factor) * (1 + cos(pi * min(t, T) / T)) / 2``
- ``exponential``: ``max(min_factor, decay_rate ** (t / decay_every_steps))`` (smooth)
- ``step``:        ``max(min_factor, decay_rate ** floor(t / decay_every_steps))`` (staircase, as the
  EfficientNet recipe's "x0.97 every 2.4 epochs")
- ``constant``:    ``1``
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

SCHEDULES = ("cosine", "exponential", "constant", "step")


def _lr_factor(
    step: int,
    *,
    name: str,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float,
    min_factor: float,
    decay_rate: float,
    decay_every_steps: float,
) -> float:
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    t = step - warmup_steps
    if name == "constant":
        return 1.0
    if name == "cosine":
        horizon = total_steps - warmup_steps
        progress = min(t, horizon) / horizon
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "exponential":
        return max(min_factor, decay_rate ** (t / decay_every_steps))
    # "step"
    return max(min_factor, decay_rate ** math.floor(t / decay_every_steps))


def build_lr_lambda(
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    min_factor: float = 0.0,
    decay_rate: float = 0.97,
    decay_every_steps: float | None = None,
) -> Callable[[int], float]:
    """Return ``step -> lr factor`` for ``LambdaLR``: linear warmup then the named schedule.

    Args:
        name: 'cosine', 'exponential', 'constant' or 'step'.
        total_steps: total optimizer steps of the run (the cosine reaches ``min_factor`` there and stays).
        warmup_steps: steps of linear warmup; factor ``warmup_start_factor`` at step 0, 1 at ``warmup_steps``.
        warmup_start_factor: initial factor of the warmup.
        min_factor: cosine end value; floor of the exponential / step decays.
        decay_rate: multiplicative decay per ``decay_every_steps`` ('exponential', 'step').
        decay_every_steps: decay period in steps (may be fractional, e.g. 2.4 epochs worth of steps);
            required for 'step', defaults to 1 (decay every step) for 'exponential'.

    The result is a ``functools.partial`` (picklable; its empty ``__dict__`` is what ``LambdaLR.state_dict``
    saves, so resuming with a changed schedule uses the new settings, not the checkpoint's).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; expected one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"steps must be >= 0 (total_steps={total_steps}, warmup_steps={warmup_steps})")
    if name == "cosine" and total_steps <= warmup_steps:
        raise ValueError(f"cosine needs total_steps > warmup_steps, got {total_steps} <= {warmup_steps}")
    if name == "step" and decay_every_steps is None:
        raise ValueError("the 'step' schedule needs decay_every_steps")
    if decay_every_steps is None:
        decay_every_steps = 1
    if decay_every_steps <= 0:
        raise ValueError(f"decay_every_steps must be > 0, got {decay_every_steps}")
    if not 0.0 < decay_rate <= 1.0 and name in ("exponential", "step"):
        raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate}")
    return functools.partial(
        _lr_factor,
        name=name,
        total_steps=int(total_steps),
        warmup_steps=int(warmup_steps),
        warmup_start_factor=float(warmup_start_factor),
        min_factor=float(min_factor),
        decay_rate=float(decay_rate),
        decay_every_steps=float(decay_every_steps),
    )
