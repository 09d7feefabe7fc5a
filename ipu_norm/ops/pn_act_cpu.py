"""Fused SiLU/GELU PN-Act on CPU: a small C kernel (csrc/pn_act_cpu.c) called through ctypes.

out = phi(u) * scale + shift in one pass, and in backward grad_u, sum(grad_out * phi(u)) and sum(grad_out)
per channel in one pass (the ATen path takes three passes forward and six backward, each on a fresh
full-size tensor). Built at first use with the system C compiler into a per-user cache directory
(``IPU_NORM_EXT_DIR``, default ``~/.cache/ipu_norm``), a second or so; set ``IPU_NORM_FUSED_PN_ACT=0`` to
disable it. Where it cannot be built or does not apply (no compiler, not CPU, not float32/float64, not
contiguous, more than one intra-op thread: the kernel is single-threaded, ATen's are parallel) callers use
the ATen path, which computes the same function.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("csrc") / "pn_act_cpu.c"
_ACT_CODES = {"silu": 1, "gelu": 2}
# -ffast-math lets GCC call glibc's vector expf/erff (libmvec); 512-bit vectors where the CPU has them were
# ~20% faster than 256-bit here. Part of the cache key.
_CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC")


def _cpu_tag() -> bytes:
    # -march=native code must not be loaded on another CPU sharing the cache directory (an NFS home).
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return (os.uname().machine + flags).encode()


def _build(src: Path, out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / out.name
        # -ffast-math at compile time only (it lets GCC call libmvec's vector expf/erff); linking with it would add
        # crtfastmath.o, which switches the whole process to flush-denormals-to-zero on load.
        subprocess.run([cc, *_CFLAGS, "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
        subprocess.run([cc, "-shared", str(obj), "-o", str(lib), "-lmvec", "-lm"], check=True, capture_output=True)
        os.replace(lib, out)  # atomic: concurrent builders (test workers, DDP ranks) never load a partial file


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("IPU_NORM_FUSED_PN_ACT", "1") == "0" or os.name != "posix":
        return None
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + " ".join(_CFLAGS).encode() + _cpu_tag()).hexdigest()[:16]
    root = Path(os.environ.get("IPU_NORM_EXT_DIR", Path.home() / ".cache" / "ipu_norm"))
    path = root / f"pn_act_cpu-{tag}.so"
    try:
        if not path.exists():
            _build(_SRC, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        warnings.warn(f"fused PN-Act C kernel unavailable ({exc}); using the ATen path", RuntimeWarning,
                      stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in ("f32", "f64"):
        getattr(lib, f"pn_act_forward_{suffix}").argtypes = [ptr] * 4 + [i64] * 3 + [ctypes.c_int] * 2
        getattr(lib, f"pn_act_backward_{suffix}").argtypes = [ptr] * 6 + [i64] * 3 + [ctypes.c_int] * 2
    return lib


def fused_pn_act_applies(u: torch.Tensor, act: str) -> bool:
    """Whether the fused kernel can run on u (see the module docstring); builds it on first call."""
    return (
        act in _ACT_CODES
        and u.device.type == "cpu"
        and u.dtype in (torch.float32, torch.float64)
        and u.dim() >= 2
        and u.is_contiguous()
        and torch.get_num_threads() == 1
        and not torch.compiler.is_compiling()
        and _lib() is not None
    )


def _dims(u: torch.Tensor) -> tuple[int, int, int]:
    n, c = u.shape[0], u.shape[1]
    return n, c, u.numel() // max(n * c, 1)


def _suffix(u: torch.Tensor) -> str:
    return "f32" if u.dtype == torch.float32 else "f64"


def fused_pn_act_forward(u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: str) -> torch.Tensor:
    """phi(u) * scale + shift per channel (dim 1); u contiguous, scale/shift with C elements in u's dtype."""
    out = torch.empty_like(u)
    sc, sh = (t.reshape(-1).to(u.dtype).contiguous() for t in (scale, shift))
    getattr(_lib(), f"pn_act_forward_{_suffix(u)}")(
        u.data_ptr(), out.data_ptr(), sc.data_ptr(), sh.data_ptr(), *_dims(u), _ACT_CODES[act], 1
    )
    return out


def fused_pn_act_backward(
    grad_out: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_u, sum grad_out * phi(u), sum grad_out): the last two per channel, shape (C,), in u's dtype."""
    g = grad_out.to(u.dtype).contiguous()
    grad_u = torch.empty_like(u)
    n, c, s = _dims(u)
    sums = torch.empty(2, c, dtype=torch.float64)
    sc = scale.reshape(-1).to(u.dtype).contiguous()
    getattr(_lib(), f"pn_act_backward_{_suffix(u)}")(
        g.data_ptr(), u.data_ptr(), grad_u.data_ptr(), sc.data_ptr(), sums[0].data_ptr(), sums[1].data_ptr(),
        n, c, s, _ACT_CODES[act], 1,
    )
    sums = sums.to(u.dtype)
    return grad_u, sums[0], sums[1]
