"""PopTorch adapter: pure option/optimizer translation, applied to the SDK 3.4 table-generated stand-in
(tests/poptorch_standin.py, which refuses calls the real API would refuse); real-poptorch tests marked `ipu`."""

import copy
import sys
import types

import pytest
import torch
from poptorch_standin import StandIn, standin_with_executors, unwrap
from tiny_models import TinyNet
from torch import nn

from ipu_norm.core.plan import build_plan
from ipu_norm.ipu import poptorch_adapter as pa


def make_plan(**execution):
    ex = {"device": "ipu", "replicas": 4, "device_iterations": 10, "pipeline_splits": ["blocks.2"],
          "precision": "16.16", "loss_scaling": "auto", "available_memory_proportion": [0.3, 0.5],
          "stochastic_rounding": True, "optimizer_state_offchip": True, "replicated_tensor_sharding": True,
          "recompute": "checkpoints", "recompute_checkpoints": ["blocks.0", "blocks.1", "blocks.3"],
          "executable_cache_dir": "/tmp/cache", "ipu_model": True, **execution}
    return build_plan(ex, TinyNet(), {"micro_batch_size": 2, "global_batch_size": 64, "seed": 7})


def calls_by_path(calls):
    return {c.path: c for c in calls}


def test_option_calls_pure() -> None:
    plan = make_plan()
    calls = pa.option_calls(plan)
    by = calls_by_path(calls)
    assert by["replicationFactor"].args == (4,)
    assert by["deviceIterations"].args == (10,)
    two_stage_inference = build_plan({"device": "ipu", "pipeline_splits": ["blocks.2"]}, TinyNet(),
                                     {"micro_batch_size": 2}, training=False)
    inf = calls_by_path(pa.option_calls(two_stage_inference, for_inference=True))
    assert inf["deviceIterations"].args == (2,)  # PopTorch: pipelined inference needs iterations >= stages
    assert by["Training.gradientAccumulation"].args == (64 // (2 * 4),)
    assert by["Training.accumulationAndReplicationReductionType"].args == (pa.Ref("ReductionType.Mean"),)
    assert by["Training.setAutomaticLossScaling"].args == (True,)
    assert by["outputMode"].args == (pa.Ref("OutputMode.Sum"),)  # training: sums over the host call
    assert inf["outputMode"].args == (pa.Ref("OutputMode.All"),)  # inference: every output
    assert by["setAvailableMemoryProportion"].args == ({"IPU0": 0.3, "IPU1": 0.5},)
    assert by["Precision.enableStochasticRounding"].args == (True,)
    assert by["Precision.setPartialsType"].args == (torch.float16,)
    assert by["enableExecutableCaching"].args == ("/tmp/cache",)
    assert by["useIpuModel"].args == (True,)
    assert by["randomSeed"].args == (7,)
    loc = by["TensorLocations.setOptimizerLocation"].args[0]
    assert loc == pa.Build("TensorLocationSettings", chain=(("useOnChipStorage", (False,)),
                                                            ("useReplicatedTensorSharding", (True,))))
    assert by["setExecutionStrategy"].args == (pa.Build("PipelinedExecution", (pa.Ref("AutoStage.AutoIncrement"),)),)
    assert ("_Popart.set", ("autoRecomputation", pa.RECOMPUTE_PIPELINE)) in [(c.path, c.args) for c in calls]


def test_option_calls_single_ipu_fp32_inference_popdist() -> None:
    plan = build_plan({"device": "ipu", "precision": "32.32", "recompute": "auto"}, TinyNet(),
                      {"micro_batch_size": 4, "global_batch_size": 8})
    paths = [c.path for c in pa.option_calls(plan)]
    assert "setExecutionStrategy" not in paths and "Training.setAutomaticLossScaling" not in paths
    assert "TensorLocations.setOptimizerLocation" not in paths
    sets = [c.args for c in pa.option_calls(plan) if c.path == "_Popart.set"]
    assert sets == [("explicitRecomputation", True), ("autoRecomputation", pa.RECOMPUTE_STANDARD)]
    assert calls_by_path(pa.option_calls(plan))["Precision.setPartialsType"].args == (torch.float32,)
    inf = [c.path for c in pa.option_calls(plan, popdist=True, for_inference=True)]
    assert "replicationFactor" not in inf  # poprun owns the replica count
    assert not any(p.startswith("Training.") for p in inf) and "_Popart.set" not in inf


def test_apply_resolves_refs_and_builds() -> None:
    s = StandIn()
    pt = s.poptorch
    pa.apply_option_calls(pt.Options(), pa.option_calls(make_plan()), pt)
    rec = {c.name.rsplit(".", 1)[-1]: c.args for c in s.log}
    assert rec["accumulationAndReplicationReductionType"] == (pt.ReductionType.Mean,)
    assert rec["PipelinedExecution"] == (pt.AutoStage.AutoIncrement,)
    assert rec["useOnChipStorage"] == (False,) and rec["useReplicatedTensorSharding"] == (True,)
    (loc,) = rec["setOptimizerLocation"]
    assert s.log[s.names().index("poptorch.TensorLocationSettings.useOnChipStorage")].owner is loc
    assert rec["setAvailableMemoryProportion"] == ({"IPU0": 0.3, "IPU1": 0.5},)


def test_create_options_under_poprun(monkeypatch: pytest.MonkeyPatch) -> None:
    s = standin_with_executors(popdist_replicas=4)
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "4")
    monkeypatch.setenv("POPDIST_NUM_IPUS_PER_REPLICA", "2")
    pa.create_options(make_plan(), poptorch=s.poptorch, popdist_module=s.popdist)
    assert s.names()[:3] == ["popdist.init", "popdist.getNumTotalReplicas", "popdist.poptorch.Options"]
    assert s.calls("popdist.poptorch.Options")[0].kwargs == {"ipus_per_replica": 2}
    assert not s.calls("replicationFactor")
    bad = standin_with_executors(popdist_replicas=8)
    with pytest.raises(ValueError, match="poprun runs 8 replicas but execution.replicas=4"):
        pa.create_options(make_plan(), poptorch=bad.poptorch, popdist_module=bad.popdist)


def test_poprun_detection() -> None:
    assert pa.under_poprun({"POPDIST_NUM_TOTAL_REPLICAS": "8"})
    assert not pa.under_poprun({"OMPI_COMM_WORLD_RANK": "0"})
    assert pa.popdist_rank_and_size({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == (1, 2)


def test_annotate_model_blocks_and_checkpoints() -> None:
    s = StandIn()
    model = TinyNet()
    plan = make_plan()
    handles = pa.annotate_model(model, plan, s.poptorch)
    blocks = [c.args for c in s.calls("poptorch.BeginBlock")]
    assert blocks == [(model.stem, "stage0", 0), (model.blocks[2], "stage1", 1)]
    # blocks.1 ends stage 0 (its output is the stage output): no checkpoint there; blocks.0 and blocks.3 get one.
    assert len(handles) == 2
    s.log.clear()
    model(torch.randn(1, 3, 8, 8))
    checkpoints = s.calls("poptorch.recomputationCheckpoint")
    assert [tuple(t.shape for t in c.args) for c in checkpoints] == [((1, 4, 8, 8),)] * 2


def test_training_wrapper_and_precision_cast() -> None:
    s = StandIn()
    model = TinyNet()
    wrapped = pa.TrainingModelWithLoss(model, nn.CrossEntropyLoss(), poptorch=s.poptorch)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    loss, correct = wrapped(x, y)
    assert torch.allclose(loss, nn.functional.cross_entropy(model(x), y))
    assert correct.item() == int((model(x).argmax(1) == y).sum())
    wrapped.return_logits = True
    assert torch.allclose(wrapped(x, y)[2], model(x))
    assert pa.InferenceModel(model)(x).dtype == torch.float32
    assert s.calls("poptorch.identity_loss")[0].kwargs == {"reduction": "mean"}
    plan = make_plan()
    pa.cast_model_for_precision(model, plan)
    assert next(model.parameters()).dtype == torch.float16


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adamw", "rmsprop_tf"])
def test_optimizer_spec(name: str) -> None:
    plan = make_plan()
    cls, kw = pa.optimizer_spec(name, {"lr": 0.1, "weight_decay": 1e-5, "momentum": 0.9, "nesterov": True}, plan)
    assert kw["accum_type"] == torch.float16  # 16.16
    assert kw["loss_scaling"] == plan.loss_scaling.value
    fp32 = make_plan(precision="16.32")
    assert pa.optimizer_spec(name, {"lr": 0.1}, fp32)[1]["accum_type"] == torch.float32
    s = StandIn()  # binds the keyword arguments against the SDK 3.4 constructor (unknown names are refused)
    pa.create_optimizer([nn.Parameter(torch.zeros(1))], name, dict(kw), plan, poptorch=s.poptorch)
    assert s.names() == [f"poptorch.optim.{cls}"] and s.log[0].kwargs == kw
    with pytest.raises(ValueError, match="no PopTorch mapping"):
        pa.optimizer_spec("lamb_x", {"lr": 1.0}, plan)


def test_dataloader_call() -> None:
    s = StandIn()
    pa.create_dataloader("OPTS", [1, 2, 3], make_plan(), poptorch=s.poptorch)
    (call,) = s.calls("poptorch.DataLoader")
    assert call.args == ("OPTS", [1, 2, 3]) and call.kwargs["batch_size"] == 2  # the micro-batch: PopTorch combines
    assert call.kwargs["mode"] == s.poptorch.DataLoaderMode.AsyncRebatched and call.kwargs["drop_last"] is True
    assert call.kwargs["shuffle"] is True and "sampler" not in call.kwargs
    sampler = [2, 0, 1]
    pa.create_dataloader("OPTS", [1, 2, 3], make_plan(), sampler=sampler, poptorch=s.poptorch)
    kw = s.calls("poptorch.DataLoader")[-1].kwargs
    # Our sampler shards and shuffles: PopTorch must neither partition nor shuffle again.
    assert kw["sampler"] is sampler and kw["shuffle"] is False and kw["auto_distributed_partitioning"] is False


def test_host_call_arithmetic() -> None:
    """Samples per host call, loader length and the OutputMode.Sum divisor, against PopTorch's formulas written
    out here (python/__init__.py:319-330, 468-478 at sdk/poptorch/3.4.0)."""
    plan = make_plan()  # micro 2, replicas 4, accumulation 64 / (2 x 4) = 8, device iterations 10
    call = pa.host_call(plan)
    assert call.samples == 2 * 10 * 4 * 8 and call.micro_batches == 10 * 4 * 8
    assert call.samples_per_step == plan.global_batch_size == 64
    assert call.sum_divisor() == 320
    local = pa.host_call(plan, local_replicas=2)  # two poprun instances
    assert local.samples == 2 * 10 * 2 * 8
    assert call.loader_batches(1000) == 1000 // 640 == 1
    assert call.loader_batches(1000, drop_last=False) == 2 and call.loader_batches(1280, drop_last=False) == 2


def test_missing_sdk_message() -> None:
    try:
        import poptorch  # noqa: F401

        pytest.skip("poptorch is installed")
    except ImportError:
        pass
    with pytest.raises(pa.PoplarSDKMissingError, match=r"Poplar SDK.*not on PyPI.*device: cpu or cuda"):
        pa.import_poptorch()


@pytest.mark.ipu
def test_real_poptorch_options_accept_calls() -> None:
    import poptorch

    plan = make_plan()
    opts = pa.create_options(plan)
    assert isinstance(opts, poptorch.Options)
    d = opts.toDict()
    assert d["replication_factor"] == 4 and d["device_iterations"] == 10


@pytest.mark.ipu
def test_real_poptorch_one_step_ipu_model() -> None:
    import poptorch

    plan = build_plan({"device": "ipu", "ipu_model": True, "precision": "32.32"}, TinyNet(),
                      {"micro_batch_size": 2, "global_batch_size": 4})
    model = TinyNet()
    opts = pa.create_options(plan)
    wrapped = pa.TrainingModelWithLoss(model, nn.CrossEntropyLoss())
    opt = pa.create_optimizer(model.parameters(), "sgd", {"lr": 0.1}, plan)
    tm = poptorch.trainingModel(wrapped, opts, opt)
    loss = tm(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss).all()
    tm.detachFromDevice()


# ------------------------------------------------------------------------------------------------ PoptorchBackend


def _backend_setup(monkeypatch=None, **execution):
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    s = standin_with_executors()
    torch.manual_seed(0)
    model = TinyNet()
    ref = TinyNet()
    ref.load_state_dict(model.state_dict())
    ex = {"device": "ipu", "precision": "32.32", "replicas": 1, **execution}
    plan = build_plan(ex, model, {"micro_batch_size": 2, "global_batch_size": 6})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backend = PoptorchBackend(poptorch=s.poptorch)
    backend.prepare(model, opt, plan, TrainSpec(criterion=nn.CrossEntropyLoss()))
    return backend, model, ref, s


def test_backend_step_matches_accumulation() -> None:
    backend, model, ref, s = _backend_setup()
    before = [p.detach().clone() for p in model.parameters()]
    assert backend.micro_batches_per_step == 3
    # The memory engineer's estimate ran before compilation (a tiny model fits easily).
    assert backend.memory_estimate is None or backend.memory_estimate.fits
    g = torch.Generator().manual_seed(3)
    mbs = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(3)]
    result = backend.train_step(mbs)
    # Independent reference: plain PyTorch accumulation of the same micro-batches, one SGD step.
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in mbs:
        loss = nn.functional.cross_entropy(ref(x), y)
        (loss / 3).backward()
        losses.append(loss.item())
    ref_opt.step()
    assert result.loss == pytest.approx(sum(losses) / 3, rel=1e-6) and result.samples == 6
    # The step ran on the device copy: the host weights are the old ones until they are copied back.
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    backend.sync_to_host()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="needs 3 micro-batches"):
        backend.train_step(mbs[:1])
    # The trainer's schedule changes its optimizer's LR; lr_changed pushes it with setOptimizer.
    backend.optimizer.param_groups[0]["lr"] = 0.05
    backend.lr_changed()
    assert s.log[-1].name == "poptorch.PoplarExecutor.setOptimizer"
    assert [g["lr"] for g in s.log[-1].args[0].param_groups] == [0.05]
    backend.sync_to_host()
    assert s.calls("copyWeightsToHostIfNeeded")


def test_backend_validates_model_and_ema_through_one_executor() -> None:
    """Model and EMA weights go through ONE inference executor on the IPUs the training executor also uses (two
    executors would fail to acquire them); each swap is one host->device copy, made by PopTorch itself."""
    backend, model, _, s = _backend_setup(pipeline_splits=["blocks.2"])  # 2 IPUs; the system has exactly 2
    ema = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)  # weights that differ from the model's
    g = torch.Generator().manual_seed(4)
    mbs = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(3)]
    x = torch.randn(5, 3, 8, 8, generator=g)
    for _ in range(2):
        backend.train_step(mbs)
        backend.sync_to_host()  # as the trainer's evaluate() does first
        for module in (None, ema):  # the trainer's order: each model over the whole set
            host = copy.deepcopy(model if module is None else ema).eval()
            for batch in (x, x[:3]):
                assert model.training
                logits = backend.eval_step(batch, module)
                with torch.no_grad():
                    torch.testing.assert_close(logits, host(batch))
    assert len(s.calls("poptorch.inferenceModel")) == 1
    assert s.ipus.peak == 2  # never more than the 2 IPUs of one replica held at once
    infer = [c.args[0].shape[0] for c in s.calls("PoplarExecutor.__call__") if c.owner is backend.eval_executor]
    # 2 stages: 2 device iterations x micro-batch 2 = 4 images a call; 5 = 4 + (1 padded to 4), 3 padded to 4.
    assert infer == [4, 4, 4] * 4
    # One copy to the device per swap (model, EMA, twice); the training executor's weights come back once per
    # evaluation (sync_to_host), and detaching it for the evaluation copies nothing more.
    assert unwrap(backend.eval_executor).transfers == ["to_device"] * 4
    assert unwrap(backend.train_model).transfers.count("to_host") == 2
    assert not s.calls("copyWeightsToDevice") and not s.calls("PoplarExecutor.copyWeightsToHost")
    backend.close()
    assert s.ipus.held == {}


def test_backend_optimizer_state_survives_a_checkpoint() -> None:
    """Momentum lives on the device: state_dict reads it back, load_state_dict writes it before the next run, so a
    resumed run continues the same trajectory (and one without the state does not)."""
    g = torch.Generator().manual_seed(8)
    first, second = ([(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g))
                      for _ in range(3)] for _ in range(2))
    a, model_a, _, _ = _backend_setup()
    a.train_step(first)
    a.sync_to_host()
    weights, state = copy.deepcopy(model_a.state_dict()), copy.deepcopy(a.state_dict())
    a.train_step(second)
    a.sync_to_host()
    for with_state in (True, False):
        b, model_b, _, _ = _backend_setup()
        model_b.load_state_dict(weights)
        if with_state:
            b.load_state_dict(state)
        b.train_step(second)
        b.sync_to_host()
        same = all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model_a.parameters(), model_b.parameters()))
        assert same == with_state


def test_standin_executors_hold_their_ipus() -> None:
    """PopTorch's connection type Always: an executor acquires its IPUs when it compiles and holds them until
    detachFromDevice; a second one on the same IPUs fails (CompilerImpl.cpp:721-726)."""
    s = standin_with_executors()
    pt = s.poptorch
    x = torch.randn(2, 3, 8, 8)
    first = pt.inferenceModel(pa.InferenceModel(TinyNet()), pt.Options())
    second = pt.inferenceModel(pa.InferenceModel(TinyNet()), pt.Options())
    first(x)
    with pytest.raises(pt.Error, match="Failed to acquire 1 IPU"):
        second(x)
    first.detachFromDevice()
    second(x)
    with pytest.raises(pt.Error, match="Device is not attached"):
        first.detachFromDevice()
    with pytest.raises(pt.Error, match="Failed to acquire 1 IPU"):
        first(x)  # re-attaching needs the IPUs back
    with pytest.raises(pt.Error, match="not been compiled"):
        pt.inferenceModel(pa.InferenceModel(TinyNet()), pt.Options()).copyWeightsToDevice()
    opts = pt.Options()
    opts.Training.gradientAccumulation(2)
    with pytest.raises(pt.Error, match="gradientAccumulation to 1"):
        pt.inferenceModel(pa.InferenceModel(TinyNet()), opts)


def _sgd_reference(model: nn.Module, chunks: list, steps: int, per_step: int, lr: float, reduce_sum: bool = False):
    """Plain PyTorch: `steps` SGD steps, each on the mean (or sum) of `per_step` micro-batch gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    model.correct = 0  # top-1 hits over all micro-batches (read by the tests of OutputMode.Sum)
    for d in range(steps):
        opt.zero_grad()
        for x, y in chunks[d * per_step:(d + 1) * per_step]:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            (loss if reduce_sum else loss / per_step).backward()
            losses.append(loss.item())
            model.correct += int((logits.argmax(1) == y).sum())
        opt.step()
    return losses


class BatchNormTinyNet(TinyNet):
    """TinyNet with BatchNorm after the stem: its output depends on the micro-batch, so a wrong accumulation or
    replication count (a wrong micro-batch size on the device) changes the numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("replicas,iterations", [(1, 1), (2, 2)])
def test_backend_numerics_follow_the_options(replicas: int, iterations: int) -> None:
    """What one train_step computes comes from the options the adapter sets (accumulation, replicas, device
    iterations, Mean reduction, output mode): the stand-in executes them, the reference is plain PyTorch."""
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    s = standin_with_executors()
    model, ref = BatchNormTinyNet(), BatchNormTinyNet()
    ref.load_state_dict(model.state_dict())
    plan = build_plan({"device": "ipu", "precision": "32.32", "replicas": replicas, "device_iterations": iterations},
                      model, {"micro_batch_size": 2, "global_batch_size": 6 * replicas})
    backend = PoptorchBackend(poptorch=s.poptorch)
    backend.prepare(model, torch.optim.SGD(model.parameters(), lr=0.2), plan,
                    TrainSpec(criterion=nn.CrossEntropyLoss()))
    g = torch.Generator().manual_seed(5)
    n = backend.micro_batches_per_step
    assert n == 3 * replicas * iterations
    mbs = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(n)]
    result = backend.train_step(mbs)
    losses = _sgd_reference(ref, mbs, iterations, 3 * replicas, lr=0.2)
    # OutputMode.Sum returns sums over the host call: the mean loss divides by every micro-batch of every device
    # iteration and replica, the accuracy by every sample (a divisor without replicas or iterations fails here).
    assert result.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result.accuracy == pytest.approx(ref.correct / (2 * n), abs=1e-9)
    backend.sync_to_host()
    for p, q in zip(model.parameters(), ref.parameters()):  # (BN running statistics are per replica on IPUs)
        torch.testing.assert_close(p, q)


def test_standin_reduction_and_output_modes_follow_the_options() -> None:
    """The stand-in itself: ReductionType Sum/Mean scales the update, OutputMode All/Sum/Final shapes the losses."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    for reduction, mode in [("Mean", "All"), ("Sum", "Sum"), ("Mean", "Final")]:
        s = standin_with_executors()
        pt = s.poptorch
        model, ref = TinyNet(), TinyNet()
        ref.load_state_dict(model.state_dict())
        opts = pt.Options()
        opts.Training.gradientAccumulation(2).accumulationAndReplicationReductionType(getattr(pt.ReductionType,
                                                                                             reduction))
        opts.outputMode(getattr(pt.OutputMode, mode))
        wrapped = pa.TrainingModelWithLoss(model, nn.CrossEntropyLoss(), poptorch=pt)
        executor = pt.trainingModel(wrapped, opts, pt.optim.SGD(model.parameters(), lr=0.1))
        out = executor(x, y)[0]  # (loss, correct): the loss
        losses = _sgd_reference(ref, [(x[:2], y[:2]), (x[2:], y[2:])], 1, 2, lr=0.1, reduce_sum=reduction == "Sum")
        expected = {"All": torch.tensor(losses), "Sum": torch.tensor(sum(losses)), "Final": torch.tensor(losses[-1:])}
        torch.testing.assert_close(out, expected[mode])
        executor.copyWeightsToHost()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)


def test_loss_scaling_keeps_fp16_gradients_from_underflowing() -> None:
    """16.x: the adapter passes the plan's loss scaling to the optimizer; the stand-in rounds gradients of the
    scaled loss to fp16, so without it these gradients (~1e-10) vanish and the weights do not move."""
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    g = torch.Generator().manual_seed(7)
    mbs = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g))]

    def tiny_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 1e-9 * nn.functional.cross_entropy(logits, targets)

    moved = {}
    for scale in (2.0**24, 1.0):
        s = standin_with_executors()
        model = TinyNet()
        plan = build_plan({"device": "ipu", "precision": "16.32", "loss_scaling": scale}, model,
                          {"micro_batch_size": 2, "global_batch_size": 2})
        backend = PoptorchBackend(poptorch=s.poptorch)
        backend.prepare(model, torch.optim.SGD(model.parameters(), lr=1e8), plan, TrainSpec(criterion=tiny_loss))
        ref = copy.deepcopy(model).float()  # fp32 reference from the same fp16 weights
        before = [p.detach().float().clone() for p in model.parameters()]
        backend.train_step(mbs)
        backend.sync_to_host()
        opt = torch.optim.SGD(ref.parameters(), lr=1e8)
        tiny_loss(ref(mbs[0][0]), mbs[0][1]).backward()
        opt.step()
        moved[scale] = max(float((p.float() - b).abs().max()) for p, b in zip(model.parameters(), before))
        if scale > 1:
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p.float(), q.half().float(), atol=2e-3, rtol=2e-3)
    assert moved[2.0**24] > 0.01 and moved[1.0] == 0.0


def test_poptorch_version_assertion_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import poptorch`` asserts the torch it was built for (python/__init__.py:20); the adapter and
    resolve_device turn that into one line naming the SDK and its torch; a missing SDK still means cpu/cuda."""
    from ipu_norm.core.backend import resolve_device

    s = standin_with_executors()
    s.install(monkeypatch)
    monkeypatch.setattr(torch, "__version__", "2.14.1+cpu")
    with pytest.raises(pa.PoptorchTorchMismatchError) as info:
        pa.import_poptorch()
    message = str(info.value)
    assert "\n" not in message and "torch==2.0.1" in message and "2.14.1+cpu" in message
    assert "Poplar SDK" in message and "requirements-ipu.txt" in message
    with pytest.raises(pa.PoptorchTorchMismatchError, match="needs torch==2.0.1"):
        resolve_device("auto")
    monkeypatch.setattr(torch, "__version__", "2.0.1+cu117")
    assert pa.import_poptorch().Options is not None  # the SDK's torch: imports
    assert resolve_device("auto") == "ipu"
    monkeypatch.setitem(sys.modules, "poptorch", None)  # no SDK at all
    with pytest.raises(pa.PoplarSDKMissingError, match="not on PyPI"):
        pa.import_poptorch()
    assert resolve_device("auto") in ("cpu", "cuda")


def test_backend_refuses_agc() -> None:
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    backend = PoptorchBackend(poptorch=StandIn().poptorch)
    plan = build_plan({"device": "ipu"}, TinyNet(), {"micro_batch_size": 2})
    with pytest.raises(NotImplementedError, match="agc_scope: step"):
        backend.prepare(TinyNet(), torch.optim.SGD(TinyNet().parameters(), lr=0.1), plan,
                        TrainSpec(criterion=nn.CrossEntropyLoss(), agc_clip=0.01))


def test_trainer_get_backend_reaches_create_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import get_backend
    from ipu_norm.train.distributed import DistInfo

    monkeypatch.setitem(sys.modules, "poptorch", StandIn().poptorch)
    cfg = types.SimpleNamespace(execution=types.SimpleNamespace(device="ipu"))
    assert isinstance(get_backend(cfg, DistInfo()), PoptorchBackend)


def test_trainer_end_to_end_on_fake_poptorch(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The app's trainer with execution.device: ipu, PopTorch replaced by the CPU stand-in: the trainer/backend
    contract (micro-batches per call, LR pushes, host syncs, evaluation, checkpoints) holds end to end."""
    import sys

    from ipu_norm.config.loader import load_config
    from ipu_norm.train.trainer import train

    s = standin_with_executors()
    monkeypatch.setitem(sys.modules, "poptorch", s.poptorch)
    cfg = load_config("configs/tiny_resnet18_gn.yml", overrides=[
        "execution.device=ipu", "execution.pipeline_splits=[blocks.2]", "execution.replicas=1",
        "execution.device_iterations=2", "train.global_batch_size=12", f"train.output_dir={tmp_path}",
        "train.epochs=1", "train.ema_decay=null",
    ])
    result = train(cfg, log=lambda msg: None)
    # Accumulation 12 / 4 = 3 >= 2N-1 for 2 stages; 64 samples // (micro 4 x accumulation 3 x device iterations 2)
    # = 2 calls x 2 optimizer steps.
    assert result.global_step == 4
    assert len(s.calls("setOptimizer")) == 2  # one LR push per host call
    assert s.calls("poptorch.BeginBlock")
    assert s.calls("poptorch.inferenceModel")  # validation ran through the inference executable
    assert result.last_checkpoint is not None and result.last_checkpoint.exists()


@pytest.mark.ipu
def test_real_poptorch_pipelined_recompute_ipu_model() -> None:
    """Two pipeline stages with checkpoints on the IPU Model: compiles, trains, weights come back to the host."""
    import poptorch

    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    plan = build_plan({"device": "ipu", "ipu_model": True, "pipeline_splits": ["blocks.2"], "recompute": "checkpoints",
                       "recompute_checkpoints": ["blocks.0"]}, model, {"micro_batch_size": 2, "global_batch_size": 6})
    pa.annotate_model(model, plan)
    opts = pa.create_options(plan)
    opt = pa.create_optimizer(model.parameters(), "sgd", {"lr": 0.1}, plan)
    tm = poptorch.trainingModel(pa.TrainingModelWithLoss(model, nn.CrossEntropyLoss()), opts, opt)
    losses = tm(torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,)))
    assert torch.isfinite(losses).all()
    tm.copyWeightsToHost()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    tm.detachFromDevice()


def test_backend_refuses_plan_over_ipu_memory_before_compiling() -> None:
    """execution.memory_check: error (the default) stops before poptorch.trainingModel; warn only reports."""
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.memory import MemoryBudgetError
    from ipu_norm.train.backend import TrainSpec

    huge = {"micro_batch_size": 200_000, "global_batch_size": 200_000}  # ~GBs of activations for TinyNet
    for mode in ("error", "warn"):
        cfg = types.SimpleNamespace(execution=types.SimpleNamespace(memory_check=mode), optim=None)
        backend = PoptorchBackend(cfg=cfg, poptorch=standin_with_executors().poptorch)
        model = TinyNet()
        plan = build_plan({"device": "ipu"}, model, huge)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if mode == "error":
            with pytest.raises(MemoryBudgetError, match="stage 0.*budget"):
                backend.prepare(model, opt, plan, TrainSpec(criterion=nn.CrossEntropyLoss()))
            assert backend.train_model is None  # nothing was compiled
        else:
            with pytest.warns(RuntimeWarning, match="budget"):
                backend.prepare(model, opt, plan, TrainSpec(criterion=nn.CrossEntropyLoss()))
            assert backend.train_model is not None


def test_poprun_instances_shard_data_without_a_process_group(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Under `poprun --num-instances=2 --num-replicas=2`, instance 1 drives 1 replica and reads half the data."""
    import sys

    from ipu_norm.config.loader import load_config
    from ipu_norm.train.distributed import init_distributed
    from ipu_norm.train.trainer import Trainer

    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "2")
    monkeypatch.setenv("POPDIST_NUM_IPUS_PER_REPLICA", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    info = init_distributed("ipu")
    assert (info.enabled, info.rank, info.world_size, info.is_main) == (False, 1, 2, False)
    assert init_distributed("cpu").world_size == 1  # torchrun's variables decide on CPU/GPU, not poprun's

    s = standin_with_executors(popdist_replicas=2)
    monkeypatch.setitem(sys.modules, "popdist", s.popdist)
    monkeypatch.setitem(sys.modules, "popdist.poptorch", s.popdist.poptorch)
    monkeypatch.setitem(sys.modules, "poptorch", s.poptorch)
    cfg = load_config("configs/tiny_resnet18_gn.yml", overrides=[
        "execution.device=ipu", "execution.replicas=2", "train.global_batch_size=16", f"train.output_dir={tmp_path}",
        "train.epochs=1", "train.ema_decay=null",
    ])
    trainer = Trainer(cfg, log=lambda msg: None)
    assert trainer.sampler.num_replicas == 2 and trainer.sampler.rank == 1
    # accumulation 16 / (4 x 2 replicas) = 2; this instance drives 1 of the 2 replicas.
    assert trainer.micro_per_call == trainer.backend.micro_batches_per_step == 2


def test_trainer_ipu_throughput_shape(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The trainer on the IPU backend (stand-in): one AsyncRebatched poptorch.DataLoader per epoch whose batches are
    whole host calls, uint8 images (mixed by Mixup and still 8-bit) reaching the executable, and no weight copy to
    the host between training host calls (only at validation / checkpoints / the end)."""
    from ipu_norm.config.loader import load_config
    from ipu_norm.train.trainer import train

    s = standin_with_executors()
    monkeypatch.setitem(sys.modules, "poptorch", s.poptorch)
    cfg = load_config("configs/tiny_digits_resnet18.yml", overrides=[
        "execution.device=ipu", "execution.replicas=1", "execution.device_iterations=2",
        "train.micro_batch_size=8", "train.global_batch_size=16", "train.epochs=1", "train.max_steps=6",
        "train.mixup_alpha=0.2", f"train.output_dir={tmp_path}",
    ])
    result = train(cfg, log=lambda msg: None)
    assert result.global_step == 6  # 3 host calls x 2 device iterations
    (loader,) = s.calls("poptorch.DataLoader")
    assert loader.kwargs["batch_size"] == 8 and loader.kwargs["mode"] == s.poptorch.DataLoaderMode.AsyncRebatched
    calls = [i for i, c in enumerate(s.log) if c.name == "poptorch.PoplarExecutor.__call__" and len(c.args) == 2]
    assert len(calls) == 3
    for i in calls:
        images, targets = s.log[i].args
        assert images.dtype == torch.uint8 and images.shape[0] == 8 * 2 * 2  # micro x accumulation x iterations
        assert targets.shape == (32, 10)  # Mixup's soft targets
    between = [c.name for c in s.log[calls[0]:calls[-1]]]
    assert not [n for n in between if "copyWeightsToHost" in n or n.endswith("detachFromDevice")], between
    assert s.calls("copyWeightsToHostIfNeeded")  # ... but they do come back for validation and the checkpoint


def test_ipu_backend_refuses_a_per_step_ema() -> None:
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    s = standin_with_executors()
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(ema_decay=0.97),
                                execution=types.SimpleNamespace(memory_check="off"))
    model = TinyNet()
    plan = build_plan({"device": "ipu", "precision": "32.32"}, model, {"micro_batch_size": 2, "global_batch_size": 2})
    with pytest.raises(ValueError, match=r"^train\.ema_decay=0\.97 .*weight_avg_strategy") as err:
        PoptorchBackend(cfg, poptorch=s.poptorch).prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), plan,
                                                          TrainSpec(criterion=nn.CrossEntropyLoss()))
    assert "\n" not in str(err.value)


def test_uint8_images_are_normalised_in_the_graph() -> None:
    """A uint8 batch through the training / inference wrappers equals the float pipeline (torchvision's ToTensor +
    Normalize written out here) through the bare model."""
    from ipu_norm.data.device import NormalizeUint8

    s = StandIn()
    model = TinyNet().eval()
    g = torch.Generator().manual_seed(9)
    x8 = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    xf = (x8.float() / 255 - mean) / std
    torch.testing.assert_close(pa.InferenceModel(model, input_norm=NormalizeUint8())(x8), model(xf))
    y = torch.tensor([1, 2])
    loss, _ = pa.TrainingModelWithLoss(model, nn.CrossEntropyLoss(), poptorch=s.poptorch,
                                       input_norm=NormalizeUint8())(x8, y)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(xf), y))
    with pytest.raises(TypeError, match="uint8"):
        pa.InferenceModel(model)(x8)


def test_backend_accuracy_divides_the_summed_hits_by_the_host_call() -> None:
    """OutputMode.Sum returns the top-1 hits summed over device iterations, accumulation and replicas: a model that
    always predicts class 0 (lr 0: it stays so) scores exactly the share of 0 labels; a divisor missing the replicas
    or the device iterations gives 2x."""
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    s = standin_with_executors()
    model = TinyNet()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.arange(10, 0, -1, dtype=torch.float32))  # class 0 wins, fixed logits
    plan = build_plan({"device": "ipu", "precision": "32.32", "replicas": 2, "device_iterations": 2}, model,
                      {"micro_batch_size": 2, "global_batch_size": 12})
    backend = PoptorchBackend(poptorch=s.poptorch)
    backend.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0), plan,
                    TrainSpec(criterion=nn.CrossEntropyLoss()))
    n = backend.micro_batches_per_step
    assert n == 3 * 2 * 2
    labels = torch.tensor([0, 1] * n)
    labels[:4] = 0  # 13 zeros of 24
    mbs = [(torch.randn(2, 3, 8, 8), labels[2 * k:2 * k + 2]) for k in range(n)]
    result = backend.train_step(mbs)
    assert result.accuracy == pytest.approx(int((labels == 0).sum()) / 24, abs=1e-12)
    logp = torch.log_softmax(torch.arange(10, 0, -1, dtype=torch.float64), 0)
    assert result.loss == pytest.approx(float(-logp[labels].mean()), rel=1e-6)


def test_mixup_keeps_uint8_images_8_bit() -> None:
    """Mixup on the host keeps 8-bit input: the mix is computed in float and rounded (reference: the same Mixup,
    same seed, on float images), so uint8 still crosses the host link; targets are unchanged."""
    from ipu_norm.data.mixup import MixupCutmix, mix_keeping_dtype

    g = torch.Generator().manual_seed(11)
    x8 = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    make = lambda: MixupCutmix(mixup_alpha=1.0, cutmix_alpha=0.0, num_classes=5, seed=3)  # noqa: E731
    ref_x, ref_t = make()(x8.float(), y)
    out_x, out_t = mix_keeping_dtype(make(), x8, y)
    assert out_x.dtype == torch.uint8
    assert not torch.equal(out_x, x8)  # it mixed
    torch.testing.assert_close(out_x.float(), ref_x.round(), atol=0, rtol=0)
    torch.testing.assert_close(out_t, ref_t)
