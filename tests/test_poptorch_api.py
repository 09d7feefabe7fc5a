"""API conformance: what ipu_norm/ipu/ and the IPU proxy-stats op call must exist in the real SDK 3.4 API.

Two independent checks against the table in tests/poptorch_api_sdk34.py (read from graphcore/poptorch
sdk/poptorch/3.4.0, see that file):

1. Run-time: the real code paths (options for every shipped ipu_*.yml and the common option combinations, under
   poprun, model annotation, optimizers, data loader, training wrapper, backend lifecycle, the PopART custom op)
   run against the table-generated stand-in, which refuses unknown names, unknown keywords and wrong arity; then
   every recorded call is checked again against the table.
2. Static: an AST scan of the IPU sources finds every ``poptorch.X`` / ``popdist.X`` chain, every
   ``OptionCall("A.b", ...)`` / ``Ref`` / ``Build`` literal and every executor / optimizer method call, and checks
   each against the table, so a call no test exercises is caught too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from poptorch_api_sdk34 import API, POPART_SESSION_OPTIONS
from poptorch_standin import ApiViolation, StandIn, check_call, class_member, signature, standin_with_executors
from tiny_models import TinyNet
from torch import nn

from ipu_norm.config.loader import load_config
from ipu_norm.core.plan import build_plan
from ipu_norm.ipu import poptorch_adapter as pa
from ipu_norm.train.builders import build_model, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
IPU_CONFIGS = sorted((ROOT / "configs").glob("ipu_*.yml"))
SCANNED = sorted((ROOT / "ipu_norm" / "ipu").glob("*.py")) + [
    ROOT / "ipu_norm" / "ops" / "proxy_stats_ipu.py",
    ROOT / "ipu_norm" / "ops" / "proxy_stats.py",
]
KINDS = {"module", "class", "function", "method", "property", "attribute", "enum", "exception"}


def test_table_is_well_formed() -> None:
    for name, entry in API.items():
        assert entry.kind in KINDS, name
        assert entry.source, name
        if entry.kind in ("class", "function", "method"):
            signature(name)  # the parameter list parses
        else:
            assert entry.params is None, name
        for base in entry.bases:
            assert API[base].kind == "class", (name, base)
        assert entry.returns in (None, "self") or API[entry.returns].kind == "class", name
        if entry.kind == "enum":
            assert entry.members, name
        if "." in name and entry.kind in ("method", "property", "attribute"):
            assert API[name.rsplit(".", 1)[0]].kind == "class", name


def test_standin_refuses_what_the_real_api_refuses() -> None:
    """The stand-in itself must reject misspelt names, unknown keywords, wrong arity and unknown PopART keys."""
    s = StandIn()
    opts = s.poptorch.Options()
    with pytest.raises(AttributeError, match="gradientAccumulations does not exist in Poplar SDK 3.4.0"):
        opts.Training.gradientAccumulations(4)
    with pytest.raises(ApiViolation, match="unexpected keyword argument 'count'"):
        opts.Training.gradientAccumulation(4, count=4)
    with pytest.raises(ApiViolation, match="too many positional arguments"):
        opts.deviceIterations(2, 3)
    with pytest.raises(ApiViolation, match="not a PopART session option"):
        opts._Popart.set("autoRecompute", 3)
    with pytest.raises(AttributeError, match="poptorch.Blocks does not exist"):
        s.poptorch.Blocks  # noqa: B018
    with pytest.raises(AttributeError, match="Median"):
        s.poptorch.ReductionType.Median  # noqa: B018
    with pytest.raises(ApiViolation, match="unexpected keyword argument 'weight_decy'"):
        s.poptorch.optim.SGD([], lr=0.1, weight_decy=0.1)
    with pytest.raises(AssertionError, match="invalid key: ipu0"):
        opts.setAvailableMemoryProportion({"ipu0": 0.5})
    with pytest.raises(ValueError, match="setPartialsType"):
        opts.Precision.setPartialsType(torch.bfloat16)
    # ... and accept what it accepts (chained, recorded under the real class of each sub-object).
    opts.Training.gradientAccumulation(4).setAutomaticLossScaling(True)
    assert s.names()[-2:] == ["poptorch.options._TrainingOptions.gradientAccumulation",
                              "poptorch.options._TrainingOptions.setAutomaticLossScaling"]


def _walk_log(standin: StandIn) -> set[str]:
    """Check every recorded call against the table again; return the names called."""
    for call in standin.log:
        assert API[call.name].kind in ("function", "method", "class"), call.name
        check_call(call.name, call.args, call.kwargs)
    return set(standin.names())


def _optimizer_for(cfg, model: nn.Module, plan) -> tuple[str, dict]:
    """The trainer's optimizer for `cfg`, mapped like PoptorchBackend.prepare does."""
    from ipu_norm.ipu.backend import _optimizer_name_and_hparams

    torch_opt = build_optimizer(cfg.optim, model, plan.global_batch_size)
    return _optimizer_name_and_hparams(torch_opt)


@pytest.mark.parametrize("path", IPU_CONFIGS, ids=[p.name for p in IPU_CONFIGS])
@pytest.mark.parametrize("poprun", [False, True], ids=["poptorch", "poprun"])
def test_shipped_ipu_config_calls_conform(path: Path, poprun: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options (training and inference), stage annotation, optimizer and data loader of a shipped IPU config."""
    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg.model)
    plan = build_plan(cfg.execution, model, cfg.train, seed=cfg.train.seed)
    s = StandIn({"popdist.init": lambda: None, "popdist.getNumTotalReplicas": lambda: plan.replicas})
    if poprun:
        monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", str(plan.replicas))
    opts = pa.create_options(plan, poptorch=s.poptorch, popdist_module=s.popdist)
    pa.create_options(plan, for_inference=True, poptorch=s.poptorch, popdist_module=s.popdist)
    pa.annotate_model(model, plan, s.poptorch)
    name, hparams = _optimizer_for(cfg, model, plan)
    pa.create_optimizer(list(model.parameters()), name, hparams, plan, poptorch=s.poptorch)
    pa.create_dataloader(opts, list(range(8)), plan, poptorch=s.poptorch)
    called = _walk_log(s)
    assert ("popdist.poptorch.Options" in called) == poprun
    assert ("poptorch.Options.replicationFactor" in called) != poprun
    assert {"poptorch.options._TrainingOptions.gradientAccumulation", "poptorch.DataLoader",
            f"poptorch.optim.{pa.optimizer_spec(name, hparams, plan)[0]}"} <= called
    assert ("poptorch.BeginBlock" in called) == plan.pipelined


COMBINATIONS = {
    "pipelined-16.16-offchip-checkpoints": {
        "pipeline_splits": ["blocks.2"], "precision": "16.16", "loss_scaling": "auto",
        "optimizer_state_offchip": True, "replicated_tensor_sharding": True, "recompute": "checkpoints",
        "recompute_checkpoints": ["blocks.0"], "executable_cache_dir": "/tmp/c", "ipu_model": True,
    },
    "single-32.32-recompute-auto": {"precision": "32.32", "recompute": "auto", "loss_scaling": 128.0},
    "single-16.32-recompute-checkpoints": {"precision": "16.32", "recompute": "checkpoints",
                                           "recompute_checkpoints": ["blocks.1"], "stochastic_rounding": False},
    "three-stages-no-recompute": {"pipeline_splits": ["blocks.1", "blocks.3"], "recompute": "none",
                                  "device_iterations": 4, "available_memory_proportion": [0.2, 0.3, 0.4]},
}


@pytest.mark.parametrize("optim", ["sgd", "rmsprop", "adamw"])
@pytest.mark.parametrize("combo", list(COMBINATIONS), ids=list(COMBINATIONS))
def test_option_combinations_conform(combo: str, optim: str) -> None:
    ex = {"device": "ipu", "replicas": 2, **COMBINATIONS[combo]}
    model = TinyNet()
    plan = build_plan(ex, model, {"micro_batch_size": 2, "global_batch_size": 24, "seed": 3})
    s = StandIn()
    pa.create_options(plan, poptorch=s.poptorch)
    pa.create_options(plan, for_inference=True, poptorch=s.poptorch)
    pa.annotate_model(model, plan, s.poptorch)
    pa.create_optimizer(list(model.parameters()), optim, {"lr": 0.1, "momentum": 0.9}, plan, poptorch=s.poptorch)
    wrapped = pa.TrainingModelWithLoss(model, nn.CrossEntropyLoss(), poptorch=s.poptorch)
    wrapped(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))  # identity_loss and any recomputationCheckpoint
    called = _walk_log(s)
    assert "poptorch.identity_loss" in called
    # Recomputation is always stated: a pipelined 'none' sets autoRecomputation None (PopTorch's default would be
    # Pipeline); GN/LN models set enableStableNorm.
    assert ("poptorch.options._PopartOptions.set" in called) == (plan.recompute != "none" or plan.pipelined
                                                                 or plan.stable_norm)


def test_printed_option_calls_run_on_the_standin() -> None:
    """The dry run prints `format_option_call` lines; executed as Python they make exactly the adapter's calls."""
    plan = build_plan(dict(COMBINATIONS["pipelined-16.16-offchip-checkpoints"], device="ipu", replicas=2), TinyNet(),
                      {"micro_batch_size": 2, "global_batch_size": 24})
    applied, printed = StandIn(), StandIn()
    pa.create_options(plan, poptorch=applied.poptorch)
    lines = [pa.format_option_call(c) for c in pa.option_calls(plan)]
    assert "opts.Training.gradientAccumulation(6)" in lines
    env = {"poptorch": printed.poptorch, "torch": torch, "opts": printed.poptorch.Options()}
    exec("\n".join(lines), env)  # noqa: S102 (our own generated lines)
    assert [(c.name, repr(c.args)) for c in printed.log] == [(c.name, repr(c.args)) for c in applied.log]


def test_backend_lifecycle_conforms() -> None:
    """PoptorchBackend prepare / train_step / eval_step / lr push / sync / state / close on the stand-in."""
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    s = standin_with_executors()
    model = TinyNet()
    plan = build_plan({"device": "ipu", "precision": "32.32", "pipeline_splits": ["blocks.2"]}, model,
                      {"micro_batch_size": 2, "global_batch_size": 6})
    backend = PoptorchBackend(poptorch=s.poptorch)
    backend.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plan,
                    TrainSpec(criterion=nn.CrossEntropyLoss()))
    mbs = [(torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))) for _ in range(3)]
    backend.train_step(mbs)
    backend.eval_step(torch.randn(3, 3, 8, 8))
    backend.lr_changed()
    backend.sync_to_host()
    backend.load_state_dict(backend.state_dict())
    backend.close()
    called = _walk_log(s)
    assert {"poptorch.trainingModel", "poptorch.inferenceModel", "poptorch.PoplarExecutor.__call__",
            "poptorch.PoplarExecutor.load_state_dict", "poptorch.PoplarExecutor.detachFromDevice",
            "poptorch.PoplarExecutor.setOptimizer", "poptorch.PoplarExecutor.copyWeightsToHostIfNeeded",
            "poptorch.optim.Optimizer.state_dict", "poptorch.optim.Optimizer.load_state_dict"} <= called


def test_proxy_stats_custom_op_conforms(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipu_norm.ops import proxy_stats_ipu

    s = StandIn()
    monkeypatch.setitem(sys.modules, "poptorch", s.poptorch)
    monkeypatch.setattr(proxy_stats_ipu, "load_custom_ops", lambda path=None: None)  # no .so without the SDK
    c = torch.ones(5)
    mean, var = proxy_stats_ipu.proxy_stats_ipu(c, c, c, c, act="silu")
    assert mean.shape == var.shape == (5,)
    assert _walk_log(s) == {"poptorch.custom_op"}


# ------------------------------------------------------------------------------------------------ static scan

# Root names in the scanned sources that stand for a module of the table.
ROOT_NAMES = {"poptorch": "poptorch", "popdist": "popdist", "popdist_module": "popdist"}
SELF_ROOTS = {"poptorch": "poptorch", "_poptorch": "poptorch"}
# Receivers of PoplarExecutor / optimizer / Options methods (expression source -> table classes it may be).
OPTIMIZERS = ("poptorch.optim.SGD", "poptorch.optim.RMSprop", "poptorch.optim.AdamW")
RECEIVERS = {
    "self.train_model": ("poptorch.PoplarExecutor",),
    "self.eval_executor": ("poptorch.PoplarExecutor",),
    "backend.train_model": ("poptorch.PoplarExecutor",),
    "executor": ("poptorch.PoplarExecutor",),
    "e": ("poptorch.PoplarExecutor",),
    "self.ipu_optimizer": OPTIMIZERS,
    "opts": ("poptorch.Options",),
}


def _chain(node: ast.AST) -> list[str] | None:
    """['poptorch', 'optim', 'SGD'] for ``poptorch.optim.SGD`` / ``self.poptorch.optim.SGD``; else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.reverse()
    if isinstance(node, ast.Name) and node.id in ROOT_NAMES:
        return [ROOT_NAMES[node.id], *parts]
    if isinstance(node, ast.Name) and node.id == "self" and parts and parts[0] in SELF_ROOTS:
        return [SELF_ROOTS[parts[0]], *parts[1:]]
    return None


def _resolve(parts: list[str]) -> str:
    """The table name a chain refers to; raises KeyError naming the first part the table lacks."""
    cur = parts[0]
    for part in parts[1:]:
        kind = API[cur].kind
        if kind == "module":
            nxt = f"{cur}.{part}"
            if nxt not in API:
                raise KeyError(nxt)
            cur = nxt
        elif kind == "enum":
            if part not in API[cur].members:
                raise KeyError(f"{cur}.{part}")
            return f"{cur}.{part}"
        elif kind == "class":
            found = class_member(cur, part)
            if found is None:
                raise KeyError(f"{cur}.{part}")
            cur = API[found].returns if API[found].kind == "property" else found
        else:
            raise KeyError(f"{cur}.{part} ({cur} is a {kind})")
    return cur


def _arity(name: str, call: ast.Call, where: str, problems: list[str], skip_first: int = 0) -> None:
    """Keyword names and positional count of a literal call (skipped when it splats *args / **kwargs)."""
    if API[name].kind not in ("class", "function", "method"):
        problems.append(f"{where}: {name} is a {API[name].kind}, called")
        return
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return
    try:
        check_call(name, (None,) * (len(call.args) - skip_first), {k.arg: None for k in call.keywords},
                   values=False)
    except ApiViolation as err:
        problems.append(f"{where}: {err}")


def _literal_tuple(node: ast.AST) -> list[ast.AST] | None:
    return list(node.elts) if isinstance(node, ast.Tuple) else None


def scan_source(source: str, filename: str = "<src>") -> tuple[list[str], set[str]]:
    """(problems, table names used) for one source file."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    problems: list[str] = []
    used: set[str] = set()

    def where(node: ast.AST) -> str:
        return f"{filename}:{node.lineno}"

    def option_path(path: str, node: ast.AST) -> str | None:
        try:
            name = _resolve(["poptorch", "Options", *path.split(".")])
        except KeyError as err:
            problems.append(f"{where(node)}: OptionCall({path!r}): {err.args[0]} does not exist in the table")
            return None
        used.add(name)
        return name

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not (isinstance(parents.get(node), ast.Attribute)):
            parts = _chain(node)
            if parts is not None:
                try:
                    used.add(_resolve(parts))
                except KeyError as err:
                    problems.append(f"{where(node)}: {'.'.join(parts)}: {err.args[0]} does not exist in the table")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        parts = _chain(func)
        if parts is not None:
            try:
                _arity(_resolve(parts), node, where(node), problems)
            except KeyError:
                pass  # reported above
        elif isinstance(func, ast.Attribute) and ast.unparse(func.value) in RECEIVERS:
            for cls in RECEIVERS[ast.unparse(func.value)]:
                name = class_member(cls, func.attr)
                if name is None:
                    problems.append(f"{where(node)}: {ast.unparse(func)}: {cls}.{func.attr} does not exist")
                else:
                    used.add(name)
                    _arity(name, node, where(node), problems)
        elif isinstance(func, ast.Name) and node.args and isinstance(node.args[0], ast.Constant):
            literal = node.args[0].value
            if func.id == "OptionCall":
                name = option_path(literal, node)
                args = _literal_tuple(node.args[1]) if len(node.args) > 1 else []
                if name is not None and args is not None:
                    fake = ast.Call(func=func, args=args, keywords=[])
                    _arity(name, fake, where(node), problems)
            elif func.id == "Ref":
                try:
                    used.add(_resolve(["poptorch", *literal.split(".")]))
                except KeyError as err:
                    problems.append(f"{where(node)}: Ref({literal!r}): {err.args[0]} does not exist in the table")
            elif func.id == "Build":
                cls = f"poptorch.{literal}"
                if cls not in API or API[cls].kind != "class":
                    problems.append(f"{where(node)}: Build({literal!r}): {cls} is not a class in the table")
                    continue
                used.add(cls)
                chain = next((k.value for k in node.keywords if k.arg == "chain"), None)
                for link in _literal_tuple(chain) or [] if chain is not None else []:
                    items = _literal_tuple(link)
                    if items and isinstance(items[0], ast.Constant):
                        member = class_member(cls, items[0].value)
                        if member is None:
                            problems.append(f"{where(node)}: Build chain {cls}.{items[0].value} does not exist")
                        else:
                            used.add(member)
    return problems, used


def scan_files(paths: list[Path]) -> tuple[list[str], set[str]]:
    problems: list[str] = []
    used: set[str] = set()
    for path in paths:
        p, u = scan_source(path.read_text(), str(path.relative_to(ROOT)))
        problems += p
        used |= u
    return problems, used


def test_static_scan_of_ipu_sources() -> None:
    problems, used = scan_files(SCANNED)
    assert not problems, "calls the real SDK 3.4 API does not have:\n" + "\n".join(problems)
    # The scan must actually see each kind of use (a scanner that finds nothing would pass vacuously).
    assert {
        "poptorch.BeginBlock", "poptorch.recomputationCheckpoint", "poptorch.identity_loss", "poptorch.custom_op",
        "poptorch.isRunningOnIpu", "poptorch.DataLoaderMode.AsyncRebatched", "poptorch.optim",
        "popdist.poptorch.Options",
        "popdist.init", "popdist.getNumTotalReplicas", "poptorch.options._TrainingOptions.gradientAccumulation",
        "poptorch.options._PopartOptions.set", "poptorch.ReductionType.Mean", "poptorch.TensorLocationSettings",
        "poptorch.TensorLocationSettings.useReplicatedTensorSharding",
        "poptorch.PoplarExecutor.copyWeightsToHostIfNeeded",
        "poptorch.PoplarExecutor.detachFromDevice", "poptorch.optim.Optimizer.state_dict",
        "poptorch.PoplarExecutor.compile", "poptorch.PoplarExecutor.load_state_dict",
    } <= used


def test_static_scan_catches_misspellings() -> None:
    src = '''
OptionCall("Training.gradientAccumulations", (4,))
OptionCall("deviceIterations", (1, 2))
Ref("OutputMode.Everything")
Build("TensorLocationSettings", chain=(("useOnChip", (True,)),))
poptorch.BeginBlock(m, "s", ipu=1)
self.poptorch.trainingModel(m, opts, opt, extra)
popdist.getTotalReplicas()
self.train_model.copyWeightsToHosts()
'''
    problems, _ = scan_source(src)
    text = "\n".join(problems)
    for expected in ("gradientAccumulations", "too many positional", "Everything", "useOnChip", "'ipu'",
                     "trainingModel", "getTotalReplicas", "copyWeightsToHosts"):
        assert expected in text, (expected, text)
    assert len(problems) == 8


def test_popart_keys_set_by_the_adapter_are_in_the_table() -> None:
    batch = {"micro_batch_size": 2, "global_batch_size": 12}
    plans = [build_plan({"device": "ipu", "recompute": r, "recompute_checkpoints": ["blocks.0"], **extra}, TinyNet(),
                        batch) for r in ("auto", "checkpoints") for extra in ({}, {"pipeline_splits": ["blocks.2"]})]
    keys = {c.args for p in plans for c in pa.option_calls(p) if c.path == "_Popart.set"}
    assert keys and all(k in POPART_SESSION_OPTIONS and v in POPART_SESSION_OPTIONS[k] for k, v in keys)
