"""The backend registry (ipu_norm/core/backend.py), the one resolve_device, and the floor rule: core/ imports nothing
above it, train/ does not import ipu/ (no train <-> ipu circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ipu_norm.core import backend as core_backend
from ipu_norm.train.backend import TorchBackend
from ipu_norm.train.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[1] / "ipu_norm"


def _cfg(device: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(execution=types.SimpleNamespace(device=device))


def test_cpu_backend_comes_from_the_registry() -> None:
    assert isinstance(core_backend.get_backend(_cfg("cpu"), DistInfo()), TorchBackend)
    assert {"cpu", "cuda", "ipu"} <= set(core_backend.registered_backends())


def test_unknown_device_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown execution.device 'tpu'; registered: cpu, cuda, ipu"):
        core_backend.get_backend(_cfg("tpu"), DistInfo())


def test_register_backend_is_used_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    monkeypatch.setitem(core_backend._FACTORIES, "fake", lambda cfg, dist: made.append(cfg) or "backend")
    assert core_backend.get_backend(_cfg("fake"), DistInfo()) == "backend" and len(made) == 1


def test_poptorch_version_assertion_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """PopTorch 3.4 asserts torch==2.0.1 at import: an installed SDK that cannot run here is an error (one line naming
    the torch it needs), for 'auto' and for device ipu alike; explicit cpu is untouched."""
    from ipu_norm.core.sdk import PoptorchTorchMismatchError

    (tmp_path / "poptorch.py").write_text(
        'assert False, "This version of PopTorch only works with torch==2.0.1 but the version installed is 9.9"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "poptorch", raising=False)
    with pytest.raises(PoptorchTorchMismatchError, match=r"needs torch==2\.0\.1 but this environment has torch 9\.9"):
        core_backend.resolve_device("auto")
    with pytest.raises(RuntimeError, match=r"needs torch==2\.0\.1") as info:
        core_backend.get_backend(_cfg("ipu"), DistInfo())
    assert "\n" not in str(info.value)
    assert core_backend.resolve_device("cpu") == "cpu"


def _imports(path: Path) -> list[str]:
    """Every module imported by a file (top level and inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize(("floor", "forbidden"), [
    ("core", ("ipu_norm.train", "ipu_norm.ipu", "ipu_norm.memory", "ipu_norm.parallel", "ipu_norm.config",
              "ipu_norm.bench", "ipu_norm.models", "ipu_norm.layers")),
    ("train", ("ipu_norm.ipu",)),
    ("parallel", ("ipu_norm.ipu", "ipu_norm.train", "ipu_norm.memory")),
    ("memory", ("ipu_norm.ipu", "ipu_norm.train")),
])
def test_a_lower_floor_never_imports_a_higher_one(floor: str, forbidden: tuple[str, ...]) -> None:
    bad = [(str(p.relative_to(ROOT)), m) for p in sorted((ROOT / floor).glob("*.py")) for m in _imports(p)
           if m.startswith(forbidden)]
    assert bad == []


def test_cpu_training_never_loads_the_ipu_package() -> None:
    code = ("import sys, types\n"
            "from ipu_norm.core.backend import get_backend\n"
            "from ipu_norm.train.distributed import DistInfo\n"
            "cfg = types.SimpleNamespace(execution=types.SimpleNamespace(device='cpu'))\n"
            "get_backend(cfg, DistInfo())\n"
            "assert not [m for m in sys.modules if m.startswith('ipu_norm.ipu')], sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent)
