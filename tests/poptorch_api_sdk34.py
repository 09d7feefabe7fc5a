"""The PopTorch / PopDist / PopART API surface that ipu_norm uses, as data, read from ONE SDK release.

Release: Poplar SDK 3.4.0 -- graphcore/poptorch tag ``sdk/poptorch/3.4.0`` (python/__init__.py, options.py, ops.py,
optim.py, enums.py, _poplar_executor.py) and graphcore/popart tag ``sdk/poplar/3.4.0``
(willow/include/popart/sessionoptions.hpp) plus poptorch's popart_compiler/source/SessionOptions.cpp at the same
poptorch tag for the ``_Popart.set`` keys.

popdist: its sources (graphcore/popdist) are not in the stored repositories; the few popdist entries below are
taken from how Graphcore's own applications call it (graphcore/examples, SDK 3.x era) and are marked
``verified=False``. They are the part of this table that could still be wrong.

Each entry: ``kind`` (module | class | function | method | property | attribute | enum | exception), ``params`` (the
parameter list in ``lambda`` syntax, ``self`` dropped; defaults are written ``...`` because only the names, their
order and the ``*args`` / ``**kwargs`` / keyword-only markers matter for conformance), ``returns`` ("self", the
name of a table class, or None), ``bases`` (table classes whose members are inherited), ``members`` (enum
members) and ``source`` (file:line at the tag). A class's members are the entries named ``<class>.<member>``.

Only what ipu_norm calls (or a test of the real library calls) is listed: this is a conformance table for
this project, not a full API dump. Adding a call to ipu_norm/ipu/ means adding its real signature here.
"""

from __future__ import annotations

from dataclasses import dataclass

SDK_RELEASE = "Poplar SDK 3.4.0"
POPTORCH_TAG = "graphcore/poptorch@sdk/poptorch/3.4.0"
POPART_TAG = "graphcore/popart@sdk/poplar/3.4.0"


@dataclass(frozen=True)
class Api:
    """One attribute of the real API (see the module docstring for the fields)."""

    kind: str
    params: str | None = None
    returns: str | None = None
    source: str = ""
    bases: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    verified: bool = True


_OPT = "python/options.py"
_OPS = "python/ops.py"
_INIT = "python/__init__.py"
_EXE = "python/_poplar_executor.py"
_OPTIM = "python/optim.py"
_ENUMS = "python/enums.py"
_EXAMPLES = "graphcore/examples usage (popdist source not stored here)"

_TRAIN = "poptorch.options._TrainingOptions"
_PREC = "poptorch.options._PrecisionOptions"
_TLOC = "poptorch.options._TensorLocationOptions"
_POPART = "poptorch.options._PopartOptions"

API: dict[str, Api] = {
    # ------------------------------------------------------------------------------------------- modules
    "poptorch": Api("module", source=_INIT),
    "poptorch.optim": Api("module", source=_OPTIM),
    "poptorch.options": Api("module", source=_OPT),
    "popdist": Api("module", source=_EXAMPLES, verified=False),
    "popdist.poptorch": Api("module", source=_EXAMPLES, verified=False),
    # ------------------------------------------------------------------------------------------- poptorch.Options
    "poptorch.Options": Api("class", "", source=f"{_OPT}:1146"),
    "poptorch.Options.replicationFactor": Api("method", "replication_factor", "self", f"{_OPT}:1459"),
    "poptorch.Options.deviceIterations": Api("method", "device_iterations", "self", f"{_OPT}:1396"),
    "poptorch.Options.autoRoundNumIPUs": Api("method", "auto_round_num_ipus=...", "self", f"{_OPT}:1381"),
    "poptorch.Options.outputMode": Api("method", "output_mode, output_return_period=...", "self", f"{_OPT}:1692"),
    "poptorch.Options.setAvailableMemoryProportion": Api("method", "available_memory_proportion", "self",
                                                         f"{_OPT}:1426"),
    "poptorch.Options.enableExecutableCaching": Api("method", "path", "self", f"{_OPT}:1552"),
    "poptorch.Options.useIpuModel": Api("method", "use_model", "self", f"{_OPT}:1567"),
    "poptorch.Options.randomSeed": Api("method", "random_seed", "self", f"{_OPT}:1740"),
    "poptorch.Options.setExecutionStrategy": Api("method", "strategy", "self", f"{_OPT}:1408"),
    "poptorch.Options.connectionType": Api("method", "connection_type", "self", f"{_OPT}:1584"),
    "poptorch.Options.toDict": Api("method", "", None, f"{_OPT}:1871"),
    "poptorch.Options.Training": Api("property", returns=_TRAIN, source=f"{_OPT}:1369"),
    "poptorch.Options.Precision": Api("property", returns=_PREC, source=f"{_OPT}:1361"),
    "poptorch.Options.TensorLocations": Api("property", returns=_TLOC, source=f"{_OPT}:1337"),
    "poptorch.Options._Popart": Api("property", returns=_POPART, source=f"{_OPT}:1376"),
    # options.Training / Precision / TensorLocations / _Popart
    _TRAIN: Api("class", "popart_options", source=f"{_OPT}:196"),
    f"{_TRAIN}.gradientAccumulation": Api("method", "gradient_accumulation", "self", f"{_OPT}:216"),
    f"{_TRAIN}.accumulationAndReplicationReductionType": Api("method", "reduction_type", "self", f"{_OPT}:278"),
    f"{_TRAIN}.setAutomaticLossScaling": Api("method", "enabled", "self", f"{_OPT}:336"),
    _PREC: Api("class", "popart_options", source=f"{_OPT}:71"),
    f"{_PREC}.enableStochasticRounding": Api("method", "enabled", "self", f"{_OPT}:142"),
    f"{_PREC}.setPartialsType": Api("method", "dtype", "self", f"{_OPT}:165"),
    _TLOC: Api("class", "", source=f"{_OPT}:590"),
    f"{_TLOC}.setOptimizerLocation": Api("method", "location", "self", f"{_OPT}:647"),
    _POPART: Api("class", "", source=f"{_OPT}:377"),
    f"{_POPART}.set": Api("method", "key, value", "self", f"{_OPT}:416"),
    # TensorLocationSettings (OptionsDict.__init__(self, **default_values)) and the pipelined strategy
    "poptorch.TensorLocationSettings": Api("class", "**default_values", source=f"{_OPT}:515"),
    "poptorch.TensorLocationSettings.useOnChipStorage": Api("method", "use=...", "self", f"{_OPT}:539"),
    "poptorch.TensorLocationSettings.useReplicatedTensorSharding": Api("method", "use=...", "self", f"{_OPT}:555"),
    "poptorch.PipelinedExecution": Api("class", "*args", source=f"{_OPT}:806"),
    # ------------------------------------------------------------------------------------------- enums
    "poptorch.ReductionType": Api("enum", members=("Sum", "Mean", "NoReduction"), source=f"{_ENUMS}:105"),
    "poptorch.OutputMode": Api("enum", members=("Final", "EveryN", "All", "Sum", "Default"), source=f"{_ENUMS}:65"),
    "poptorch.AutoStage": Api("enum", members=("SameAsIpu", "AutoIncrement"), source=f"{_ENUMS}:175"),
    "poptorch.ConnectionType": Api("enum", members=("Always", "OnDemand", "Never"), source=f"{_ENUMS}:81"),
    "poptorch.DataLoaderMode": Api("enum", members=("Sync", "Async", "AsyncRebatched"), source=f"{_ENUMS}:26"),
    # ------------------------------------------------------------------------------------------- ops
    "poptorch.BeginBlock": Api("function", "layer_to_call, user_id=..., ipu_id=...", source=f"{_OPS}:689"),
    "poptorch.recomputationCheckpoint": Api("function", "*tensors", source=f"{_OPS}:358"),
    "poptorch.identity_loss": Api("function", "x, reduction", source=f"{_OPS}:1014"),
    "poptorch.custom_op": Api("function", "inputs, name, domain, domain_version, example_outputs, attributes=...",
                              source=f"{_OPS}:787"),
    "poptorch.isRunningOnIpu": Api("function", "", source="python/_impl.py:76 (re-exported in __init__.py)"),
    # poptorch_core.Error, re-exported (every PopTorch error: createPoptorchError, python/_impl.py:67)
    "poptorch.Error": Api("exception", source=f"{_INIT}:41"),
    # ------------------------------------------------------------------------------------------- model wrappers
    "poptorch.trainingModel": Api("function", "model, options=..., optimizer=...", "poptorch.PoplarExecutor",
                                  f"{_INIT}:660"),
    "poptorch.inferenceModel": Api("function", "model, options=...", "poptorch.PoplarExecutor", f"{_INIT}:720"),
    "poptorch.PoplarExecutor": Api("class", "model, options, training, poptorch_version, optimizer=..., "
                                   "user_model=...", source=f"{_EXE}:130"),
    "poptorch.PoplarExecutor.__call__": Api("method", "*args, **kwargs", None, f"{_EXE}:1223"),
    "poptorch.PoplarExecutor.compile": Api("method", "*args, **kwargs", None, f"{_EXE}:1026"),
    "poptorch.PoplarExecutor.copyWeightsToHost": Api("method", "", None, f"{_EXE}:555"),
    "poptorch.PoplarExecutor.copyWeightsToDevice": Api("method", "", None, f"{_EXE}:577"),
    "poptorch.PoplarExecutor.copyWeightsToHostIfNeeded": Api("method", "", None, f"{_EXE}:543"),
    "poptorch.PoplarExecutor.load_state_dict": Api("method", "state_dict, strict=...", None, f"{_EXE}:458"),
    "poptorch.PoplarExecutor.setOptimizer": Api("method", "optimizer", None, f"{_EXE}:631"),
    "poptorch.PoplarExecutor.destroy": Api("method", "", None, f"{_EXE}:1482"),
    "poptorch.PoplarExecutor.isAttachedToDevice": Api("method", "", None, f"{_EXE}:1539"),
    "poptorch.PoplarExecutor.isCompiled": Api("method", "", None, f"{_EXE}:1548"),
    "poptorch.PoplarExecutor.detachFromDevice": Api("method", "", None, f"{_EXE}:1553"),
    "poptorch.PoplarExecutor.attachToDevice": Api("method", "", None, f"{_EXE}:1571"),
    # ------------------------------------------------------------------------------------------- data
    "poptorch.DataLoader": Api("class", "options, dataset, batch_size=..., shuffle=..., num_workers=..., "
                               "drop_last=..., persistent_workers=..., auto_distributed_partitioning=..., mode=..., "
                               "async_options=..., rebatched_worker_size=..., batch_sampler=..., **kwargs",
                               source=f"{_INIT}:229"),
    "poptorch.DataLoader.__iter__": Api("method", "", None, f"{_INIT}:510"),
    "poptorch.DataLoader.__len__": Api("method", "", None, f"{_INIT}:468"),
    "poptorch.DataLoader.terminate": Api("method", "", None, f"{_INIT}:499"),
    "poptorch.DataLoader.combinedBatchSize": Api("attribute", source=f"{_INIT}:487"),
    # ------------------------------------------------------------------------------------------- optimizers
    # poptorch.optim.Optimizer is the mixin base; param_groups comes from torch.optim.Optimizer (second base).
    "poptorch.optim.Optimizer": Api("class", "", source=f"{_OPTIM}:67"),
    "poptorch.optim.Optimizer.state_dict": Api("method", "", None, f"{_OPTIM}:78"),
    "poptorch.optim.Optimizer.load_state_dict": Api("method", "state", None, f"{_OPTIM}:81"),
    "poptorch.optim.Optimizer.param_groups": Api("attribute", source="torch.optim.Optimizer (inherited)"),
    "poptorch.optim.SGD": Api("class", "params, lr, momentum=..., dampening=..., weight_decay=..., nesterov=..., "
                              "maximize=..., foreach=..., differentiable=..., loss_scaling=..., velocity_scaling=..., "
                              "use_combined_accum=..., accum_type=..., velocity_accum_type=..., max_grad_norm=...",
                              source=f"{_OPTIM}:196", bases=("poptorch.optim.Optimizer",)),
    "poptorch.optim.AdamW": Api("class", "params, lr=..., betas=..., eps=..., weight_decay=..., amsgrad=..., "
                                "maximize=..., foreach=..., capturable=..., differentiable=..., fused=..., "
                                "loss_scaling=..., bias_correction=..., accum_type=..., "
                                "first_order_momentum_accum_type=..., second_order_momentum_accum_type=..., "
                                "max_grad_norm=...", source=f"{_OPTIM}:446", bases=("poptorch.optim.Optimizer",)),
    "poptorch.optim.RMSprop": Api("class", "params, lr=..., alpha=..., eps=..., weight_decay=..., momentum=..., "
                                  "centered=..., foreach=..., maximize=..., differentiable=..., loss_scaling=..., "
                                  "accum_type=..., first_order_momentum_accum_type=..., "
                                  "second_order_momentum_accum_type=..., use_tf_variant=...",
                                  source=f"{_OPTIM}:572", bases=("poptorch.optim.Optimizer",)),
    # ------------------------------------------------------------------------------------------- popdist (unverified)
    "popdist.isPopdistEnvSet": Api("function", "", source=_EXAMPLES, verified=False),
    "popdist.init": Api("function", "", source=_EXAMPLES, verified=False),
    "popdist.getNumTotalReplicas": Api("function", "", source=_EXAMPLES, verified=False),
    "popdist.getNumLocalReplicas": Api("function", "", source=_EXAMPLES, verified=False),
    "popdist.getInstanceIndex": Api("function", "", source=_EXAMPLES, verified=False),
    "popdist.getNumInstances": Api("function", "", source=_EXAMPLES, verified=False),
    # Called as Options(), Options(k) and Options(ipus_per_replica=k) in graphcore/examples; a poptorch.Options.
    "popdist.poptorch.Options": Api("class", "ipus_per_replica=...", source=_EXAMPLES,
                                    bases=("poptorch.Options",), verified=False),
}

# PopART session options reachable through ``opts._Popart.set(key, value)``: key -> allowed values. poptorch
# registers them in popart_compiler/source/SessionOptions.cpp (ADD_POPART_ENUM_OPTION(autoRecomputation,
# RecomputationType) line 323, ADD_POPART_BOOL_OPTION(explicitRecomputation) line 394,
# ADD_POPART_BOOL_OPTION(enableStableNorm) line 401); an unknown key is only
# rejected by the C++ side at compile time, which is why this table checks it. popart::RecomputationType
# (sessionoptions.hpp:139 at the popart tag): None 0, Standard 1, NormOnly 2, Pipeline 3, RecomputeAll 4.
POPART_SESSION_OPTIONS: dict[str, tuple] = {
    "autoRecomputation": (0, 1, 2, 3, 4),
    "explicitRecomputation": (True, False),
    "enableStableNorm": (True, False),
}
