"""Where the project's compiled helpers live, and how each is built once: the Proxy Norm CPU operators
(``ipu_norm.ops.native``) and the crop-aware JPEG decoder (``ipu_norm.data.decode``).

`build_once` builds into a temporary folder beside the target under an exclusive file lock and renames the
results into place, the library last: concurrent processes (DataLoader workers, DDP ranks) build it once, never
load a partial file and never miss its side files.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_dir() -> Path:
    """The folder of built helpers and generated data: ``$IPU_NORM_EXT_DIR``, default ``~/.cache/ipu_norm``."""
    return Path(os.environ.get("IPU_NORM_EXT_DIR", Path.home() / ".cache" / "ipu_norm"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (POSIX flock): one builder at a time across processes."""
    import fcntl  # noqa: PLC0415 - POSIX only; build_once checks os.name first

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(out: Path, make: Callable[[Path], None]) -> Path:
    """Return `out`, first building it unless it exists: ``make(tmp)`` writes ``tmp / out.name`` and any side
    files ``tmp / (out.name + suffix)``; they are renamed beside `out`, `out` itself last (atomic on POSIX)."""
    if out.exists():
        return out
    if os.name != "posix":
        raise RuntimeError("building needs a POSIX system with a C compiler")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.with_name(out.name + ".lock")):
        if out.exists():  # another process built it while we waited
            return out
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            make(Path(tmp))
            built = Path(tmp) / out.name
            if not built.exists():
                raise RuntimeError(f"the build wrote no {out.name}")
            for side in sorted(Path(tmp).iterdir()):
                if side != built:
                    os.replace(side, out.with_name(side.name))
            os.replace(built, out)
    return out
