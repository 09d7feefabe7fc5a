"""IPU path of the proxy statistics: the PopART custom op ``ipu_norm.ProxyStats`` (custom_ops/) via PopTorch.

``ipu_norm.ops.proxy_stats.proxy_stats`` dispatches here by itself while PopTorch traces a model for the
IPU (``poptorch.isRunningOnIpu()``); users never call this directly on CPU/GPU. poptorch is imported
lazily, only here, so the CPU/GPU path never needs the Poplar SDK.

Build the library first (with the Poplar SDK enabled): ``make -C custom_ops``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from ipu_norm.ops.proxy_stats import PROXY_NUM_QUANTILES

CUSTOM_OP_NAME = "ProxyStats"
CUSTOM_OP_DOMAIN = "ipu_norm"
CUSTOM_OP_VERSION = 1
# Override the library location with this environment variable (e.g. a prebuilt .so on a cluster).
LIBRARY_ENV_VAR = "IPU_NORM_CUSTOM_OPS"

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def custom_ops_library_path() -> Path:
    """Where `make -C custom_ops` puts the PopART custom op library (or $IPU_NORM_CUSTOM_OPS)."""
    env = os.environ.get(LIBRARY_ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "custom_ops" / "build" / "custom_ops.so"


def load_custom_ops(path: str | os.PathLike[str] | None = None) -> Path:
    """Load the PopART custom op library once per process (ctypes.cdll.LoadLibrary) and return its path.

    Loading runs the library's static OpCreator / OpxCreator registrations, which PopART needs before a
    model using `ipu_norm.ProxyStats` is compiled. Raises FileNotFoundError (naming `make -C custom_ops`)
    if the library has not been built.
    """
    lib = Path(path) if path is not None else custom_ops_library_path()
    key = str(lib.resolve())
    with _lock:
        if key in _loaded:
            return lib
        if not lib.is_file():
            raise FileNotFoundError(
                f"PopART custom op library not found at {lib}: build it with `make -C custom_ops` "
                f"(needs the Poplar SDK: source <sdk>/enable.sh), or set ${LIBRARY_ENV_VAR} to a built custom_ops.so"
            )
        _loaded[key] = ctypes.cdll.LoadLibrary(key)
    return lib


def proxy_stats_ipu(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    act: str = "relu",
    num_quantiles: int = PROXY_NUM_QUANTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) from the PopART custom op, for use inside a PopTorch-traced model.

    `act` must be canonical ("relu", "silu", "gelu", "identity"); the parameters are cast to fp32 (the
    op computes and returns fp32; the cast's gradient brings fp16 gradients back to fp16 parameters).
    """
    import poptorch  # lazily: only the IPU path needs the Poplar SDK

    load_custom_ops()
    params = [t.float() for t in (gamma, beta, proxy_gamma, proxy_beta)]
    # example_outputs only give PopTorch the outputs' shape and dtype: two (C,) fp32 tensors.
    mean, var = poptorch.custom_op(
        params,
        CUSTOM_OP_NAME,
        CUSTOM_OP_DOMAIN,
        CUSTOM_OP_VERSION,
        example_outputs=[params[0], params[0]],
        attributes={"activation": act, "num_quantiles": int(num_quantiles)},
    )
    return mean, var
