"""Run ``run_train.py`` with one fault injected into its checkpoint writes (a test helper, not part of the package).

    python tests/fault_inject.py FAULT run_train.py --config ... [--resume]

``FAULT`` is ``KIND:N``: the fault hits the N-th checkpoint write of this process (1-based). The process runs the
real ``run_train.py`` as ``__main__``; only the file operations below are wrapped, and only for checkpoint files
(``.ckpt_step*.tmp`` temporaries), so nothing else in the run changes.

- ``kill-write``: SIGKILL after about half of the checkpoint's bytes are written (a truncated temporary file).
- ``kill-fsync``: SIGKILL when the temporary file is complete, just before it is fsync'ed and renamed.
- ``kill-replace``: SIGKILL right after the rename, before older checkpoints are pruned.
- ``enospc``: the write fails with ENOSPC ("No space left on device") half-way, like a disk that fills up.
- ``erofs``: creating the temporary file fails with EROFS ("Read-only file system").
- ``sigterm`` / ``sigint``: the process sends itself that signal while the temporary file is being written (a
  signal that arrives during a checkpoint write must neither corrupt it nor be lost).

The tests run as root, which ignores file permissions, and cannot mount a small or read-only file system, so
full and read-only disks are simulated at the system-call boundary: the OSError the kernel would raise.
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import sys
import tempfile
from typing import Any

KINDS = ("kill-write", "kill-fsync", "kill-replace", "enospc", "erofs", "sigterm", "sigint")


class _Counter:
    def __init__(self, kind: str, n: int) -> None:
        self.kind, self.n, self.writes = kind, n, 0

    def hit(self) -> bool:
        return self.writes == self.n


def _is_checkpoint_tmp(path: Any) -> bool:
    name = os.path.basename(str(path))
    return name.startswith(".ckpt_step") and name.endswith(".tmp")


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _FaultyFile:
    """A binary file object that dies (or fails) after ``limit`` bytes."""

    def __init__(self, f: Any, limit: int, kind: str) -> None:
        self._f, self._limit, self._kind, self._written = f, limit, kind, 0

    def write(self, data: Any) -> int:
        if self._written + len(data) > self._limit:
            if self._kind == "kill-write":
                self._f.write(bytes(data)[: self._limit - self._written])
                self._f.flush()
                _kill()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._written += len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def install(fault: str) -> None:
    """Wrap ``tempfile.mkstemp``, ``os.fdopen``, ``os.fsync`` and ``os.replace`` to inject ``fault``."""
    kind, _, n = fault.partition(":")
    if kind not in KINDS or not n.isdigit():
        raise SystemExit(f"fault_inject: bad fault {fault!r} (want KIND:N, KIND one of {', '.join(KINDS)})")
    c = _Counter(kind, int(n))
    mkstemp, fdopen, fsync, replace = tempfile.mkstemp, os.fdopen, os.fsync, os.replace
    ckpt_fds: set[int] = set()

    def _mkstemp(*args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("prefix", "")).startswith(".ckpt_step"):
            c.writes += 1
            if c.hit() and kind == "erofs":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))
            fd, path = mkstemp(*args, **kwargs)
            ckpt_fds.add(fd)
            return fd, path
        return mkstemp(*args, **kwargs)

    def _fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = fdopen(fd, *args, **kwargs)
        if fd in ckpt_fds and c.hit() and kind in ("kill-write", "enospc"):
            return _FaultyFile(f, 256 * 1024, kind)  # the tiny configs' checkpoints are ~1 MB
        return f

    def _fsync(fd: int) -> None:
        if fd in ckpt_fds:
            ckpt_fds.discard(fd)
            if c.hit() and kind == "kill-fsync":
                _kill()
            if c.hit() and kind in ("sigterm", "sigint"):
                os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
        fsync(fd)

    def _replace(src: Any, dst: Any, **kwargs: Any) -> None:
        replace(src, dst, **kwargs)
        if _is_checkpoint_tmp(src) and c.hit() and kind == "kill-replace":
            _kill()

    tempfile.mkstemp, os.fdopen, os.fsync, os.replace = _mkstemp, _fdopen, _fsync, _replace


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    install(sys.argv[1])
    script = sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
