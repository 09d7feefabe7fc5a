"""PopTorch adapter: pure option/optimizer translation, applied to a recorder; real-poptorch tests marked `ipu`."""

import enum
import types

import pytest
import torch
from tiny_models import TinyNet
from torch import nn

from ipu_norm.ipu import poptorch_adapter as pa
from ipu_norm.ipu.plan import build_plan


class Recorder:
    """Stands in for poptorch.Options (and its sub-objects): records every dotted call, returns itself."""

    def __init__(self, log: list, path: str = "") -> None:
        self._log, self._path = log, path

    def __getattr__(self, name: str) -> "Recorder":
        return Recorder(self._log, f"{self._path}.{name}" if self._path else name)

    def __call__(self, *args, **kwargs) -> "Recorder":
        self._log.append((self._path, args, kwargs))
        return self


class FakeEnum(enum.IntEnum):
    Mean = 1
    All = 2
    AutoIncrement = 11
    Async = 21


def fake_poptorch(log: list) -> types.SimpleNamespace:
    """A poptorch stand-in with the attributes the adapter resolves; constructors record their arguments."""

    class TensorLocationSettings:
        def __init__(self) -> None:
            self.settings: dict = {}

        def useOnChipStorage(self, use=True):  # noqa: N802 (poptorch's name)
            self.settings["onChip"] = use
            return self

        def useReplicatedTensorSharding(self, use=True):  # noqa: N802
            self.settings["rts"] = use
            return self

    def begin_block(module, user_id=None, ipu_id=None):
        log.append(("BeginBlock", module, user_id, ipu_id))
        return module

    def checkpoint(*tensors):
        log.append(("recomputationCheckpoint", tuple(t.shape for t in tensors)))
        return tensors[0] if len(tensors) == 1 else tensors

    def identity_loss(x, reduction):
        log.append(("identity_loss", reduction))
        return x

    def optim_cls(name):
        def make(params, **kw):
            log.append((f"optim.{name}", kw))
            return (name, list(params), kw)

        return make

    return types.SimpleNamespace(
        Options=lambda: Recorder(log),
        ReductionType=types.SimpleNamespace(Mean=FakeEnum.Mean),
        OutputMode=types.SimpleNamespace(All=FakeEnum.All),
        AutoStage=types.SimpleNamespace(AutoIncrement=FakeEnum.AutoIncrement),
        DataLoaderMode=types.SimpleNamespace(Async=FakeEnum.Async),
        PipelinedExecution=lambda *a: ("PipelinedExecution", a),
        TensorLocationSettings=TensorLocationSettings,
        BeginBlock=begin_block,
        recomputationCheckpoint=checkpoint,
        identity_loss=identity_loss,
        optim=types.SimpleNamespace(SGD=optim_cls("SGD"), RMSprop=optim_cls("RMSprop"), AdamW=optim_cls("AdamW")),
        DataLoader=lambda *a, **kw: ("DataLoader", a, kw),
    )


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
    assert by["outputMode"].args == (pa.Ref("OutputMode.All"),)
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
    log: list = []
    fake = fake_poptorch(log)
    pa.apply_option_calls(fake.Options(), pa.option_calls(make_plan()), fake)
    rec = {path: args for path, args, _ in log}
    assert rec["Training.accumulationAndReplicationReductionType"] == (FakeEnum.Mean,)
    assert rec["setExecutionStrategy"] == (("PipelinedExecution", (FakeEnum.AutoIncrement,)),)
    (loc,) = rec["TensorLocations.setOptimizerLocation"]
    assert loc.settings == {"onChip": False, "rts": True}
    assert rec["setAvailableMemoryProportion"] == ({"IPU0": 0.3, "IPU1": 0.5},)


def test_create_options_under_poprun(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list = []
    fake = fake_poptorch(log)
    inits = []
    popdist = types.SimpleNamespace(
        init=lambda: inits.append(1),
        getNumTotalReplicas=lambda: 4,
        poptorch=types.SimpleNamespace(Options=lambda ipus_per_replica: log.append(("popdist.Options",
                                                                                    ipus_per_replica)) or
                                       Recorder(log)),
    )
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "4")
    monkeypatch.setenv("POPDIST_NUM_IPUS_PER_REPLICA", "2")
    pa.create_options(make_plan(), poptorch=fake, popdist_module=popdist)
    assert inits == [1] and ("popdist.Options", 2) in log
    assert not any(entry[0] == "replicationFactor" for entry in log)
    bad = types.SimpleNamespace(**{**vars(popdist), "getNumTotalReplicas": lambda: 8})
    with pytest.raises(ValueError, match="poprun runs 8 replicas but execution.replicas=4"):
        pa.create_options(make_plan(), poptorch=fake, popdist_module=bad)


def test_poprun_detection() -> None:
    assert pa.under_poprun({"POPDIST_NUM_TOTAL_REPLICAS": "8"})
    assert not pa.under_poprun({"OMPI_COMM_WORLD_RANK": "0"})
    assert pa.popdist_rank_and_size({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == (1, 2)


def test_annotate_model_blocks_and_checkpoints() -> None:
    log: list = []
    fake = fake_poptorch(log)
    model = TinyNet()
    plan = make_plan()
    handles = pa.annotate_model(model, plan, fake)
    blocks = [e for e in log if e[0] == "BeginBlock"]
    assert [(m, uid, ipu) for _, m, uid, ipu in blocks] == [(model.stem, "stage0", 0), (model.blocks[2], "stage1", 1)]
    # blocks.1 ends stage 0 (its output is the stage output): no checkpoint there; blocks.0 and blocks.3 get one.
    assert len(handles) == 2
    log.clear()
    model(torch.randn(1, 3, 8, 8))
    assert [e for e in log if e[0] == "recomputationCheckpoint"] == [("recomputationCheckpoint", ((1, 4, 8, 8),))] * 2


def test_training_wrapper_and_precision_cast() -> None:
    log: list = []
    fake = fake_poptorch(log)
    model = TinyNet()
    wrapped = pa.TrainingModelWithLoss(model, nn.CrossEntropyLoss(), poptorch=fake)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    loss = wrapped(x, y)
    assert torch.allclose(loss, nn.functional.cross_entropy(model(x), y))
    wrapped.return_logits = True
    assert torch.allclose(wrapped(x, y)[1], model(x))
    assert pa.InferenceModel(model)(x).dtype == torch.float32
    assert ("identity_loss", "mean") in log
    plan = make_plan()
    pa.cast_model_for_precision(model, plan)
    assert next(model.parameters()).dtype == torch.float16


# Parameter names of the SDK 3.x poptorch.optim constructors (python/optim.py) that the adapter may pass.
POPTORCH_OPTIM_PARAMS = {
    "SGD": {"lr", "momentum", "dampening", "weight_decay", "nesterov", "loss_scaling", "velocity_scaling",
            "use_combined_accum", "accum_type", "velocity_accum_type", "max_grad_norm"},
    "RMSprop": {"lr", "alpha", "eps", "weight_decay", "momentum", "centered", "loss_scaling", "accum_type",
                "first_order_momentum_accum_type", "second_order_momentum_accum_type", "use_tf_variant"},
    "AdamW": {"lr", "betas", "eps", "weight_decay", "amsgrad", "loss_scaling", "bias_correction", "accum_type",
              "first_order_momentum_accum_type", "second_order_momentum_accum_type", "max_grad_norm"},
}


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adamw"])
def test_optimizer_spec(name: str) -> None:
    plan = make_plan()
    cls, kw = pa.optimizer_spec(name, {"lr": 0.1, "weight_decay": 1e-5, "momentum": 0.9, "nesterov": True}, plan)
    assert set(kw) <= POPTORCH_OPTIM_PARAMS[cls]
    assert kw["accum_type"] == torch.float16  # 16.16
    assert kw["loss_scaling"] == plan.loss_scaling.value
    fp32 = make_plan(precision="16.32")
    assert pa.optimizer_spec(name, {"lr": 0.1}, fp32)[1]["accum_type"] == torch.float32
    log: list = []
    out = pa.create_optimizer([nn.Parameter(torch.zeros(1))], name, {"lr": 0.1}, plan, poptorch=fake_poptorch(log))
    assert out[0] == cls
    with pytest.raises(ValueError, match="no PopTorch mapping"):
        pa.optimizer_spec("lamb_x", {"lr": 1.0}, plan)


def test_dataloader_call() -> None:
    log: list = []
    fake = fake_poptorch(log)
    _, args, kw = pa.create_dataloader("OPTS", [1, 2, 3], make_plan(), poptorch=fake)
    assert args == ("OPTS", [1, 2, 3]) and kw["batch_size"] == 2 and kw["mode"] == FakeEnum.Async


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


class FakeExecutor:
    """Mimics a PoplarExecutor on the CPU: accumulation over micro-batches, Mean reduction, one optimizer step."""

    def __init__(self, module, optimizer=None, micro=None, log=None):
        self.module, self.optimizer, self.micro, self.log = module, optimizer, micro, log
        self.attached, self.compiled = False, False

    def __call__(self, *args):
        self.attached = self.compiled = True
        if self.optimizer is None:
            self.log.append(("infer", args[0].shape[0]))
            return self.module(*args)
        images, targets = args
        mbs = list(zip(images.split(self.micro), targets.split(self.micro)))
        self.optimizer.zero_grad()
        losses = []
        for x, y in mbs:
            loss = self.module(x, y)
            (loss / len(mbs)).backward()
            losses.append(loss.detach())
        self.optimizer.step()
        return torch.stack(losses)

    def isAttachedToDevice(self):  # noqa: N802 (PopTorch's names)
        return self.attached

    def isCompiled(self):  # noqa: N802
        return self.compiled

    def detachFromDevice(self):  # noqa: N802
        self.log.append(("detach", self.optimizer is not None))
        self.attached = False

    def copyWeightsToHost(self):  # noqa: N802
        self.log.append(("copyWeightsToHost",))

    def copyWeightsToDevice(self):  # noqa: N802
        self.log.append(("copyWeightsToDevice",))

    def setOptimizer(self, opt):  # noqa: N802
        self.log.append(("setOptimizer", [g["lr"] for g in opt.param_groups]))


def fake_poptorch_with_executors(log, micro):
    fake = fake_poptorch(log)
    real_sgd = torch.optim.SGD

    def sgd(params, **kw):
        log.append(("optim.SGD", kw))
        return real_sgd(params, lr=kw["lr"], momentum=kw["momentum"], nesterov=kw["nesterov"],
                        weight_decay=kw["weight_decay"])

    fake.optim.SGD = sgd
    fake.trainingModel = lambda m, options=None, optimizer=None: FakeExecutor(m, optimizer, micro, log)
    fake.inferenceModel = lambda m, options=None: FakeExecutor(m, None, None, log)
    return fake


def _backend_setup(monkeypatch=None, **execution):
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    log: list = []
    fake = fake_poptorch_with_executors(log, micro=2)
    torch.manual_seed(0)
    model = TinyNet()
    ref = TinyNet()
    ref.load_state_dict(model.state_dict())
    ex = {"device": "ipu", "precision": "32.32", "replicas": 1, **execution}
    plan = build_plan(ex, model, {"micro_batch_size": 2, "global_batch_size": 6})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backend = PoptorchBackend(poptorch=fake)
    backend.prepare(model, opt, plan, TrainSpec(criterion=nn.CrossEntropyLoss()))
    return backend, model, ref, log


def test_backend_step_matches_accumulation() -> None:
    backend, model, ref, log = _backend_setup()
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
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="needs 3 micro-batches"):
        backend.train_step(mbs[:1])
    # The trainer's schedule changes its optimizer's LR; lr_changed pushes it with setOptimizer.
    backend.optimizer.param_groups[0]["lr"] = 0.05
    backend.lr_changed()
    assert log[-1] == ("setOptimizer", [0.05])
    backend.sync_to_host()
    assert ("copyWeightsToHost",) in log


def test_backend_eval_pads_and_detaches() -> None:
    backend, model, _, log = _backend_setup()
    g = torch.Generator().manual_seed(4)
    mbs = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(3)]
    backend.train_step(mbs)
    x = torch.randn(5, 3, 8, 8)
    assert model.training
    logits = backend.eval_step(x)
    assert model.training  # eval mode only while the inference executable traces/runs
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(x))
    model.train()
    assert ("detach", True) in log  # the training executable released the IPUs first
    assert [e for e in log if e[0] == "infer"] == [("infer", 2)] * 3  # 2 + 2 + (1 padded to 2)
    log.clear()
    backend.train_step(mbs)
    backend.eval_step(x)
    assert ("copyWeightsToDevice",) in log  # new host weights since the last evaluation
    backend.close()


def test_backend_refuses_agc() -> None:
    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import TrainSpec

    backend = PoptorchBackend(poptorch=fake_poptorch([]))
    plan = build_plan({"device": "ipu"}, TinyNet(), {"micro_batch_size": 2})
    with pytest.raises(NotImplementedError, match="agc_clip"):
        backend.prepare(TinyNet(), torch.optim.SGD(TinyNet().parameters(), lr=0.1), plan,
                        TrainSpec(criterion=nn.CrossEntropyLoss(), agc_clip=0.01))


def test_trainer_get_backend_reaches_create_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ipu_norm.ipu.backend import PoptorchBackend
    from ipu_norm.train.backend import get_backend
    from ipu_norm.train.distributed import DistInfo

    monkeypatch.setitem(sys.modules, "poptorch", fake_poptorch([]))
    cfg = types.SimpleNamespace(execution=types.SimpleNamespace(device="ipu"))
    assert isinstance(get_backend(cfg, DistInfo()), PoptorchBackend)


def test_trainer_end_to_end_on_fake_poptorch(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The app's trainer with execution.device: ipu, PopTorch replaced by the CPU stand-in: the trainer/backend
    contract (micro-batches per call, LR pushes, host syncs, evaluation, checkpoints) holds end to end."""
    import sys

    from ipu_norm.config.loader import load_config
    from ipu_norm.train.trainer import train

    log: list = []
    monkeypatch.setitem(sys.modules, "poptorch", fake_poptorch_with_executors(log, micro=4))
    cfg = load_config("configs/tiny_resnet18_gn.yml", overrides=[
        "execution.device=ipu", "execution.pipeline_splits=[blocks.2]", "execution.replicas=1",
        "execution.device_iterations=2", "train.global_batch_size=12", f"train.output_dir={tmp_path}",
        "train.epochs=1",
    ])
    result = train(cfg, log=lambda msg: None)
    # Accumulation 12 / 4 = 3 >= 2N-1 for 2 stages; 64 samples // (micro 4 x accumulation 3 x device iterations 2)
    # = 2 calls x 2 optimizer steps.
    assert result.global_step == 4
    calls = [e for e in log if e[0] == "setOptimizer"]
    assert len(calls) == 2  # one LR push per host call
    assert ("BeginBlock" in {e[0] for e in log})
    assert any(e[0] == "infer" for e in log)  # validation ran through the inference executable
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
        log: list = []
        cfg = types.SimpleNamespace(execution=types.SimpleNamespace(memory_check=mode), optim=None)
        backend = PoptorchBackend(cfg=cfg, poptorch=fake_poptorch_with_executors(log, micro=2))
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

    log: list = []
    popdist = types.SimpleNamespace(
        init=lambda: log.append(("popdist.init",)),
        getNumTotalReplicas=lambda: 2,
        poptorch=types.SimpleNamespace(Options=lambda ipus_per_replica: Recorder(log)),
    )
    monkeypatch.setitem(sys.modules, "popdist", popdist)
    monkeypatch.setitem(sys.modules, "popdist.poptorch", popdist.poptorch)
    monkeypatch.setitem(sys.modules, "poptorch", fake_poptorch_with_executors(log, micro=4))
    cfg = load_config("configs/tiny_resnet18_gn.yml", overrides=[
        "execution.device=ipu", "execution.replicas=2", "train.global_batch_size=16", f"train.output_dir={tmp_path}",
        "train.epochs=1", "train.ema_decay=null",
    ])
    trainer = Trainer(cfg, log=lambda msg: None)
    assert trainer.sampler.num_replicas == 2 and trainer.sampler.rank == 1
    # accumulation 16 / (4 x 2 replicas) = 2; this instance drives 1 of the 2 replicas.
    assert trainer.micro_per_call == trainer.backend.micro_batches_per_step == 2
