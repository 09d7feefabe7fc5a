"""The compiled Proxy Norm CPU operators (ipu_norm/ops/csrc/proxy_norm_ops.cpp, torch.ops.ipu_norm.*).

References are written here in float64 from the paper's formulas (torch.erfinv quantiles, explicit mean / variance),
independent of the operators and of ipu_norm's ATen path; gradients against autograd through those references.
Also: thread-count independence (bitwise), fake tensors and torch.compile, double backward, and the fallback when
the library cannot be built.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ipu_norm.layers import create_norm_act
from ipu_norm.ops import native

ROOT = Path(__file__).resolve().parents[1]
ACTS = ("relu", "silu", "gelu", "identity")
PHI = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu, "identity": lambda u: u}

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
    reason="no C++ compiler: the operators cannot be built (the ATen path is tested elsewhere)",
)


@pytest.fixture(scope="module", autouse=True)
def _ops() -> None:
    assert native.load(), "the operators should build wherever a C++ compiler is present"


def ref_affine(g, b, pg, pb, act: str, n: int = 200, eps: float = 0.03):  # noqa: ANN001, ANN201
    """float64: q_i = sqrt(2) erfinv((2i+1)/n - 1); z = phi(g ((1+pg) q + pb) + b); scale = 1/sqrt(var+eps)."""
    i = torch.arange(n, dtype=torch.float64)
    q = math.sqrt(2.0) * torch.erfinv((2 * i + 1) / n - 1)
    z = PHI[act](g[:, None] * ((1 + pg[:, None]) * q[None, :] + pb[:, None]) + b[:, None])
    mean = z.sum(1) / n
    var = ((z - mean[:, None]) ** 2).sum(1) / n
    scale = 1 / torch.sqrt(var + eps)
    return scale, -mean * scale


def params(c: int, dtype: torch.dtype = torch.float64, grad: bool = False, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ps = [1 + 0.5 * torch.randn(c, generator=gen, dtype=dtype)] + [
        0.5 * torch.randn(c, generator=gen, dtype=dtype) for _ in range(3)
    ]
    return [p.requires_grad_(grad) for p in ps]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n", [200, 7, 64])
def test_proxy_affine_float64_equals_reference(act: str, n: int) -> None:
    p = params(37)  # not a multiple of the 16-channel blocks
    scale, shift = torch.ops.ipu_norm.proxy_affine(*p, n, act, 0.03)
    r_scale, r_shift = ref_affine(*p, act, n)
    torch.testing.assert_close(scale, r_scale, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shift, r_shift, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ACTS)
def test_proxy_affine_float32_and_gradients_against_float64(act: str) -> None:
    p64 = params(50, grad=True)
    p32 = [t.detach().float().requires_grad_() for t in p64]
    s32, t32 = torch.ops.ipu_norm.proxy_affine(*p32, 200, act, 0.03)
    s64, t64 = ref_affine(*p64, act)
    torch.testing.assert_close(s32.double(), s64, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(t32.double(), t64, rtol=2e-5, atol=1e-6)
    w1, w2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    got = torch.autograd.grad((s32 * w1.float() + t32 * w2.float()).sum(), p32)
    want = torch.autograd.grad((s64 * w1 + t64 * w2).sum(), p64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_proxy_ops_gradcheck_and_gradgradcheck(act: str) -> None:
    p = params(3, grad=True)
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def affine(*ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.ipu_norm.proxy_affine(*ps, 200, act, 0.03)

    assert torch.autograd.gradcheck(affine, p)
    assert torch.autograd.gradgradcheck(affine, p)
    if act == "identity":
        return

    def pn_act(u: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.ops.ipu_norm.proxy_norm_act(u, *ps, 200, act, 0.03)

    assert torch.autograd.gradcheck(pn_act, (u, *p))
    assert torch.autograd.gradgradcheck(pn_act, (u, *p))


def test_pn_act_and_relu_shift_gradcheck() -> None:
    u = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for act in ("relu", "silu", "gelu"):
        fn = lambda u, s, t, act=act: torch.ops.ipu_norm.pn_act(u, s, t, act)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (u, s, t))
        assert torch.autograd.gradgradcheck(fn, (u, s, t))
    relu_shift = lambda u, t: torch.ops.ipu_norm.relu_shift(u, t)  # noqa: E731
    assert torch.autograd.gradcheck(relu_shift, (u, t))
    assert torch.autograd.gradgradcheck(relu_shift, (u, t))


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("shape", [(3, 20, 3, 3), (2, 5, 48, 48), (2, 3, 7)])
def test_proxy_norm_act_float32_against_float64_reference(act: str, shape: tuple[int, ...]) -> None:
    # shapes: tiny planes (several per chunk), planes longer than one chunk, a 3-d (N, C, L) input.
    c = shape[1]
    u64 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    p64 = params(c, grad=True)
    u32 = u64.detach().float().requires_grad_()
    p32 = [t.detach().float().requires_grad_() for t in p64]
    out = torch.ops.ipu_norm.proxy_norm_act(u32, *p32, 200, act, 0.03)
    scale, shift = ref_affine(*p64, act)
    view = (1, -1) + (1,) * (len(shape) - 2)
    ref = PHI[act](u64) * scale.view(view) + shift.view(view)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (u32, *p32), g.float())
    want = torch.autograd.grad(ref, (u64, *p64), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-4)


def _run_all(threads: int, x: torch.Tensor, p: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xs = x.detach().requires_grad_()
        ps = [t.detach().requires_grad_() for t in p]
        outs = [torch.ops.ipu_norm.proxy_norm_act(xs, *ps, 200, "silu", 0.03),
                torch.ops.ipu_norm.relu_shift(xs, ps[1]), *torch.ops.ipu_norm.proxy_affine(*ps, 200, "gelu", 0.03)]
        loss = (outs[0] * g).sum() + (outs[1] * g).sum() + outs[2].sum() + outs[3].sum()
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, (xs, *ps)))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(4, 37, 3, 3), (3, 6, 50, 50)])
def test_results_do_not_depend_on_the_thread_count(shape: tuple[int, ...]) -> None:
    x, g = torch.randn(shape), torch.randn(shape)
    p = params(shape[1], dtype=torch.float32)
    one = _run_all(1, x, p, g)
    many = _run_all(max(2, os.cpu_count() or 2), x, p, g)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_fake_tensors_and_meta() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    with FakeTensorMode():
        u = torch.empty(2, 8, 5, 5)
        p = [torch.empty(8) for _ in range(4)]
        assert torch.ops.ipu_norm.proxy_norm_act(u, *p, 200, "silu", 0.03).shape == (2, 8, 5, 5)
        scale, shift = torch.ops.ipu_norm.proxy_affine(*p, 200, "relu", 0.03)
        assert scale.shape == shift.shape == (8,)
    out = torch.ops.ipu_norm.relu_shift(torch.empty(2, 8, 5, 5, device="meta"), torch.empty(8, device="meta"))
    assert out.shape == (2, 8, 5, 5) and out.device.type == "meta"


def _dynamo_supported() -> bool:
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except (RuntimeError, AttributeError):  # torch 2.0.1 refuses Python 3.11
        return False
    return True


@pytest.mark.skipif(not _dynamo_supported(), reason="torch.compile does not support this Python with this torch")
def test_torch_compile_full_graph_keeps_the_operators() -> None:
    # Called directly, the operators stay opaque nodes of one graph (shapes from their Meta kernels) with the same
    # values and gradients as in eager mode. (The layers themselves hand Inductor the ATen formulation when
    # compiled: ipu_norm.ops.proxy_stats.native_ops_for.)
    torch._dynamo.reset()
    targets: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN001, ANN202
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def fn(u: torch.Tensor, g, b, pg, pb) -> torch.Tensor:  # noqa: ANN001
        y = torch.ops.ipu_norm.proxy_norm_act(u, g, b, pg, pb, 200, "silu", 0.03)
        return torch.ops.ipu_norm.relu_shift(y, b)

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    u = torch.randn(2, 8, 6, 6, requires_grad=True)
    p = params(8, dtype=torch.float32, grad=True)
    out, ref = compiled(u, *p), fn(u, *p)
    assert torch.equal(out, ref)
    assert any("ipu_norm.proxy_norm_act" in t for t in targets) and any("ipu_norm.relu_shift" in t for t in targets)
    for a, b in zip(torch.autograd.grad(out.sum(), (u, *p)), torch.autograd.grad(ref.sum(), (u, *p))):
        assert torch.equal(a, b)


def test_layers_take_the_operator_path_on_cpu_float() -> None:
    layer = create_norm_act("gn+pn", 8, "silu", groups=2)
    out = layer(torch.randn(2, 8, 4, 4, requires_grad=True))
    assert "ProxyNormActFunction" in out.grad_fn.name()
    relu = create_norm_act("gn+pn", 8, "relu", groups=2)
    assert "ReluShiftFunction" in relu(torch.randn(2, 8, 4, 4, requires_grad=True)).grad_fn.name()


def test_bad_inputs_raise_one_clear_error() -> None:
    p = params(4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="unsupported activation 'tanh'"):
        torch.ops.ipu_norm.proxy_affine(*p, 200, "tanh", 0.03)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        torch.ops.ipu_norm.proxy_affine(*[t.half() for t in p], 200, "relu", 0.03)
    with pytest.raises(RuntimeError, match=r"shift must have shape \(4,\)"):
        torch.ops.ipu_norm.relu_shift(torch.randn(2, 4, 3, 3), torch.zeros(5))
    with pytest.raises(RuntimeError, match="at least 2 proxy quantiles"):
        torch.ops.ipu_norm.proxy_affine(*p, 1, "relu", 0.03)


def test_build_failure_names_the_compiler_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler failed"):
        native.build(tmp_path / "lib.so", verbose=False)
    assert not (tmp_path / "lib.so").exists()


def test_without_a_compiler_the_layers_warn_once_and_compute_the_same(tmp_path: Path) -> None:
    # A fresh process whose cache is empty and whose "compiler" fails: one warning, then the ATen path.
    code = (
        "import warnings, torch\n"
        "from ipu_norm.layers import create_norm_act\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    layers = [create_norm_act('gn+pn', 8, 'silu', groups=2) for _ in range(3)]\n"
        "msgs = [str(x.message) for x in w if 'operators are unavailable' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "torch.manual_seed(0); x = torch.randn(2, 8, 4, 4)\n"
        "torch.save(layers[0](x), 'out.pt')\n"
    )
    env = dict(os.environ, CXX="false", IPU_NORM_EXT_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    torch.manual_seed(0)
    layer = create_norm_act("gn+pn", 8, "silu", groups=2)  # same init as in the subprocess (seeded identically)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), layer(x), rtol=1e-5, atol=1e-5)
