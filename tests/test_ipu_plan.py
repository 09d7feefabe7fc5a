"""ExecutionPlan: batch arithmetic, stages, recomputation, precision, loss scaling and actionable errors."""

import pytest
import torch
from tiny_models import TinyNet as SharedTinyNet
from torch import nn

from ipu_norm.core.plan import ExecutionPlan, PlanError, PrecisionSpec, build_plan


def TinyNet(num_blocks: int = 6) -> SharedTinyNet:
    """The shared tiny contract model, 6 blocks by default here."""
    return SharedTinyNet(num_blocks)


def plan(execution: dict, micro: int = 4, global_batch: int | None = None, **kw) -> ExecutionPlan:
    ex = {"device": "ipu", **execution}
    return build_plan(ex, TinyNet(), {"micro_batch_size": micro, "global_batch_size": global_batch}, **kw)


def test_batch_arithmetic_and_samples_per_step() -> None:
    p = plan({"replicas": 8, "device_iterations": 5, "pipeline_splits": ["blocks.3"]}, micro=12, global_batch=768)
    assert p.gradient_accumulation == 768 // (12 * 8) == 8
    assert p.global_batch_size == 768
    assert p.samples_per_step == 12 * 8 * 8 * 5
    assert p.ipus_per_replica == 2 and p.ipus_used == 16 and p.pipelined
    assert [(s.start, s.ipu) for s in p.stages] == [("stem", 0), ("blocks.3", 1)]
    assert p.stages[0].units == ("stem", "blocks.0", "blocks.1", "blocks.2")
    assert p.stages[1].units == ("blocks.3", "blocks.4", "blocks.5", "head")
    assert p.stage_of("blocks.4") == 1 and p.pipeline_splits == ["blocks.3"]
    assert "global_batch=768" in p.describe()


def test_accumulation_from_config_without_global_batch() -> None:
    p = plan({"gradient_accumulation": 3}, micro=2)
    assert p.gradient_accumulation == 3 and p.global_batch_size == 6 and not p.pipelined


def test_global_batch_must_divide() -> None:
    with pytest.raises(PlanError, match=r"not a multiple of micro_batch_size x replicas = 12 x 8 = 96; use global_"):
        plan({"replicas": 8}, micro=12, global_batch=800)


def test_accumulation_contradiction() -> None:
    with pytest.raises(PlanError, match="contradicts"):
        plan({"gradient_accumulation": 2}, micro=4, global_batch=32)


def test_pipelined_training_needs_accumulation() -> None:
    # IPU: PopTorch needs accumulation >= 2N-1 = 5 for 3 stages; torch's schedules on CPU need >= N = 3.
    with pytest.raises(PlanError, match="on ipu needs gradient accumulation >= 5.*got 4.*>= 20"):
        plan({"pipeline_splits": ["blocks.2", "blocks.4"]}, micro=4, global_batch=16)
    assert plan({"pipeline_splits": ["blocks.2", "blocks.4"]}, micro=4, global_batch=20).gradient_accumulation == 5
    with pytest.raises(PlanError, match="on cpu needs gradient accumulation >= 3"):
        build_plan({"device": "cpu", "pipeline_splits": ["blocks.2", "blocks.4"]}, TinyNet(),
                   {"micro_batch_size": 4, "global_batch_size": 8})
    assert build_plan({"device": "cpu", "pipeline_splits": ["blocks.2", "blocks.4"]}, TinyNet(),
                      {"micro_batch_size": 4, "global_batch_size": 12}).num_stages == 3
    # Inference plans do not accumulate.
    p = plan({"pipeline_splits": ["blocks.2", "blocks.4"]}, micro=4, training=False)
    assert p.num_stages == 3 and p.inference_device_iterations == 3


def test_unknown_stage_lists_valid_names() -> None:
    with pytest.raises(PlanError, match=r"'blocks.9' is not a stage boundary.*blocks.0 .. blocks.5, head"):
        plan({"pipeline_splits": ["blocks.9"]}, micro=1, global_batch=4)
    with pytest.raises(PlanError, match="distinct and in model order"):
        plan({"pipeline_splits": ["blocks.4", "blocks.2"]}, micro=1, global_batch=4)


def test_ipus_per_replica_consistency_and_auto_split() -> None:
    with pytest.raises(PlanError, match="set ipus_per_replica: 2"):
        plan({"pipeline_splits": ["blocks.3"], "ipus_per_replica": 4}, micro=1, global_batch=8)
    # No splits + ipus_per_replica > 1: split automatically (equal blocks -> balanced by FLOPs).
    p = plan({"ipus_per_replica": 2}, micro=1, global_batch=4)
    assert p.num_stages == 2 and p.pipeline_splits[0].startswith("blocks.")
    p = plan({"ipus_per_replica": 2}, micro=1, global_batch=4, split_cost=[1, 1, 1, 1, 1, 1])
    assert p.pipeline_splits == ["blocks.3"]


def test_available_ipus() -> None:
    with pytest.raises(PlanError, match="= 16 IPUs but 8 are available"):
        plan({"replicas": 8, "pipeline_splits": ["blocks.3"]}, micro=1, global_batch=24, available_ipus=8)


def test_available_ipus_from_poprun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "4")
    monkeypatch.setenv("POPDIST_NUM_IPUS_PER_REPLICA", "1")
    with pytest.raises(PlanError, match="but 4 are available"):
        plan({"replicas": 4, "pipeline_splits": ["blocks.3"]}, micro=1, global_batch=12)


def test_memory_proportion() -> None:
    p = plan({"pipeline_splits": ["blocks.3"], "available_memory_proportion": 0.3}, micro=1, global_batch=3)
    assert p.available_memory_proportion == [0.3, 0.3]
    p = plan({"pipeline_splits": ["blocks.3"], "available_memory_proportion": [0.2, 0.5]}, micro=1, global_batch=3)
    assert p.available_memory_proportion == [0.2, 0.5]
    with pytest.raises(PlanError, match=r"IPU1 is 1.5; it must be in \(0, 1\]"):
        plan({"pipeline_splits": ["blocks.3"], "available_memory_proportion": [0.2, 1.5]}, micro=1, global_batch=3)
    with pytest.raises(PlanError, match="must be in"):
        plan({"available_memory_proportion": 0.0}, micro=1)
    with pytest.raises(PlanError, match="has 3 values for 2 IPUs"):
        plan({"pipeline_splits": ["blocks.3"], "available_memory_proportion": [0.1] * 3}, micro=1, global_batch=3)


def test_recompute() -> None:
    p = plan({"recompute": "checkpoints", "recompute_checkpoints": ["blocks.1", "blocks.4"]}, micro=1)
    assert p.recompute == "checkpoints" and p.recompute_checkpoints == ["blocks.1", "blocks.4"]
    # 'auto' resolves to the mode PopTorch runs: Standard on one IPU (PopART picks its own checkpoints), Pipeline when
    # pipelined; on CPU/GPU a checkpoint per block.
    p = plan({"recompute": "auto"}, micro=1)
    assert p.recompute == "standard" and p.recompute_checkpoints == []
    p = plan({"recompute": "auto", "pipeline_splits": ["blocks.3"]}, micro=1, global_batch=3)
    assert p.recompute == "pipeline" and p.recompute_checkpoints == []
    p = build_plan({"device": "cpu", "recompute": "auto"}, TinyNet(), {"micro_batch_size": 1})
    assert p.recompute == "checkpoints" and p.recompute_checkpoints == [f"blocks.{i}" for i in range(6)]
    # Explicit modes are kept; single-IPU modes are refused on a pipeline and Pipeline on one IPU.
    assert plan({"recompute": "recompute_all"}, micro=1).recompute == "recompute_all"
    with pytest.raises(PlanError, match="'standard' is a single-IPU PopART mode"):
        plan({"recompute": "standard", "pipeline_splits": ["blocks.3"]}, micro=1, global_batch=3)
    with pytest.raises(PlanError, match="'pipeline' needs pipeline_splits"):
        plan({"recompute": "pipeline"}, micro=1)
    # A pipelined plan without recomputation says so (the adapter then sets autoRecomputation None explicitly).
    assert plan({"pipeline_splits": ["blocks.3"]}, micro=1, global_batch=3).recompute == "none"
    with pytest.raises(PlanError, match="needs execution.recompute_checkpoints"):
        plan({"recompute": "checkpoints"}, micro=1)
    with pytest.raises(PlanError, match="'blocks.77' is not a module"):
        plan({"recompute": "checkpoints", "recompute_checkpoints": ["blocks.77"]}, micro=1)
    with pytest.raises(PlanError, match="recompute is 'none'"):
        plan({"recompute_checkpoints": ["blocks.1"]}, micro=1)


def test_precision_parse() -> None:
    assert PrecisionSpec.parse("16.32").compute_dtype == torch.float16
    assert PrecisionSpec.parse("16.32").accum_dtype == torch.float32
    assert PrecisionSpec.parse(16.16).partials_dtype == torch.float16  # YAML float
    assert PrecisionSpec.parse(32.32).compute_dtype == torch.float32
    assert PrecisionSpec.parse("bf16").compute_dtype == torch.bfloat16
    with pytest.raises(PlanError, match="not one of"):
        PrecisionSpec.parse("8.8")


def test_loss_scaling() -> None:
    with pytest.raises(PlanError, match="16.16.*needs loss scaling"):
        plan({"precision": "16.16", "loss_scaling": 1.0}, micro=1)
    p = plan({"precision": "16.16", "loss_scaling": "auto"}, micro=1)
    assert p.loss_scaling.auto and p.loss_scaling.value > 1
    p = plan({"precision": "16.16", "loss_scaling": 256}, micro=1)
    assert not p.loss_scaling.auto and p.loss_scaling.value == 256
    # 'auto' in fp32 means none is needed.
    p = plan({"precision": "32.32", "loss_scaling": "auto"}, micro=1)
    assert not p.loss_scaling.enabled
    with pytest.raises(PlanError, match="positive"):
        plan({"loss_scaling": -1.0}, micro=1)


def test_device_specific_rules() -> None:
    with pytest.raises(PlanError, match="bf16.*not available on Mk2"):
        plan({"precision": "bf16"}, micro=1)
    p = build_plan({"device": "cpu", "precision": "bf16", "stochastic_rounding": True}, TinyNet(),
                   {"micro_batch_size": 2})
    assert p.device == "cpu" and not p.stochastic_rounding  # SR is an IPU hardware feature
    with pytest.raises(PlanError, match="replicas >= 2"):
        plan({"replicated_tensor_sharding": True}, micro=1)
    with pytest.raises(PlanError, match="micro_batch_size must be >= 1"):
        plan({}, micro=0)


def test_model_contract_required() -> None:
    with pytest.raises(PlanError, match="lacks .stem"):
        build_plan({"device": "cpu"}, nn.Linear(2, 2), {"micro_batch_size": 1})


def test_accepts_app_schema_dataclass() -> None:
    schema = pytest.importorskip("ipu_norm.config.schema")
    ex = schema.ExecutionConfig(device="ipu", replicas=2, pipeline_splits=["blocks.3"], precision="16.32")
    p = build_plan(ex, TinyNet(), {"micro_batch_size": 2, "global_batch_size": 16})
    assert p.gradient_accumulation == 4 and p.num_stages == 2
    assert p.loss_scaling.auto  # the schema's default 'auto' with fp16 compute


def _ipu_configs():
    from pathlib import Path

    return sorted((Path(__file__).resolve().parents[1] / "configs").glob("ipu_*.yml"))


@pytest.mark.parametrize("path", _ipu_configs(), ids=lambda p: p.name)
def test_ipu_configs_make_valid_plans(path) -> None:
    loader = pytest.importorskip("ipu_norm.config.loader")
    from ipu_norm.models import create_model

    cfg = loader.load_config(path)
    with torch.device("meta"):
        model = create_model(cfg.model.name, norm=cfg.model.norm)
    p = build_plan(cfg.execution, model, cfg.train)
    assert p.device == "ipu" and p.global_batch_size == cfg.train.global_batch_size
    assert p.ipus_used in (16, 64)  # POD16 / POD64 configs use the whole machine
    assert str(p.ipus_used) in path.stem.replace("pod", "")


def _popart_sets(p: ExecutionPlan) -> list[tuple]:
    from ipu_norm.ipu import poptorch_adapter as pa

    return [c.args for c in pa.option_calls(p) if c.path == "_Popart.set"]


def test_stable_norm_for_group_and_layer_norm_only() -> None:
    """GN/LN models get PopART's two-pass norm statistics, as Graphcore's application sets enableStableNorm."""
    for norm, stable in ((nn.GroupNorm(2, 4), True), (nn.LayerNorm([4, 8, 8]), True), (nn.BatchNorm2d(4), False)):
        model = TinyNet()
        model.blocks[0].append(norm)
        p = build_plan({"device": "ipu"}, model, {"micro_batch_size": 1})
        assert p.stable_norm is stable
        assert (("enableStableNorm", True) in _popart_sets(p)) is stable


def test_recompute_options_state_the_mode() -> None:
    """Each plan mode becomes the PopART options that run it; a pipelined 'none' is said explicitly (else PopTorch
    would switch Pipeline recomputation on by itself)."""
    two = {"pipeline_splits": ["blocks.3"]}
    assert _popart_sets(plan(two, micro=1, global_batch=3)) == [("autoRecomputation", 0)]
    assert _popart_sets(plan({}, micro=1)) == []
    assert _popart_sets(plan({**two, "recompute": "auto"}, micro=1, global_batch=3)) == [("autoRecomputation", 3)]
    assert _popart_sets(plan({"recompute": "auto"}, micro=1)) == [("explicitRecomputation", True),
                                                                  ("autoRecomputation", 1)]
    assert _popart_sets(plan({"recompute": "recompute_all"}, micro=1)) == [("explicitRecomputation", True),
                                                                           ("autoRecomputation", 4)]
    manual = {"recompute": "checkpoints", "recompute_checkpoints": ["blocks.1"]}
    assert _popart_sets(plan(manual, micro=1)) == [("explicitRecomputation", True), ("autoRecomputation", 4)]
    assert _popart_sets(plan({**two, **manual}, micro=1, global_batch=3)) == [("autoRecomputation", 3)]


def test_half_weights_on_ipu_only() -> None:
    assert plan({"precision": "16.32"}, micro=1).weights_half
    assert not plan({"precision": "32.32"}, micro=1).weights_half
    assert not build_plan({"device": "cpu", "precision": "bf16"}, TinyNet(), {"micro_batch_size": 1}).weights_half
