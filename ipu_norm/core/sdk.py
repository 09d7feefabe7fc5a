"""Graphcore's Poplar SDK as this project sees it: which release, the torch its PopTorch needs, and importing it.

``import poptorch`` fails in two ways: ImportError (no SDK) and PopTorch 3.4's import-time AssertionError when torch
is not the 2.0.1 it was built for. Both become `PoplarSDKMissingError` with one line saying what to do. This module
sits below every backend (``core``), so device resolution and the IPU package share one definition.
"""

from __future__ import annotations

import re
from typing import Any

import torch

POPLAR_SDK_MESSAGE = (
    "execution.device='ipu' needs PopTorch from Graphcore's Poplar SDK 3.4, which is not installed here "
    "(poptorch is not on PyPI: in an environment made from requirements-ipu.txt (torch 2.0.1), run "
    "`source <sdk>/enable.sh` and `pip install <sdk>/poptorch-*.whl`). "
    "To train without IPUs, set execution.device: cpu or cuda (or run with --device cpu)."
)

# The Poplar SDK release this adapter is written against, and the torch its PopTorch is built for
# (graphcore/poptorch sdk/poptorch/3.4.0: CMakeLists.txt:30 set(TORCH_VERSION 2.0.1); requirements.txt:5-7).
SDK_RELEASE = "3.4"
SDK_TORCH = "2.0.1"
SDK_TORCHVISION = "0.15.2"


class PoplarSDKMissingError(ImportError, RuntimeError):
    """poptorch (Graphcore's Poplar SDK) could not be imported, or is installed beside a torch it refuses.

    Also a RuntimeError: the command line reports RuntimeErrors as one ``error:`` line."""


class PoptorchTorchMismatchError(PoplarSDKMissingError):
    """PopTorch is installed but asserts, at import, that this environment's torch is not the one it was built for."""


def torch_mismatch_message(assertion: str) -> str:
    """One line for PopTorch's import-time assertion (python/__init__.py:20: "This version of PopTorch only works
    with torch==X but the version installed is Y")."""
    match = re.search(r"torch==(\S+) but the version installed is (\S+)", assertion)
    needs, has = match.groups() if match else (SDK_TORCH, torch.__version__)
    return (f"the installed PopTorch (Graphcore Poplar SDK) needs torch=={needs} but this environment "
            f"has torch {has}; run IPU jobs in the SDK {SDK_RELEASE} environment (requirements-ipu.txt: torch=="
            f"{SDK_TORCH}, torchvision=={SDK_TORCHVISION}, plus the SDK's poptorch wheel; README 'Running on IPUs'), "
            "or set execution.device: cpu or cuda")


def import_poptorch() -> Any:
    """Import poptorch, or raise `PoplarSDKMissingError` with one line saying what to do: the SDK is absent
    (install it, or use cpu/cuda), or its PopTorch refuses this environment's torch (its version assertion)."""
    try:
        import poptorch
    except ImportError as err:
        raise PoplarSDKMissingError(POPLAR_SDK_MESSAGE) from err
    except AssertionError as err:
        if "only works with torch==" not in str(err):
            raise
        raise PoptorchTorchMismatchError(torch_mismatch_message(str(err))) from None
    return poptorch


def poptorch_installed() -> bool:
    """True when poptorch imports; False when it is not installed. A PopTorch that refuses this torch raises
    `PoptorchTorchMismatchError` (an IPU install that cannot run is an error, not a reason to pick another device)."""
    try:
        import_poptorch()
    except PoptorchTorchMismatchError:
        raise
    except PoplarSDKMissingError:
        return False
    return True
