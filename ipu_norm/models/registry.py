"""Model registry: `@register_model` on a builder, `create_model(name, norm=..., num_classes=...)`.

Model contract (every registered model follows it, by subclassing `ipu_norm.models.base.StemBlocksHead`;
pipelining, memory planning and AGC rely on it):
- ``model.stem``, ``model.blocks`` (an ``nn.Sequential`` of the residual/MBConv blocks, flat, in order)
  and ``model.head`` (everything after the blocks: final conv if any, pool, dropout, classifier);
  ``forward(x) == head(blocks(stem(x)))``.
- ``model.get_classifier()`` returns the final ``nn.Linear`` (excluded from AGC, re-initialised on import).
- ``model.default_cfg``: dict with at least ``train_size``, ``test_size`` (image side in pixels),
  ``num_classes``, ``norm`` (the norm string, or 'nf' for normalizer-free models) and ``family``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model builder under its function name (the builder's module is its family)."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    _FAMILY[name] = fn.__module__.rsplit(".", 1)[-1]
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, sorted."""
    _import_families()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_family(name: str) -> str:
    """The family (module name, e.g. 'resnet', 'efficientnet', 'nfnet') of a registered model."""
    _import_families()
    return _FAMILY[name]


def is_model(name: str) -> bool:
    _import_families()
    return name in _MODELS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model: create_model('efficientnet_b0', norm='ln+pn', num_classes=1000, ...)."""
    _import_families()
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    return _MODELS[name](**kwargs)


def _import_families() -> None:
    # Importing the family modules runs their @register_model decorators.
    import ipu_norm.models  # noqa: F401
