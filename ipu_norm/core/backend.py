"""The device-specific part of training behind one small interface, and the registry of its implementations.

The trainer (``ipu_norm/train/trainer.py``) is device independent: it builds the model, optimizer, schedule and data,
then hands every optimizer step to a ``Backend`` chosen by ``execution.device`` from this registry:

- ``prepare(model, optimizer, plan, spec)`` once: move/wrap the model (DDP, torch.compile, PopTorch ...).
  ``plan`` is the `ipu_norm.core.plan.ExecutionPlan` (batch arithmetic, precision, stages ...);
  ``spec`` (`TrainSpec`) carries the loss and the Adaptive Gradient Clipping setting.
- ``train_step(micro_batches) -> StepResult`` for ONE host call: ``micro_batches`` is the list of ``(images,
  targets)`` this process contributes (``plan.gradient_accumulation`` of them on CPU/CUDA; a backend that runs several
  optimizer steps per call exposes ``micro_batches_per_step``).
- ``eval_step(images, model=None) -> logits``, ``sync_to_host()``, ``lr_changed()``, ``state_dict()`` /
  ``load_state_dict()``, ``close()``.

Images reach ``train_step`` / ``eval_step`` already on the backend's device and normalised to float32 (image folders
load uint8 batches; the trainer's ``ipu_norm.data.DeviceInput`` normalises them there). A backend whose device takes
the uint8 images and normalises them itself (8-bit input) sets ``accepts_uint8 = True``.

Registry: ``register_backend(name, factory)`` with ``factory(cfg, dist) -> Backend``. The packages that implement
backends register themselves when imported: ``ipu_norm.train.backend`` registers "cpu" and "cuda", ``ipu_norm.ipu``
registers "ipu". `get_backend` imports the provider module of a device name on first use (named below as data, so
this module imports nothing above ``core``), which keeps the IPU package and PopTorch out of CPU/GPU runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ipu_norm.core.sdk import import_poptorch, poptorch_installed

MicroBatch = tuple[torch.Tensor, torch.Tensor]
BackendFactory = Callable[[Any, Any], "Backend"]

# Device name -> the module whose import registers its backend.
PROVIDERS: dict[str, str] = {"cpu": "ipu_norm.train.backend", "cuda": "ipu_norm.train.backend", "ipu": "ipu_norm.ipu"}

_FACTORIES: dict[str, BackendFactory] = {}

IPU_MISSING_HELP = (
    "execution.device='ipu' needs Graphcore's Poplar SDK: install it and the poptorch wheel it ships into this "
    "environment (poptorch is not on PyPI) and enable the SDK (source <sdk>/enable). To train without IPUs use "
    "--device cpu or --device cuda (torchrun --nproc_per_node=N run_train.py ... for several GPUs)."
)


@dataclasses.dataclass
class StepResult:
    """Outcome of one optimizer step on this process."""

    loss: float  # mean training loss over this process's micro-batches of the step
    samples: int  # samples this process consumed in the step
    skipped: bool = False  # the update was skipped (inf/nan gradients: GradScaler overflow, or fp32/bf16 guard)
    accuracy: float | None = None  # top-1 training accuracy of the step's samples, where the backend returns it
    agc_clip_fraction: float | None = None  # fraction of units AGC clipped in the step, where the backend clips


@dataclasses.dataclass
class TrainSpec:
    """What a backend needs beyond model/optimizer/plan to run a training step."""

    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    agc_clip: float | None = None  # Adaptive Gradient Clipping factor; None = off
    agc_eps: float = 1e-3


@runtime_checkable
class Backend(Protocol):
    """Runs training/evaluation steps of one model on one kind of device (see module docstring)."""

    name: str
    device: torch.device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: Any, spec: TrainSpec) -> None: ...

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> StepResult: ...

    def eval_step(self, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor: ...

    def sync_to_host(self) -> None: ...

    def lr_changed(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def register_backend(name: str, factory: BackendFactory) -> None:
    """Register ``factory(cfg, dist) -> Backend`` for ``execution.device: <name>`` (re-registering replaces it)."""
    _FACTORIES[name] = factory


def registered_backends() -> list[str]:
    """Device names a backend is known for (registered or with a provider module)."""
    return sorted(set(_FACTORIES) | set(PROVIDERS))


def resolve_device(device: str) -> str:
    """'auto' -> 'ipu' when poptorch imports, else 'cuda' when available, else 'cpu'; other names unchanged."""
    if device != "auto":
        return device
    if poptorch_installed():  # a PopTorch that refuses this torch raises its one-line error here
        return "ipu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_backend(cfg: Any, dist: Any) -> Backend:
    """The backend for ``cfg.execution.device`` (already resolved, not 'auto'), built by its registered factory."""
    device = cfg.execution.device
    if device not in _FACTORIES:
        provider = PROVIDERS.get(device)
        if provider is None:
            raise ValueError(f"unknown execution.device {device!r}; registered: {', '.join(registered_backends())}")
        try:
            importlib.import_module(provider)
        except ImportError as exc:
            raise RuntimeError(f"the {device} backend ({provider}) failed to import ({exc})"
                               + (f". {IPU_MISSING_HELP}" if device == "ipu" else "")) from exc
        if device not in _FACTORIES:
            raise RuntimeError(f"{provider} did not register a backend for execution.device={device!r}")
    if device == "ipu":
        import_poptorch()  # PoplarSDKMissingError (a RuntimeError too): one line saying what to do
    return _FACTORIES[device](cfg, dist)
