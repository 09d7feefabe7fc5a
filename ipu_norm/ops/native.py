"""The Proxy Norm CPU operators ``torch.ops.ipu_norm.{proxy_affine, pn_act, relu_shift}`` (csrc/proxy_norm_ops.cpp).

They are real operators: TORCH_LIBRARY registration with CPU, Meta and Autograd kernels, parallel over channels
or (n, c) planes with ``at::parallel_for`` at every thread count, no ``-ffast-math``. The library is compiled once
per (torch version, source, compiler flags, CPU capability) with the system C++ compiler (~20 s, a message says
so) into ``~/.cache/ipu_norm/ops`` (``$IPU_NORM_EXT_DIR/ops``), under a file lock and renamed into place
(``ipu_norm.core.build.build_once``), so concurrent processes neither race nor load a partial file. Build it ahead
of time with ``python -m ipu_norm.ops.native``.

Where it cannot be built (no C++ compiler, no torch headers) one warning says why and the layers keep the ATen
path (``ipu_norm.ops.proxy_stats.proxy_stats`` and the functions of ``ipu_norm.layers.proxy_norm``), which
computes the same functions (tests/test_native_ops.py checks both against float64 references). The operators are
CPU-only; CUDA tensors, half-precision tensors, non-contiguous inputs and PopTorch tracing use the ATen path.

The layers call `load()` when they are built (never inside ``forward``), so which path a model runs is fixed
before its first step, in eager mode and under torch.compile alike.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from ipu_norm.core.build import build_once, cache_dir

SOURCE = Path(__file__).with_name("csrc") / "proxy_norm_ops.cpp"
LIBRARY_NAME = "ipu_norm_ops"
OPS = ("proxy_affine", "proxy_affine_backward", "pn_act", "pn_act_backward", "relu_shift", "relu_shift_backward")

# Whether the operators are registered in this process: None until load() ran, then True / False.
_loaded: bool | None = None


def _isa_flags() -> list[str]:
    """Vector ISA flags for this CPU: what torch itself dispatches to (AVX-512 or AVX2 + FMA), else the compiler's
    baseline (SSE2 on x86-64, NEON on aarch64). Part of the library's cache key."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
    if capability == "AVX512":  # as ATen's own AVX-512 kernels: 512-bit vectors
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mprefer-vector-width=512"]
    return ["-mavx2", "-mfma"] if capability == "AVX2" else []


def _openmp() -> bool:
    """Whether ATen parallelises with OpenMP (then at::parallel_for in our kernels must be compiled with it)."""
    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]


def compile_command(out: Path) -> list[str]:
    """The compiler command line that builds the library into `out`."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    root = Path(torch.__file__).parent
    lib_dir, includes = root / "lib", [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"]
    # torch's headers say which C++ they need (recent ones refuse C++17 with an #error).
    aten_h = includes[0] / "ATen" / "ATen.h"
    std = "-std=c++20" if "C++20" in aten_h.read_text(errors="replace") else "-std=c++17"
    cmd = [cxx, "-O3", std, "-fPIC", "-shared", "-fno-trapping-math", "-fopenmp-simd", *_isa_flags(),
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += [f"-I{p}" for p in includes]
    cmd += [str(SOURCE), "-o", str(out), f"-L{lib_dir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib_dir}"]
    if _openmp():
        # The library's NEEDED libgomp.so.1 resolves at load time to the libgomp torch already loaded (its wheels
        # bundle one with that SONAME), so the operators run in torch's OpenMP thread pool, not a second one.
        cmd[1:1] = ["-fopenmp"]
    return cmd


def library_path() -> Path:
    """The library for this torch, source and CPU (it may not exist yet)."""
    key = "\n".join([SOURCE.read_text(), torch.__version__, platform.machine(), " ".join(_isa_flags()),
                     str(_openmp()), str(int(torch._C._GLIBCXX_USE_CXX11_ABI))])
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "ops" / f"{LIBRARY_NAME}-torch{torch.__version__.split('+')[0]}-{tag}.so"


def build(path: Path | None = None, verbose: bool = True) -> Path:
    """Compile the library into `path` (default `library_path()`) unless it is there already; return the path."""
    path = library_path() if path is None else path

    def compile_into(tmp: Path) -> None:
        if verbose:
            print(f"ipu_norm: building the Proxy Norm CPU operators once for torch {torch.__version__} "
                  f"(~20 s) into {path.parent}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        run = subprocess.run(compile_command(tmp / path.name), capture_output=True, text=True)
        if run.returncode != 0:
            errors = [ln for ln in run.stderr.splitlines() if "error" in ln] or run.stderr.splitlines()[-1:]
            raise RuntimeError(f"the C++ compiler failed: {errors[0].strip() if errors else run.returncode}")
        if verbose:
            print(f"ipu_norm: built {path.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    return build_once(path, compile_into)


def load() -> bool:
    """Build (once) and register the operators in this process; True when they are available.

    Failure is not an error: one RuntimeWarning names the reason and the layers use the ATen path.
    """
    global _loaded
    if _loaded is None:
        if all(hasattr(torch.ops.ipu_norm, op) for op in OPS):  # registered already (e.g. by another loader)
            _loaded = True
            return _loaded
        try:
            torch.ops.load_library(str(build()))
            _loaded = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            warnings.warn(f"ipu_norm's Proxy Norm CPU operators are unavailable ({exc}); the layers use the "
                          "slower ATen path instead (same results)", RuntimeWarning, stacklevel=2)
            _loaded = False
    return _loaded


def usable_for(x: torch.Tensor) -> bool:
    """Whether the operators take tensor `x` (CPU, float32/float64, contiguous) in this process."""
    return _loaded is True and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and (
        x.is_contiguous())


def main() -> int:
    """`python -m ipu_norm.ops.native`: build the operators ahead of time and check they load."""
    ok = load()
    print(f"{'ok' if ok else 'unavailable'}: {library_path()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
