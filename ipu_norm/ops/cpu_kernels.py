"""CPU C kernels of the norm layers, called through ctypes (csrc/*.c, one shared library).

- Fused GroupNorm + ReLU/SiLU/GELU, optionally with Proxy Norm's per-channel scale/shift (csrc/gn_act_cpu.c,
  `GroupNormAct`): statistics, normalisation, activation and PN in one kernel each way, one (sample, group)
  block at a time while it is in cache; saves only x and the (N, G) statistics.
- Fused training-mode BatchNorm + ReLU (csrc/bn_act_cpu.c, `BatchNormAct2d`): one channel at a time.
- PN-Act (csrc/pn_act_cpu.c, standalone `ProxyNormAct` after a norm without affine): out = phi(u) * scale + shift
  in one pass, and in backward grad_u, sum(grad_out * phi(u)) and sum(grad_out) per channel in one pass;
  likewise relu(u) + shift, the ReLU PN-Act once the PN scale is folded into GroupNorm.
- Scaled Weight Standardization (csrc/ws_cpu.c, `ipu_norm.layers.weight_std`): one weight row at a time, forward
  and backward, with the unit-wise squared norms of the weight and of its gradient that AGC needs as by-products.
- Proxy statistics (csrc/proxy_stats_cpu.c): the CPU implementation of the ``ipu_norm::proxy_stats`` op (with
  the moments for its O(C) first-order backward) and of its backward op, one (n,) row at a time (6-9x faster
  than the ATen implementation on EfficientNet-B0's 19,200 batched channels; used at any thread count).

GroupNormAct reaches its kernels through a small C++ autograd op (csrc/gn_act_op.cpp, ``ipu_norm_cpp::gn_act``,
built with torch's cpp_extension; ``IPU_NORM_CPP_OPS=0`` disables it): its autograd glue in Python cost about as much
as the kernels on small planes. Without it, a Python autograd function calls the same kernels.

Built at first use with the system C compiler into a per-user cache directory (``IPU_NORM_EXT_DIR``, default
``~/.cache/ipu_norm``), a few seconds; set ``IPU_NORM_CPU_KERNELS=0`` to disable them. Where they cannot be built
or do not apply (no compiler, not CPU, not float32/float64, not contiguous, more than one intra-op thread: the
norm kernels are single-threaded, ATen's are parallel) callers use the ATen path, which computes the same
function (tested against each other).
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

from ipu_norm.compat import is_compiling

_SRCS = tuple(
    Path(__file__).with_name("csrc") / f
    for f in ("pn_act_cpu.c", "proxy_stats_cpu.c", "gn_act_cpu.c", "bn_act_cpu.c", "ws_cpu.c")
)
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


def _build(srcs: tuple[Path, ...], out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs, lib = [Path(tmp) / f"{src.stem}.o" for src in srcs], Path(tmp) / out.name
        # -ffast-math at compile time only (it lets GCC call libmvec's vector expf/erff); linking with it would add
        # crtfastmath.o, which switches the whole process to flush-denormals-to-zero on load.
        for src, obj in zip(srcs, objs):
            subprocess.run([cc, *_CFLAGS, "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
        subprocess.run([cc, "-shared", *map(str, objs), "-o", str(lib), "-lmvec", "-lm"], check=True,
                       capture_output=True)
        os.replace(lib, out)  # atomic: concurrent builders (test workers, DDP ranks) never load a partial file


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("IPU_NORM_CPU_KERNELS", "1") == "0" or os.name != "posix":
        return None
    src = b"".join(f.read_bytes() for f in _SRCS)
    tag = hashlib.sha256(src + " ".join(_CFLAGS).encode() + _cpu_tag()).hexdigest()[:16]
    root = Path(os.environ.get("IPU_NORM_EXT_DIR", Path.home() / ".cache" / "ipu_norm"))
    path = root / f"cpu_kernels-{tag}.so"
    try:
        if not path.exists():
            _build(_SRCS, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        warnings.warn(f"ipu_norm CPU C kernels unavailable ({exc}); using the ATen path", RuntimeWarning,
                      stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in ("f32", "f64"):
        getattr(lib, f"pn_act_forward_{suffix}").argtypes = [ptr] * 4 + [i64] * 3 + [ctypes.c_int] * 2
        getattr(lib, f"pn_act_backward_{suffix}").argtypes = [ptr] * 6 + [i64] * 3 + [ctypes.c_int] * 2
        getattr(lib, f"relu_shift_forward_{suffix}").argtypes = [ptr] * 3 + [i64] * 3
        getattr(lib, f"relu_shift_backward_{suffix}").argtypes = [ptr] * 5 + [i64] * 3
        fwd, bwd = getattr(lib, f"proxy_stats_forward_{suffix}"), getattr(lib, f"proxy_stats_backward_{suffix}")
        fwd.argtypes = [ctypes.c_int, ptr, i64, i64] + [ptr] * 7
        bwd.argtypes = [ctypes.c_int, ptr, i64, i64] + [ptr] * 10
        fwd.restype = bwd.restype = ctypes.c_int
        getattr(lib, f"gn_act_forward_{suffix}").argtypes = [ptr] * 8 + [i64] * 4 + [ctypes.c_double, ctypes.c_int]
        getattr(lib, f"gn_act_backward_{suffix}").argtypes = [ptr] * 14 + [i64] * 4 + [ctypes.c_int]
        getattr(lib, f"bn_relu_forward_{suffix}").argtypes = [ptr] * 7 + [i64] * 3 + [ctypes.c_double]
        getattr(lib, f"bn_relu_backward_{suffix}").argtypes = [ptr] * 9 + [i64] * 3
        getattr(lib, f"ws_forward_{suffix}").argtypes = [ptr] * 8 + [i64] * 2 + [ctypes.c_int] + [ctypes.c_double] * 2
        getattr(lib, f"ws_backward_{suffix}").argtypes = [ptr] * 9 + [i64] * 2
    lib.gn_act_scratch_bytes.argtypes = [i64] * 4 + [ctypes.POINTER(i64)]
    lib.gn_act_scratch_bytes.restype = i64
    return lib


_KERNEL_DTYPES = (torch.float32, torch.float64)


def _cpu_kernel_applies(u: torch.Tensor) -> bool:
    # Where the single-threaded C kernels of this module may replace ATen's ops on u (see the module docstring).
    # Called once per layer and step: cheap attribute checks only (u.is_cpu, not u.device.type, which builds a
    # device object).
    if is_compiling():
        return False  # an opaque ctypes call: torch.compile generates its own fused kernel for the ATen ops
    return (
        u.is_cpu
        and u.dtype in _KERNEL_DTYPES
        and u.dim() >= 2
        and u.is_contiguous()
        and torch.get_num_threads() == 1
        and _lib() is not None
    )


def fused_pn_act_applies(u: torch.Tensor, act: str) -> bool:
    """Whether the fused kernel for act ('silu', 'gelu', or 'relu_shift' for `fused_relu_shift_*`) can run on u.

    See the module docstring; builds the library on first call.
    """
    return (act in _ACT_CODES or act == "relu_shift") and _cpu_kernel_applies(u)


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


def fused_relu_shift_forward(u: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(u) + shift per channel in one pass (the ReLU PN-Act with the PN scale folded into GroupNorm)."""
    out = torch.empty_like(u)
    sh = shift.reshape(-1).to(u.dtype).contiguous()
    getattr(_lib(), f"relu_shift_forward_{_suffix(u)}")(u.data_ptr(), out.data_ptr(), sh.data_ptr(), *_dims(u))
    return out


def fused_relu_shift_backward(
    grad_out: torch.Tensor, out: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_u, sum grad_out per channel) from the saved output: relu'(u) = [out - shift > 0]."""
    g = grad_out.to(out.dtype).contiguous()
    grad_u = torch.empty_like(out)
    sums = torch.empty(out.shape[1], dtype=torch.float64)
    sh = shift.reshape(-1).to(out.dtype).contiguous()
    getattr(_lib(), f"relu_shift_backward_{_suffix(out)}")(
        g.data_ptr(), out.data_ptr(), grad_u.data_ptr(), sh.data_ptr(), sums.data_ptr(), *_dims(out)
    )
    return grad_u, sums.to(out.dtype)


# ----------------------------------------------------------------------------------------------------------
# Fused GroupNorm + ReLU/SiLU/GELU (+ Proxy Norm scale/shift): csrc/gn_act_cpu.c.


_GN_ACT_CODES = {"relu": 0, **_ACT_CODES}


def fused_gn_act_applies(x: torch.Tensor, weight: torch.Tensor, act: str) -> bool:
    """Whether the fused GroupNorm-activation kernel (ReLU, SiLU, GELU) can run on x (N, C, *) with this weight."""
    return act in _GN_ACT_CODES and weight.dtype == x.dtype and _cpu_kernel_applies(x)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _vec(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    # t (a (C,) parameter or statistics slice, or an incoming gradient) contiguous in like's dtype. The attribute
    # checks first: .to and .contiguous return t itself when nothing is to do, but each is still a dispatcher call,
    # and between heavy kernels (caches cold) every such call costs several microseconds.
    if t is None or (t.dtype == like.dtype and t.is_contiguous()):
        return t
    return t.to(like.dtype).contiguous()


@functools.cache
def _fn(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    # The ctypes function of one kernel for one dtype (f32/f64), looked up once.
    return getattr(_lib(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


@functools.lru_cache(maxsize=256)
def _gn_work_bytes(c: int, cg: int, s: int, itemsize: int) -> tuple[int, int]:
    # (total bytes, offset of the T workspace) of the backward's one scratch buffer (gn_act_scratch_bytes).
    offset = ctypes.c_int64()
    return _lib().gn_act_scratch_bytes(c, cg, s, itemsize, ctypes.byref(offset)), offset.value


_OP_SRC = Path(__file__).with_name("csrc") / "gn_act_op.cpp"


@functools.lru_cache(maxsize=1)
def _cpp_ops() -> bool:
    """Whether the C++ autograd op ``ipu_norm_cpp::gn_act`` (csrc/gn_act_op.cpp) is loaded.

    Built at first use with torch's cpp_extension (about 20 s, needs ninja and a C++ compiler) into the same cache
    directory as the C library, whose kernels it calls; ``IPU_NORM_CPP_OPS=0`` disables it. Where it cannot be
    built, GroupNormAct keeps the Python autograd function around the same kernels (`fused_gn_act_forward` /
    `fused_gn_act_backward`): same results, more interpreter work per layer.
    """
    if os.environ.get("IPU_NORM_CPP_OPS", "1") == "0" or _lib() is None:
        return False
    import logging  # noqa: PLC0415

    # cpp_extension logs a CUDA_HOME warning at import on machines without CUDA: irrelevant for this CPU op.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension  # noqa: PLC0415

        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not available")
        src = _OP_SRC.read_bytes()
        tag = hashlib.sha256(src + torch.__version__.encode() + _cpu_tag()).hexdigest()[:16]
        root = Path(os.environ.get("IPU_NORM_EXT_DIR", Path.home() / ".cache" / "ipu_norm"))
        so = root / f"gn_act_op-{tag}.so"
        if so.exists():
            torch.ops.load_library(str(so))
        else:
            # Built in a directory of this process's own (no shared lock file that a killed build could leave
            # behind), then moved into place atomically for the next processes.
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                name = f"ipu_norm_gn_act_op_{tag}"
                cpp_extension.load(name=name, sources=[str(_OP_SRC)], build_directory=tmp, extra_cflags=["-O2"],
                                   is_python_module=False, verbose=False)
                os.replace(Path(tmp) / f"{name}.so", so)
        lib = _lib()
        addr = [ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in (
            "gn_act_forward_f32", "gn_act_forward_f64", "gn_act_backward_f32", "gn_act_backward_f64",
            "gn_act_scratch_bytes")]
        torch.ops.ipu_norm_cpp.set_kernels(*addr)
    except Exception as exc:  # noqa: BLE001 - any build or load failure: the Python path serves
        warnings.warn(f"ipu_norm C++ op unavailable ({exc}); GroupNormAct uses its Python autograd function",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def fused_gn_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
    shift: torch.Tensor | None, num_groups: int, eps: float, act: str,
) -> torch.Tensor | None:
    """phi(group_norm(x) * weight + bias) [* scale + shift] through the C++ autograd op (differentiable, first
    order), or None where that op is not available (the caller then uses its Python autograd function)."""
    if not _cpp_ops():
        return None
    return torch.ops.ipu_norm_cpp.gn_act(x, weight, bias, _vec(scale, x), _vec(shift, x), num_groups, eps,
                                         _GN_ACT_CODES[act])


def fused_gn_act_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
    shift: torch.Tensor | None, num_groups: int, eps: float, act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats): out = phi(group_norm(x) * weight + bias) [* scale + shift]; stats (2, N, G) = (mean, rstd).

    Few torch calls on purpose (see `_vec`): one allocation each for out and stats, pointers into stats.
    """
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    out = torch.empty_like(x)
    stats = x.new_empty((2, n, num_groups))
    sc, sh = _vec(scale, x), _vec(shift, x)  # held: a converted copy must outlive the call
    sp = stats.data_ptr()
    _fn("gn_act_forward", x.dtype)(
        x.data_ptr(), out.data_ptr(), weight.data_ptr(), bias.data_ptr(), _ptr(sc), _ptr(sh),
        sp, sp + n * num_groups * x.element_size(), n, c, s, num_groups, eps, _GN_ACT_CODES[act],
    )
    return out, stats


def fused_gn_act_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
    stats: torch.Tensor, num_groups: int, act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift); the last two None when scale is None.

    stats: the forward's (2, N, G) (mean, rstd). Allocations: grad_x, the (2 or 4, C) parameter gradients and one
    scratch buffer (accumulators and the phi/phi' workspace).
    """
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    isz = x.element_size()
    g = _vec(grad_out, x)
    grad_x = torch.empty_like(x)
    grads = x.new_empty((4 if scale is not None else 2, c))
    nbytes, work_off = _gn_work_bytes(c, c // num_groups, s, isz)
    scratch = torch.empty(nbytes, dtype=torch.uint8)
    sc = _vec(scale, x)  # held: a converted copy must outlive the call
    sp, gp, wp = stats.data_ptr(), grads.data_ptr(), scratch.data_ptr()
    row = c * isz
    _fn("gn_act_backward", x.dtype)(
        g.data_ptr(), x.data_ptr(), grad_x.data_ptr(), weight.data_ptr(), bias.data_ptr(), _ptr(sc),
        sp, sp + n * num_groups * isz, gp, gp + row, gp + 2 * row if sc is not None else None,
        gp + 3 * row if sc is not None else None, wp, wp + work_off, n, c, s, num_groups, _GN_ACT_CODES[act],
    )
    if sc is None:
        d_weight, d_bias = grads.unbind(0)
        return grad_x, d_weight, d_bias, None, None
    return (grad_x, *grads.unbind(0))


# ----------------------------------------------------------------------------------------------------------
# Fused training-mode BatchNorm + ReLU: csrc/bn_act_cpu.c.


def fused_bn_relu_applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether the fused BatchNorm (batch statistics, affine) + ReLU kernel can run on x (N, C, *)."""
    return weight is not None and weight.dtype == x.dtype and _cpu_kernel_applies(x)


def fused_bn_relu_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, invstd, biased var) of relu(batch_norm(x)) with the batch statistics, per channel (C,)."""
    n, c, s = _dims(x)
    out = torch.empty_like(x)
    stats = x.new_empty((3, c))
    getattr(_lib(), f"bn_relu_forward_{_suffix(x)}")(
        x.data_ptr(), out.data_ptr(), weight.data_ptr(), bias.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(),
        stats[2].data_ptr(), n, c, s, eps,
    )
    return out, stats[0], stats[1], stats[2]


def fused_bn_relu_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
    invstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of `fused_bn_relu_forward` (batch statistics)."""
    n, c, s = _dims(x)
    g = _vec(grad_out, x)
    grad_x = torch.empty_like(x)
    grads = x.new_empty((2, c))
    getattr(_lib(), f"bn_relu_backward_{_suffix(x)}")(
        g.data_ptr(), x.data_ptr(), grad_x.data_ptr(), weight.data_ptr(), bias.data_ptr(), mean.data_ptr(),
        invstd.data_ptr(), grads[0].data_ptr(), grads[1].data_ptr(), n, c, s,
    )
    return grad_x, grads[0], grads[1]


# ----------------------------------------------------------------------------------------------------------
# Proxy statistics.

_STATS_ACT_CODES = {"relu": 0, "silu": 1, "gelu": 2, "identity": 3}  # ipu_norm.ops.proxy_stats.PROXY_ACTS order
_STATS_MAX_QUANTILES = 4096  # MAX_N in csrc/proxy_stats_cpu.c


def cpu_proxy_stats_applies(gamma: torch.Tensor, num_quantiles: int) -> bool:
    """Whether the proxy-statistics C kernel can serve the op for these (C,) inputs; builds it on first call."""
    return (
        gamma.device.type == "cpu"
        and gamma.dtype in (torch.float32, torch.float64)
        and num_quantiles <= _STATS_MAX_QUANTILES
        and _lib() is not None
    )


def cpu_proxy_stats_forward(
    act: str, q: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, var, moments) per channel of phi over the proxy variable (the ipu_norm::proxy_stats op's math).

    moments is (4, C): the per-channel sums from which the op's first-order backward is O(C)
    (`ipu_norm.ops.proxy_stats` docstring), computed in the same pass over each row.
    """
    ins = [t.contiguous() for t in (gamma, beta, proxy_gamma, proxy_beta)]
    mean, var = torch.empty_like(ins[0]), torch.empty_like(ins[0])
    moments = ins[0].new_empty((4, ins[0].numel()))
    rc = getattr(_lib(), f"proxy_stats_forward_{_suffix(gamma)}")(
        _STATS_ACT_CODES[act], q.data_ptr(), q.numel(), ins[0].numel(), *(t.data_ptr() for t in ins),
        mean.data_ptr(), var.data_ptr(), moments.data_ptr(),
    )
    if rc:
        raise RuntimeError(f"proxy_stats C kernel failed ({rc})")
    return mean, var, moments


def cpu_proxy_stats_backward(
    act: str, q: torch.Tensor, grad_mean: torch.Tensor, grad_var: torch.Tensor, gamma: torch.Tensor,
    beta: torch.Tensor, proxy_gamma: torch.Tensor, proxy_beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gamma, d beta, d proxy_gamma, d proxy_beta) of the ipu_norm::proxy_stats_backward op."""
    ins = [t.contiguous() for t in (gamma, beta, proxy_gamma, proxy_beta, grad_mean, grad_var)]
    outs = [torch.empty_like(ins[0]) for _ in range(4)]
    rc = getattr(_lib(), f"proxy_stats_backward_{_suffix(gamma)}")(
        _STATS_ACT_CODES[act], q.data_ptr(), q.numel(), ins[0].numel(), *(t.data_ptr() for t in ins),
        *(t.data_ptr() for t in outs),
    )
    if rc:
        raise RuntimeError(f"proxy_stats C kernel failed ({rc})")
    return tuple(outs)


# ----------------------------------------------------------------------------------------------------------
# Scaled Weight Standardization: csrc/ws_cpu.c.

_WS_FORM_CODES = {"deepmind": 0, "timm": 1}


def ws_kernel_applies(weight: torch.Tensor) -> bool:
    """Whether the weight-standardization kernel can run on this (out, ...) weight."""
    return _cpu_kernel_applies(weight)


def ws_forward(
    weight: torch.Tensor, gain: torch.Tensor | None, form: str, eps: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_hat, mean, invstd, c, clamped, sum W^2) per row of weight; the per-row vectors are (out,).

    W_hat = (W - mean) * invstd * c as in `ipu_norm.layers.weight_std._ScaledStdWeightFn`; clamped (bool) marks
    DeepMind's clamped rows (all False for timm's form); the row sums of squares are float64.
    """
    out = weight.shape[0]
    y = torch.empty_like(weight)
    vecs = weight.new_empty((3, out))
    clamped = torch.empty(out, dtype=torch.bool)
    wsq = torch.empty(out, dtype=torch.float64)
    gain_vec = _vec(None if gain is None else gain.reshape(-1), weight)  # held: a converted copy must outlive the call
    _fn("ws_forward", weight.dtype)(
        weight.data_ptr(), y.data_ptr(), _ptr(gain_vec),
        vecs[0].data_ptr(), vecs[1].data_ptr(), vecs[2].data_ptr(), clamped.data_ptr(), wsq.data_ptr(), out,
        weight.numel() // max(out, 1), _WS_FORM_CODES[form], eps, gamma,
    )
    return y, vecs[0], vecs[1], vecs[2], clamped, wsq


def ws_backward(
    grad_out: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, c: torch.Tensor,
    clamped: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dW, dL/dc per row, sum (dL/dW)^2 per row in float64) of `ws_forward`'s W_hat."""
    out = weight.shape[0]
    g = _vec(grad_out, weight)
    grad_w = torch.empty_like(weight)
    grad_c = weight.new_empty(out)
    gsq = torch.empty(out, dtype=torch.float64)
    _fn("ws_backward", weight.dtype)(
        g.data_ptr(), weight.data_ptr(), grad_w.data_ptr(), mean.data_ptr(), invstd.data_ptr(), c.data_ptr(),
        clamped.data_ptr(), grad_c.data_ptr(), gsq.data_ptr(), out, weight.numel() // max(out, 1),
    )
    return grad_w, grad_c, gsq
