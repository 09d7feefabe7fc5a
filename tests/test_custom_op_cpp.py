"""The C++ side of the proxy statistics: the header-only kernel (custom_ops/proxy_stats_kernel.hpp)
through its C ABI shim, compiled here with the system C++ compiler and called with ctypes, against the
PyTorch op; the Makefile's behaviour without the Poplar SDK; and (marked `ipu`, skipped without
poptorch) the PopART op on the IPU Model against the PyTorch op.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from ipu_norm.ops.proxy_stats import PROXY_ACTS, gaussian_quantiles, proxy_stats

REPO = Path(__file__).resolve().parents[1]
CUSTOM_OPS = REPO / "custom_ops"


def _find_cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CXX = _find_cxx()
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++/clang++) found on PATH")

_D = ctypes.POINTER(ctypes.c_double)
_F = ctypes.POINTER(ctypes.c_float)


def _compile_capi(tmp_path_factory: pytest.TempPathFactory, name: str) -> ctypes.CDLL:
    """Compile custom_ops/<name>.cpp (warnings are errors) into a tmp dir (never into the repo) and load it."""
    out = tmp_path_factory.mktemp(name) / f"lib{name}.so"
    cmd = [CXX, "-std=c++14", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
           str(CUSTOM_OPS / f"{name}.cpp"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return ctypes.CDLL(str(out))


@pytest.fixture(scope="module")
def capi(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """custom_ops/proxy_stats_capi.cpp, compiled and loaded."""
    lib = _compile_capi(tmp_path_factory, "proxy_stats_capi")
    i64, cstr = ctypes.c_int64, ctypes.c_char_p
    lib.ipu_norm_gaussian_quantiles_f64.argtypes = [i64, _D]
    lib.ipu_norm_proxy_stats_forward_f64.argtypes = [cstr, i64, i64] + [_D] * 6
    lib.ipu_norm_proxy_stats_backward_f64.argtypes = [cstr, i64, i64] + [_D] * 10
    lib.ipu_norm_proxy_stats_forward_f32.argtypes = [cstr, i64, i64] + [_F] * 6
    lib.ipu_norm_proxy_stats_backward_f32.argtypes = [cstr, i64, i64] + [_F] * 10
    return lib


def _ptr(a: np.ndarray) -> ctypes._Pointer:
    assert a.flags.c_contiguous
    return a.ctypes.data_as(_D if a.dtype == np.float64 else _F)


def _cpp_forward(lib: ctypes.CDLL, act: str, n: int, params: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    dt = params[0].dtype
    fn = lib.ipu_norm_proxy_stats_forward_f64 if dt == np.float64 else lib.ipu_norm_proxy_stats_forward_f32
    mean, var = np.empty_like(params[0]), np.empty_like(params[0])
    rc = fn(act.encode(), n, params[0].size, *map(_ptr, params), _ptr(mean), _ptr(var))
    assert rc == 0
    return mean, var


def _cpp_backward(lib: ctypes.CDLL, act: str, n: int, params: list[np.ndarray], gm: np.ndarray,
                  gv: np.ndarray) -> list[np.ndarray]:
    dt = params[0].dtype
    fn = lib.ipu_norm_proxy_stats_backward_f64 if dt == np.float64 else lib.ipu_norm_proxy_stats_backward_f32
    outs = [np.empty_like(params[0]) for _ in range(4)]
    rc = fn(act.encode(), n, params[0].size, *map(_ptr, params), _ptr(gm), _ptr(gv), *map(_ptr, outs))
    assert rc == 0
    return outs


def _random_params(c: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    g = rng.normal(size=c) * 1.5
    g[0] = -abs(g[0]) - 0.5  # negative gamma
    return [g, rng.normal(size=c), 0.5 * rng.normal(size=c), 0.5 * rng.normal(size=c)]


@needs_cxx
@pytest.mark.parametrize("n", [2, 3, 200, 201, 5000])
def test_quantiles_match_torch(capi: ctypes.CDLL, n: int) -> None:
    q = np.empty(n)
    assert capi.ipu_norm_gaussian_quantiles_f64(n, _ptr(q)) == 0
    np.testing.assert_allclose(q, gaussian_quantiles(n, dtype=torch.float64).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(q, -q[::-1])  # exactly symmetric


@needs_cxx
@pytest.mark.parametrize("act", PROXY_ACTS)
@pytest.mark.parametrize("n", [200, 31])
def test_kernel_matches_torch_op_float64(capi: ctypes.CDLL, act: str, n: int) -> None:
    params = _random_params(11)
    mean, var = _cpp_forward(capi, act, n, params)
    tparams = [torch.from_numpy(p.copy()).requires_grad_() for p in params]
    t_mean, t_var = proxy_stats(*tparams, act=act, num_quantiles=n)
    np.testing.assert_allclose(mean, t_mean.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(var, t_var.detach().numpy(), rtol=1e-10, atol=1e-10)

    rng = np.random.default_rng(7)
    gm, gv = rng.normal(size=11), rng.normal(size=11)
    grads = _cpp_backward(capi, act, n, params, gm, gv)
    t_grads = torch.autograd.grad((t_mean * torch.from_numpy(gm) + t_var * torch.from_numpy(gv)).sum(), tparams)
    for got, want in zip(grads, t_grads):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)


@needs_cxx
def test_kernel_float32(capi: ctypes.CDLL) -> None:
    params = [p.astype(np.float32) for p in _random_params(8)]
    gm, gv = np.ones(8, np.float32), np.full(8, 0.5, np.float32)
    for act in PROXY_ACTS:
        mean, var = _cpp_forward(capi, act, 200, params)
        tparams = [torch.from_numpy(p.copy()).double().requires_grad_() for p in params]
        t_mean, t_var = proxy_stats(*tparams, act=act)
        np.testing.assert_allclose(mean, t_mean.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var, t_var.detach().numpy(), rtol=1e-5, atol=1e-5)
        grads = _cpp_backward(capi, act, 200, params, gm, gv)
        t_grads = torch.autograd.grad((t_mean + 0.5 * t_var).sum(), tparams)
        for got, want in zip(grads, t_grads):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


@needs_cxx
def test_kernel_rejects_bad_arguments(capi: ctypes.CDLL) -> None:
    params = _random_params(3)
    mean, var = np.empty(3), np.empty(3)
    fwd = capi.ipu_norm_proxy_stats_forward_f64
    assert fwd(b"tanh", 200, 3, *map(_ptr, params), _ptr(mean), _ptr(var)) == 1
    assert fwd(b"relu", 1, 3, *map(_ptr, params), _ptr(mean), _ptr(var)) == 2


@needs_cxx
@pytest.mark.skipif(shutil.which("make") is None, reason="make not found")
def test_make_test_kernel_target(tmp_path: Path) -> None:
    res = subprocess.run(["make", "-C", str(CUSTOM_OPS), "test-kernel", f"BUILD={tmp_path}", f"CXX={CXX}"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "libproxy_stats_capi.so").is_file() and (tmp_path / "libagc_micro_capi.so").is_file()


def _sdk_present() -> bool:
    if os.environ.get("POPLAR_SDK_ENABLED"):
        return True
    try:
        import popart  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(shutil.which("make") is None, reason="make not found")
@pytest.mark.skipif(_sdk_present(), reason="the Poplar SDK is present: the library would build")
def test_make_without_sdk_fails_with_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("POPLAR_SDK_ENABLED", "CPATH")}
    res = subprocess.run(["make", "-C", str(CUSTOM_OPS), f"BUILD={tmp_path}", f"PYTHON={sys.executable}"],
                         capture_output=True, text=True, env=env)
    assert res.returncode != 0
    assert "Poplar SDK not found: source <sdk>/enable.sh" in res.stderr
    out = res.stdout + res.stderr
    assert "error:" not in out and "fatal error" not in out  # stopped before any compiler ran
    assert not (tmp_path / "custom_ops.so").exists()


def test_popart_source_registers_the_python_names() -> None:
    """The identifiers in the PopART source match what proxy_stats_ipu passes to poptorch.custom_op."""
    from ipu_norm.ops import proxy_stats_ipu as ipu

    src = (CUSTOM_OPS / "proxy_stats_popart.cpp").read_text()
    assert re.search(rf'\{{"{ipu.CUSTOM_OP_DOMAIN}", "{ipu.CUSTOM_OP_NAME}", {ipu.CUSTOM_OP_VERSION}, \{{4, 4\}}, 2\}}',
                     src)
    for attr in ('"activation"', '"num_quantiles"'):
        assert f"getAttribute<popart::Attributes::String>({attr}" in src or f"({attr}," in src
    # the activation codes the header parses, in the order of PROXY_ACTS
    header = (CUSTOM_OPS / "proxy_stats_kernel.hpp").read_text()
    assert '{"relu", "silu", "gelu", "identity"}' in header and PROXY_ACTS == ("relu", "silu", "gelu", "identity")


# ----------------------------------------------------------------------------------------------------------
# Micro-batch AGC: the host reference of the PopART op (custom_ops/agc_micro_kernel.hpp) against the CPU/GPU
# variant (ipu_norm.ops.agc_micro.clip_unitwise), and the op's registration against the Python side.


@pytest.fixture(scope="module")
def agc_capi(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    lib = _compile_capi(tmp_path_factory, "agc_micro_capi")
    i64, dbl = ctypes.c_int64, ctypes.c_double
    lib.ipu_norm_agc_micro_clip_f64.argtypes = [i64, i64, _D, _D, dbl, dbl, dbl, _D]
    lib.ipu_norm_agc_micro_clip_f32.argtypes = [i64, i64, _F, _F, dbl, dbl, dbl, _F]
    return lib


@needs_cxx
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7), (9,), ()])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [1.0, 128.0])
def test_agc_kernel_matches_cpu_variant(agc_capi: ctypes.CDLL, shape: tuple[int, ...], dtype: type,
                                        scale: float) -> None:
    from ipu_norm.ops.agc_micro import clip_unitwise

    rng = np.random.default_rng(len(shape))
    w = rng.normal(size=shape).astype(dtype)
    g = (rng.normal(size=shape) * np.logspace(-3, 0.5, w.size).reshape(shape) * scale).astype(dtype)
    if len(shape) > 1:
        w[1] = 0.0  # a unit below eps
    rows = shape[0] if len(shape) >= 2 else 1
    w, g = np.ascontiguousarray(w), np.ascontiguousarray(g)
    out = np.empty_like(g)
    fn = agc_capi.ipu_norm_agc_micro_clip_f64 if dtype == np.float64 else agc_capi.ipu_norm_agc_micro_clip_f32
    assert fn(rows, max(1, g.size // rows), _ptr(g), _ptr(w), 0.02, 1e-3, scale, _ptr(out)) == 0
    want = clip_unitwise(torch.from_numpy(g.copy()), torch.from_numpy(w.copy()), 0.02, 1e-3, scale).numpy()
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(out, want, rtol=tol, atol=0)
    assert not np.array_equal(out, g) or len(shape) == 0  # some unit was clipped


@needs_cxx
def test_agc_kernel_rejects_bad_arguments(agc_capi: ctypes.CDLL) -> None:
    g = np.ones(4)
    out = np.empty(4)
    fn = agc_capi.ipu_norm_agc_micro_clip_f64
    assert fn(2, 2, _ptr(g), _ptr(g), 0.0, 1e-3, 1.0, _ptr(out)) == -1  # clip must be > 0
    assert fn(0, 2, _ptr(g), _ptr(g), 0.1, 1e-3, 1.0, _ptr(out)) == -1
    assert fn(2, 2, _ptr(g), _ptr(g), 0.1, 1e-3, 0.0, _ptr(out)) == -1


def test_agc_popart_source_registers_the_python_names() -> None:
    from ipu_norm.ops import agc_micro

    src = AGC_POPART_SRC.read_text()
    m = agc_micro
    ident = f'{{"{m.CUSTOM_OP_DOMAIN}", "{m.CUSTOM_OP_NAME}", {m.CUSTOM_OP_VERSION}, {{1, 1}}, 1}}'
    assert ident in src
    for attr in ("clip", "eps", "loss_scale"):
        assert f'getAttribute<popart::Attributes::Float>("{attr}"' in src
    assert "agc_micro_popart.cpp" in (CUSTOM_OPS / "Makefile").read_text()


# ----------------------------------------------------------------------------------------------------------
# The PopART op source, compiled (g++ -fsyntax-only) against SDK 3.4.0 declarations (the release the
# PopTorch API conformance work and shared/REFERENCE.md are written against): always against the
# stand-in declarations in custom_ops/sdk_decls (written for this project), and, where a copy of the
# public Graphcore headers exists, against the real popart/poplibs/poprithms headers plus the stand-in
# poplar declarations (Poplar's own headers are not public).

POPART_SRC = CUSTOM_OPS / "proxy_stats_popart.cpp"
SDK_DECLS = CUSTOM_OPS / "sdk_decls"
# (repository under github.com/graphcore, its public include dir, a header that must be there, the
# release tags to use, best first, and (header, text) that only the 3.4 release's headers have, or None).
# The public poprithms repository has no 3.3 or 3.4 tag: popart 3.4 builds poprithms from its master
# branch, and the newest commit on any branch of the public poprithms repository is 7396145
# (2022-10-05), tagged sdk/poplar/3.2.0 (and 3.1.0); popart 3.4's headers compile against it (they use
# only its inplace/multiout graph declarations). A clone with a later tag listed here gets that one.
PUBLIC_HEADER_SOURCES = (
    ("popart", "willow/include", "popart/op.hpp", ("sdk/poplar/3.4.0",),
     ("popart/op.hpp", "inputUnmodifiableFor(")),  # added in 3.4 (with popart/alias/aliasmodelgrower.hpp)
    ("poplibs", "include", "popops/ElementWise.hpp", ("sdk/poplar/3.4.0",),
     ("popops/HostSliceTensor.hpp", "const size_t offset,")),  # the createHostSliceableTensor overload of 3.4
    ("poprithms", "poprithms/poprithms/include", "poprithms/memory/inplace/proposal.hpp",
     ("sdk/poplar/3.4.0", "sdk/poplar/3.3.0", "sdk/poplar/3.2.0"), None),
)


def _is_release(dirs: Sequence[Path], marker: tuple[str, str] | None) -> bool:
    """Whether the header `marker[0]` in one of dirs contains `marker[1]` (True when there is no marker)."""
    if marker is None:
        return True
    header, text = marker
    return any((d / header).is_file() and text in (d / header).read_text() for d in dirs)


# Where git clones (plain `git clone`, or this workspace's mirrors <owner>+<name>/repo) are looked for.
GRAPHCORE_SRC_DEFAULT = "/work/.mirror"


def _syntax_check(src: Path, includes: Sequence[Path],
                  system_includes: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """g++ -fsyntax-only on one PopART op source with exactly these include dirs (no CPATH)."""
    cmd = [CXX, "-std=c++14", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           "-DONNX_NAMESPACE=onnx",  # as the Makefile and popart's own build define it
           "-iquote", str(CUSTOM_OPS)]
    for d in system_includes:  # the Graphcore headers: their own warnings are not ours to fix
        cmd += ["-isystem", str(d)]
    for d in includes:
        cmd += ["-I", str(d)]
    env = {k: v for k, v in os.environ.items() if k not in ("CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH")}
    return subprocess.run(cmd + [str(src)], capture_output=True, text=True, env=env)


def _git_dir(root: Path, name: str) -> Path | None:
    for cand in (root / f"graphcore+{name}" / "repo", root / name):
        if cand.is_dir() and subprocess.run(["git", "-C", str(cand), "rev-parse", "--git-dir"],
                                            capture_output=True).returncode == 0:
            return cand
    return None


def _extract_public_headers(root: Path, dest: Path) -> tuple[list[Path], list[str]]:
    """`git archive` each repository's include dir at its release tag into dest; skip if one is missing."""
    if shutil.which("git") is None:
        pytest.skip("git not found (needed to extract the public popart/poplibs/poprithms headers)")
    dirs, used = [], []
    for name, inc, probe, tags, marker in PUBLIC_HEADER_SOURCES:
        gitdir = _git_dir(root, name)
        if gitdir is None:
            pytest.skip(f"no git clone of graphcore/{name} under {root} (looked for {root}/graphcore+{name}/repo "
                        f"and {root}/{name}); set IPU_NORM_GRAPHCORE_SRC to a directory holding clones of "
                        "graphcore/popart, poplibs and poprithms, or IPU_NORM_POPART_INCLUDE to their include dirs")
        tag = next((t for t in tags if subprocess.run(["git", "-C", str(gitdir), "rev-parse", "--verify", "-q",
                                                       f"refs/tags/{t}"], capture_output=True).returncode == 0), None)
        if tag is None:
            pytest.skip(f"graphcore/{name} at {gitdir} has none of the tags {tags}")
        out = dest / name
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(gitdir), "archive", tag, inc], capture_output=True)
        assert archive.returncode == 0, archive.stderr.decode()
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
        assert (out / inc / probe).is_file(), f"{probe} not in graphcore/{name}:{inc} at {tag}"
        assert _is_release([out / inc], marker), f"graphcore/{name} at {tag}: {marker} not found (not SDK 3.4)"
        dirs.append(out / inc)
        used.append(f"graphcore/{name}@{tag}")
    return dirs, used


@pytest.fixture(scope="module")
def real_sdk_headers(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """(system include dirs of the real headers, our include dirs to add), or skip saying what is missing.

    IPU_NORM_POPART_INCLUDE (os.pathsep-separated) names include dirs that together hold popart/, popops/,
    poputil/ and poprithms/ (an SDK's include dir, or extracted sources); otherwise the headers are
    extracted from git clones under IPU_NORM_GRAPHCORE_SRC (default /work/.mirror). The stand-in poplar
    declarations are added only where no real poplar/Tensor.hpp is among those dirs.
    """
    explicit = os.environ.get("IPU_NORM_POPART_INCLUDE")
    if explicit:
        dirs = [Path(d) for d in explicit.split(os.pathsep) if d]
        for name, _, probe, _, marker in PUBLIC_HEADER_SOURCES:
            assert any((d / probe).is_file() for d in dirs), f"IPU_NORM_POPART_INCLUDE={explicit}: no {probe}"
            assert _is_release(dirs, marker), (f"IPU_NORM_POPART_INCLUDE={explicit}: {name} headers are not "
                                               f"SDK 3.4 ({marker[1]!r} not in {marker[0]})")
    else:
        root = Path(os.environ.get("IPU_NORM_GRAPHCORE_SRC", GRAPHCORE_SRC_DEFAULT))
        dirs, _ = _extract_public_headers(root, tmp_path_factory.mktemp("graphcore_headers"))
    ours = [] if any((d / "poplar" / "Tensor.hpp").is_file() for d in dirs) else [SDK_DECLS]
    return dirs, ours


AGC_POPART_SRC = CUSTOM_OPS / "agc_micro_popart.cpp"


@needs_cxx
@pytest.mark.parametrize("src", [POPART_SRC, AGC_POPART_SRC], ids=lambda p: p.stem)
def test_popart_op_compiles_against_standin_declarations(src: Path) -> None:
    res = _syntax_check(src, [SDK_DECLS / "standin", SDK_DECLS])
    assert res.returncode == 0, res.stderr


@needs_cxx
@pytest.mark.parametrize("src", [POPART_SRC, AGC_POPART_SRC], ids=lambda p: p.stem)
def test_popart_op_compiles_against_real_popart_headers(real_sdk_headers: tuple[list[Path], list[Path]],
                                                        src: Path) -> None:
    system, ours = real_sdk_headers
    res = _syntax_check(src, ours, system)
    assert res.returncode == 0, res.stderr


# Source edits that the real API rejects (a checker that accepts them checks nothing): grow must be a
# const override, gradOutToNonGradIn returns a const reference, a reduction scale is a tensor.
_BREAKING_EDITS = (
    ("void grow(poplar::program::Sequence &prog) const final {", "void grow(poplar::program::Sequence &prog) final {"),
    ("const std::map<int, int> &gradOutToNonGradIn() const final {",
     "std::map<int, int> gradOutToNonGradIn() const final {"),
    ("{popops::Operation::ADD, false, t.invN}", "{popops::Operation::ADD, 0.5f}"),
)


@needs_cxx
@pytest.mark.parametrize("headers", ["standin", "real"])
@pytest.mark.parametrize("edit", range(len(_BREAKING_EDITS)))
def test_popart_syntax_check_rejects_api_misuse(headers: str, edit: int, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    old, new = _BREAKING_EDITS[edit]
    src = POPART_SRC.read_text()
    assert src.count(old) >= 1, f"the op source no longer contains {old!r}: update _BREAKING_EDITS"
    broken = tmp_path / POPART_SRC.name
    broken.write_text(src.replace(old, new))
    if headers == "standin":
        res = _syntax_check(broken, [SDK_DECLS / "standin", SDK_DECLS])
    else:
        system, ours = request.getfixturevalue("real_sdk_headers")
        res = _syntax_check(broken, ours, system)
    assert res.returncode != 0 and "error" in res.stderr, res.stderr

# ----------------------------------------------------------------------------------------------------------
# IPU Model (needs the Poplar SDK; skipped here by conftest without poptorch).


def _build_library() -> None:
    res = subprocess.run(["make", "-C", str(CUSTOM_OPS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


class _StatsModel(torch.nn.Module):
    def __init__(self, c: int, act: str) -> None:
        super().__init__()
        self.act = act
        gen = torch.Generator().manual_seed(0)
        self.gamma = torch.nn.Parameter(torch.randn(c, generator=gen))
        self.beta = torch.nn.Parameter(torch.randn(c, generator=gen))
        self.proxy_gamma = torch.nn.Parameter(0.3 * torch.randn(c, generator=gen))
        self.proxy_beta = torch.nn.Parameter(0.3 * torch.randn(c, generator=gen))

    def forward(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, var = proxy_stats(self.gamma, self.beta, self.proxy_gamma, self.proxy_beta, self.act)
        loss = (mean * weights).sum() + (var * weights).sum()
        import poptorch

        return mean, var, poptorch.identity_loss(loss, reduction="none")


@pytest.mark.ipu
@pytest.mark.parametrize("act", PROXY_ACTS)
def test_popart_op_on_ipu_model(act: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import poptorch

    monkeypatch.setenv("POPTORCH_IPU_MODEL", "1")
    _build_library()
    model = _StatsModel(8, act)
    ref = _StatsModel(8, act)
    weights = torch.linspace(0.5, 1.5, 8)
    opts = poptorch.Options().useIpuModel(True)

    infer = poptorch.inferenceModel(model, opts)
    mean, var, _ = infer(weights)
    r_mean, r_var = proxy_stats(ref.gamma, ref.beta, ref.proxy_gamma, ref.proxy_beta, act)
    torch.testing.assert_close(mean, r_mean.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, r_var.detach(), rtol=1e-4, atol=1e-5)
    infer.detachFromDevice()

    # One SGD step (lr 1, no momentum) on the IPU equals one step with the reference gradients.
    train = poptorch.trainingModel(model, opts, optimizer=poptorch.optim.SGD(model.parameters(), lr=1.0))
    train(weights)
    train.copyWeightsToHost()
    r_mean, r_var = proxy_stats(ref.gamma, ref.beta, ref.proxy_gamma, ref.proxy_beta, act)
    grads = torch.autograd.grad((r_mean * weights).sum() + (r_var * weights).sum(), list(ref.parameters()))
    for p_ipu, p_ref, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p_ipu.detach(), (p_ref - g).detach(), rtol=1e-4, atol=1e-5)
    train.detachFromDevice()


class _AgcModel(torch.nn.Module):
    def __init__(self, clip: float) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import poptorch

        from ipu_norm.ops.agc_micro import micro_batch_agc

        out = x @ micro_batch_agc(self.weight, self.clip).t()
        return poptorch.identity_loss(out.pow(2).sum(), reduction="none")


@pytest.mark.ipu
def test_agc_popart_op_on_ipu_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """One SGD step (lr 1) through ipu_norm.MicroBatchAGC on the IPU Model equals W - clip(dL/dW) on the host."""
    import poptorch

    from ipu_norm.ops.agc_micro import clip_unitwise

    monkeypatch.setenv("POPTORCH_IPU_MODEL", "1")
    _build_library()
    model, ref = _AgcModel(0.01), _AgcModel(0.01)
    x = torch.linspace(-1.0, 1.0, 6).reshape(2, 3)
    opts = poptorch.Options().useIpuModel(True)
    train = poptorch.trainingModel(model, opts, optimizer=poptorch.optim.SGD(model.parameters(), lr=1.0))
    train(x)
    train.copyWeightsToHost()
    grad = torch.autograd.grad((x @ ref.weight.t()).pow(2).sum(), ref.weight)[0]
    want = ref.weight.detach() - clip_unitwise(grad, ref.weight.detach(), 0.01)
    torch.testing.assert_close(model.weight.detach(), want, rtol=1e-4, atol=1e-5)
    train.detachFromDevice()
