"""A poptorch / popdist stand-in generated from the SDK 3.4 API table (tests/poptorch_api_sdk34.py).

An attribute exists only if the table has it, and every call is bound with ``inspect.Signature.bind`` against the
table's real parameter list, so the stand-in refuses what real poptorch would refuse (a misspelt option, an unknown
keyword, too many positional arguments) -- and a few documented value checks of the real functions (see
`VALUE_CHECKS`). Every call is recorded in ``StandIn.log`` as ``Call(api_name, args, kwargs)``.

Behaviour is pluggable: ``StandIn(impl={"poptorch.trainingModel": make_executor, ...})``. An implementation runs
after the call was validated; when it returns an object for a table class (e.g. a CPU executor for
``poptorch.PoplarExecutor``), the object is wrapped in a checked proxy so the code under test can use only the
table's members of that class on it. Default behaviours (identity for BeginBlock / recomputationCheckpoint, the
reductions of identity_loss, ...) mirror the real functions' outputs on the host; ``poptorch.Options`` keeps the
values set on it (`OptionsState`).

`standin_with_executors()` adds PopTorch's run-time behaviour (`CpuExecutor`, `IpuSystem`, `StandInOptimizer`):
executors that acquire and hold IPUs, keep their own copy of the weights and compute what the options say. The
rules and their sources at the SDK 3.4 tags are tabulated in docs/poptorch_rules.md.
"""

from __future__ import annotations

import copy
import enum
import importlib.abc
import importlib.util
import inspect
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from poptorch_api_sdk34 import API, POPART_SESSION_OPTIONS, SDK_RELEASE, Api


class ApiViolation(TypeError):
    """The code called something the real SDK 3.4 API does not have (or with arguments it would refuse)."""


@dataclass
class Call:
    """One recorded call: the table name (e.g. 'poptorch.options._TrainingOptions.gradientAccumulation')."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    owner: Any = None  # the stand-in object whose method was called (None for functions and constructors)


_SIGNATURES: dict[str, inspect.Signature] = {}


def signature(name: str) -> inspect.Signature:
    """The ``inspect.Signature`` of a table entry (parameters as listed; ``self`` excluded)."""
    if name not in _SIGNATURES:
        params = API[name].params
        if params is None:
            raise ApiViolation(f"{name} is a {API[name].kind}, not callable")
        _SIGNATURES[name] = inspect.signature(eval(f"lambda {params}: None"))  # noqa: S307 (our own table)
    return _SIGNATURES[name]


def class_member(cls: str, member: str) -> str | None:
    """The table name of `member` on class `cls` (looked up through the table's bases), or None."""
    name = f"{cls}.{member}"
    if name in API:
        return name
    for base in API[cls].bases:
        found = class_member(base, member)
        if found is not None:
            return found
    return None


def _check_partials(dtype: Any) -> None:
    if dtype not in (torch.float, torch.float32, torch.half, torch.float16):
        raise ValueError("parameter to setPartialsType should be either torch.float or torch.half")


def _check_memory_proportion(amp: Any) -> None:
    for key, value in dict(amp).items():
        if not (isinstance(key, str) and key.startswith("IPU") and key[3:].isdigit()):
            raise AssertionError(f"Available memory proportions are expected as {{'IPU0': 0.5}}; invalid key: {key}")
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"available memory proportion {value} for {key} is not in (0, 1]")


def _check_popart_set(key: Any, value: Any) -> None:
    if key not in POPART_SESSION_OPTIONS:
        raise ApiViolation(f"_Popart.set({key!r}, ...): {key!r} is not a PopART session option in the {SDK_RELEASE} "
                           f"table ({', '.join(POPART_SESSION_OPTIONS)})")
    if value not in POPART_SESSION_OPTIONS[key]:
        raise ApiViolation(f"_Popart.set({key!r}, {value!r}): allowed values {POPART_SESSION_OPTIONS[key]}")


def _check_identity_loss(x: Any, reduction: Any) -> None:
    if reduction not in ("sum", "mean", "none"):
        raise AssertionError("Unsupported reduction type!")


def _check_positive_int(value: Any, *_: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive int, got {value!r}")


# Value checks the real functions perform (python/options.py, ops.py at the tag), keyed by table name; they are
# called with the bound arguments.
VALUE_CHECKS: dict[str, Callable[..., None]] = {
    "poptorch.options._PrecisionOptions.setPartialsType": _check_partials,
    "poptorch.Options.setAvailableMemoryProportion": _check_memory_proportion,
    "poptorch.options._PopartOptions.set": _check_popart_set,
    "poptorch.identity_loss": _check_identity_loss,
    "poptorch.Options.replicationFactor": _check_positive_int,
    "poptorch.Options.deviceIterations": _check_positive_int,
    "poptorch.options._TrainingOptions.gradientAccumulation": _check_positive_int,
}


def check_call(name: str, args: tuple, kwargs: dict, *, values: bool = True) -> None:
    """Raise `ApiViolation` unless ``name(*args, **kwargs)`` fits the table: the name exists, is callable, the
    keyword names exist and the positional arity fits (``values``: also run the real function's value checks)."""
    if name not in API:
        raise ApiViolation(f"{name} does not exist in {SDK_RELEASE} ({_source_hint(name)})")
    sig = signature(name)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    named = {k for k, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = [k for k in kwargs if k not in named]
    if unknown and not accepts_any:
        # Reported before binding: "missing 'reduction'" would hide that 'reduce' is the misspelt keyword.
        raise ApiViolation(f"{name}{sig}: got an unexpected keyword argument {unknown[0]!r} ({SDK_RELEASE}, "
                           f"{API[name].source})")
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as err:
        raise ApiViolation(f"{name}{sig}: {err} ({SDK_RELEASE}, {API[name].source})") from None
    if values and name in VALUE_CHECKS:
        VALUE_CHECKS[name](*bound.args, **bound.kwargs)


def _source_hint(name: str) -> str:
    parent = name.rsplit(".", 1)[0]
    near = sorted(k.rsplit(".", 1)[-1] for k in API if k.rsplit(".", 1)[0] == parent)
    return f"{parent} has: {', '.join(near)}" if near else "unknown module"


def _enum(name: str, entry: Api) -> type[enum.IntEnum]:
    return enum.IntEnum(name.rsplit(".", 1)[-1], {m: i for i, m in enumerate(entry.members)})


def _default_impls() -> dict[str, Callable[..., Any]]:
    def identity_loss(x: Any, reduction: str) -> Any:
        return {"sum": lambda: x.sum(), "mean": lambda: x.mean(), "none": lambda: x}[reduction]()

    return {
        "poptorch.recomputationCheckpoint": lambda *t: t[0] if len(t) == 1 else t,
        "poptorch.identity_loss": identity_loss,
        "poptorch.isRunningOnIpu": lambda: False,
        # The real op returns tensors shaped like example_outputs.
        "poptorch.custom_op": lambda inputs, name, domain, version, example_outputs, attributes=None: [
            torch.zeros_like(t) for t in example_outputs],
        "popdist.isPopdistEnvSet": lambda: True,
        "popdist.getNumInstances": lambda: 1,
        "popdist.getInstanceIndex": lambda: 0,
    }


class StandIn:
    """Factory and log for the table-generated stand-ins (``standin.poptorch``, ``standin.popdist``)."""

    def __init__(self, impl: dict[str, Callable[..., Any]] | None = None, ipus: int | None = None) -> None:
        self.log: list[Call] = []
        self.ipus = IpuSystem(ipus)
        self.stage_ipu: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # BeginBlock'ed module -> ipu id
        self._serial = 0
        self._enums: dict[str, type[enum.IntEnum]] = {}
        self.poptorch = Namespace(self, "poptorch")
        self.popdist = Namespace(self, "popdist")
        self.impl = {**_default_impls(), "poptorch.Options": self.new_options,
                     "poptorch.BeginBlock": self._begin_block, **(impl or {})}

    def _begin_block(self, layer_to_call: Any, user_id: Any = None, ipu_id: Any = None) -> Any:
        self.stage_ipu[layer_to_call] = int(ipu_id or 0)
        return layer_to_call

    def next_serial(self) -> int:
        """A new executor's number (its key in the `IpuSystem`)."""
        self._serial += 1
        return self._serial

    def new_options(self, replication_factor: int = 1) -> OptionsState:
        """The state behind a new ``poptorch.Options`` (PopTorch's defaults)."""
        enums = {name: self.lookup(f"poptorch.{name}") for name in ("OutputMode", "ReductionType", "ConnectionType")}
        return OptionsState(enums, replication_factor)

    def install(self, monkeypatch: Any) -> None:
        """Make ``import poptorch`` run PopTorch's import-time torch version assertion (python/__init__.py:20),
        then give this stand-in: what a real SDK wheel does in an environment with another torch."""
        monkeypatch.delitem(sys.modules, "poptorch", raising=False)
        monkeypatch.setattr(sys, "meta_path", [_StandInFinder(self), *sys.meta_path])

    def names(self) -> list[str]:
        """Table names of the recorded calls, in order."""
        return [c.name for c in self.log]

    def calls(self, name: str) -> list[Call]:
        """Recorded calls of one table name (a suffix such as 'gradientAccumulation' also matches)."""
        return [c for c in self.log if c.name == name or c.name.endswith("." + name)]

    def invoke(self, name: str, args: tuple, kwargs: dict, target: Any = None, owner: Any = None) -> Any:
        """Validate, record and run one call (the implementation, or `target`'s method of the same name)."""
        check_call(name, args, kwargs)
        self.log.append(Call(name, args, dict(kwargs), owner))
        member = name.rsplit(".", 1)[-1]
        if name in self.impl:
            result = self.impl[name](*args, **kwargs)
        elif target is not None and hasattr(target, member):
            result = getattr(target, member)(*args, **kwargs)
        else:
            result = None
        return result

    def wrap(self, cls: str, target: Any = None) -> Instance:
        """A checked proxy of class `cls` (around `target`, which provides behaviour, if given)."""
        return target if isinstance(target, Instance) else Instance(self, cls, target)

    def lookup(self, name: str) -> Any:
        """The stand-in object for a module-level table name."""
        entry = API.get(name)
        if entry is None:
            raise AttributeError(f"{name} does not exist in {SDK_RELEASE} ({_source_hint(name)})")
        if entry.kind == "module":
            return Namespace(self, name)
        if entry.kind == "exception":
            return PoptorchError
        if entry.kind == "enum":
            return self._enums.setdefault(name, _enum(name, entry))
        if entry.kind == "function":
            return Function(self, name)
        if entry.kind == "class":
            return Class(self, name)
        raise AttributeError(f"{name} is a {entry.kind}; not a module attribute")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``poptorch`` as a module that first runs PopTorch's version assertion, then serves the stand-in."""

    def __init__(self, standin: StandIn) -> None:
        self.standin = standin

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if fullname == "poptorch" else None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        check_torch_version()
        module.__getattr__ = self.standin.poptorch.__getattr__  # type: ignore[method-assign]


def unwrap(obj: Any) -> Any:
    """The behaviour object behind a checked proxy (for CPU emulations that need the real torch object)."""
    return obj._target if isinstance(obj, Instance) else obj


class Namespace:
    """A module of the table (``poptorch``, ``poptorch.optim``, ``popdist``, ``popdist.poptorch``)."""

    def __init__(self, standin: StandIn, name: str) -> None:
        self._standin, self._name = standin, name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self._standin.lookup(f"{self._name}.{attr}")

    def __repr__(self) -> str:
        return f"<stand-in module {self._name} ({SDK_RELEASE})>"


class Function:
    """A module-level function of the table."""

    def __init__(self, standin: StandIn, name: str) -> None:
        self._standin, self._name = standin, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self._standin.invoke(self._name, args, kwargs)
        returns = API[self._name].returns
        return self._standin.wrap(returns, result) if returns in API else result


class Class:
    """A class of the table: calling it validates the constructor and returns a checked instance."""

    def __init__(self, standin: StandIn, name: str) -> None:
        self._standin, self._name = standin, name

    def __call__(self, *args: Any, **kwargs: Any) -> Instance:
        return self._standin.wrap(self._name, self._standin.invoke(self._name, args, kwargs))


class Instance:
    """An object of a table class: only its table members exist; methods are validated and recorded."""

    def __init__(self, standin: StandIn, cls: str, target: Any = None) -> None:
        object.__setattr__(self, "_standin", standin)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_props", {})

    def _member(self, attr: str) -> str:
        name = class_member(self._cls, attr)
        if name is None:
            hint = _source_hint(f"{self._cls}.{attr}")
            raise AttributeError(f"{self._cls}.{attr} does not exist in {SDK_RELEASE} ({hint})")
        return name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr in ("_standin", "_cls", "_target", "_props"):
            raise AttributeError(attr)
        name = self._member(attr)
        entry = API[name]
        if entry.kind == "property":
            if attr not in self._props:
                self._props[attr] = self._standin.wrap(entry.returns, getattr(self._target, attr, None))
            return self._props[attr]
        if entry.kind == "attribute":
            return getattr(self._target, attr)
        return types.MethodType(_bound_method(name), self)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError(f"the stand-in for {self._cls} does not allow setting {attr!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = self._member("__call__")
        target = self._target
        check_call(name, args, kwargs)
        self._standin.log.append(Call(name, args, dict(kwargs), self))
        return target(*args, **kwargs) if target is not None else None

    def __iter__(self) -> Any:
        return _bound_method(self._member("__iter__"))(self)

    def __len__(self) -> int:
        return _bound_method(self._member("__len__"))(self)

    def __repr__(self) -> str:
        return f"<stand-in {self._cls} ({SDK_RELEASE})>"


def _bound_method(name: str) -> Callable[..., Any]:
    def method(self: Instance, *args: Any, **kwargs: Any) -> Any:
        result = self._standin.invoke(name, args, kwargs, target=self._target, owner=self)
        returns = API[name].returns
        if returns == "self":
            return self
        return self._standin.wrap(returns, result) if returns in API else result

    return method


# ------------------------------------------------------------------------------------------------ PopTorch behaviour
#
# What follows emulates PopTorch 3.4 on the CPU, from its sources at the tag (docs/poptorch_rules.md has the table
# of rules with file:line): the Options object keeps the values the code under test set (defaults as in
# python/options.py), executors acquire IPUs from a finite `IpuSystem` and hold them (ConnectionType.Always), keep
# their own device copy of the weights, copy them exactly when PopTorch does (compile / attach -> device, detach /
# copyWeightsToHost -> host) and run a host call with the batch arithmetic, reductions, loss scaling and output
# modes the OPTIONS say -- not what the test or the code under test assume.


class PoptorchError(RuntimeError):
    """Stand-in for ``poptorch.Error`` (poptorch_core.Error; python/_impl.py:67 createPoptorchError)."""


NO_EXECUTABLE_ERR = "Model has not been compiled or has been destroyed."  # python/_poplar_executor.py:30
TORCH_VERSION = "2.0.1"  # CMakeLists.txt:30 set(TORCH_VERSION 2.0.1)


def version_assertion_message(installed: str) -> str:
    """The AssertionError text of python/__init__.py:20-23 (with @TORCH_VERSION@ = 2.0.1)."""
    return (f"This version of PopTorch only works with torch=={TORCH_VERSION} but the version installed is "
            f"{installed}")


def check_torch_version() -> None:
    """What ``import poptorch`` does first (python/__init__.py:20): assert the torch it was built against."""
    assert torch.__version__.startswith(TORCH_VERSION), version_assertion_message(torch.__version__)


class IpuSystem:
    """The IPUs of one machine / partition. ``acquire`` fails like CompilerImpl.cpp:721-726 when too few are free
    (POPTORCH_WAIT_FOR_IPU unset: fail instead of waiting). ``size=None``: sized by the first acquisition (a
    partition made for the job)."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size
        self.held: dict[int, int] = {}  # executor serial -> IPUs held
        self.peak = 0

    def acquire(self, owner: int, n: int) -> None:
        if self.size is None:
            self.size = n
        free = self.size - sum(self.held.values())
        if n > free:
            raise PoptorchError(f"'poptorch_cpp_error': Failed to acquire {n} IPU(s)")
        self.held[owner] = n
        self.peak = max(self.peak, sum(self.held.values()))

    def release(self, owner: int) -> None:
        self.held.pop(owner, None)


class _OptionsGroup:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


class TrainingState(_OptionsGroup):
    """options._TrainingOptions (python/options.py:196): defaults accumulation 1, reduction Mean (line 210)."""

    def __init__(self, enums: Any) -> None:
        super().__init__(gradient_accumulation=1, reduction=enums["ReductionType"].Mean, automatic_loss_scaling=False,
                         enums=enums)

    def gradientAccumulation(self, gradient_accumulation: int) -> None:  # noqa: N802 (PopTorch's names)
        self.gradient_accumulation = gradient_accumulation

    def accumulationAndReplicationReductionType(self, reduction_type: Any) -> None:  # noqa: N802
        if reduction_type not in (self.enums["ReductionType"].Mean, self.enums["ReductionType"].Sum):
            raise ValueError("accumulationAndReplicationReductionType must be set to poptorch.ReductionType.Mean or "
                             "poptorch.ReductionType.Sum")
        self.reduction = reduction_type

    def setAutomaticLossScaling(self, enabled: bool) -> None:  # noqa: N802
        self.automatic_loss_scaling = bool(enabled)


class OptionsState(_OptionsGroup):
    """The values a ``poptorch.Options`` holds (defaults of python/options.py:1180-1194)."""

    def __init__(self, enums: Any, replication_factor: int = 1) -> None:
        super().__init__(replication_factor=replication_factor, device_iterations=1, auto_round_num_ipus=False,
                         output_mode=enums["OutputMode"].Default, output_return_period=1,
                         connection_type=enums["ConnectionType"].Always, enums=enums, popart={})
        self.Training = TrainingState(enums)
        self.Precision = _OptionsGroup()
        self.TensorLocations = _OptionsGroup()
        self._Popart = _OptionsGroup(set=lambda key, value: self.popart.__setitem__(key, value))

    def replicationFactor(self, replication_factor: int) -> None:  # noqa: N802
        self.replication_factor = replication_factor

    def deviceIterations(self, device_iterations: int) -> None:  # noqa: N802
        self.device_iterations = device_iterations

    def autoRoundNumIPUs(self, auto_round_num_ipus: bool = True) -> None:  # noqa: N802
        self.auto_round_num_ipus = bool(auto_round_num_ipus)

    def outputMode(self, output_mode: Any, output_return_period: int | None = None) -> None:  # noqa: N802
        self.output_mode = output_mode
        if output_return_period is not None:
            self.output_return_period = output_return_period

    def connectionType(self, connection_type: Any) -> None:  # noqa: N802
        self.connection_type = connection_type


class StandInOptimizer:
    """Behind a ``poptorch.optim.{SGD, RMSprop, AdamW}`` stand-in: the host object (param groups, hyper-parameters,
    ``loss_scaling`` -- None means 1.0, python/optim.py:238). Its state lives on the device once an executor
    owns it: ``state_dict`` reads it back from there, ``load_state_dict`` is written at the next attach / call."""

    _TORCH_KW = {
        "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
        "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
        "AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    }

    def __init__(self, name: str, params: Any, **kw: Any) -> None:
        self.name = name
        self.loss_scaling = 1.0 if kw.get("loss_scaling") is None else float(kw["loss_scaling"])
        self.torch_kw = {k: v for k, v in kw.items() if k in self._TORCH_KW[name]}
        self.host = getattr(torch.optim, name)(params, **self.torch_kw)
        self.param_groups = self.host.param_groups
        self.executor: CpuExecutor | None = None
        self.pending_state: dict | None = None

    def state_dict(self) -> dict:
        if self.executor is not None and self.executor.compiled:
            return self.executor.device_optimizer_state()
        return self.host.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.host.load_state_dict(state)
        self.pending_state = state


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class CpuExecutor:
    """Behind a ``poptorch.PoplarExecutor`` stand-in (python/_poplar_executor.py at the tag, line numbers there):

    - the device holds its own copy of the weights (`device`); ``copyWeightsToDevice`` / ``copyWeightsToHost``
      move them (555, 577); compiling and every attach copy host -> device (``_on_device_attach``, 414-417);
      a training run leaves the host weights stale (1287) and ``detachFromDevice`` of a training model copies them
      back first (1563-1565); ``load_state_dict`` loads the host model and copies to the device if attached (458);
    - IPUs: replicas x IPUs per replica (BeginBlock ids), rounded up to a power of two only with autoRoundNumIPUs
      (CompilerImpl.cpp:694-715); acquired at compile with ConnectionType.Always (995-1004) and held until
      ``detachFromDevice``; a second executor on the same IPUs fails to acquire them;
    - one call consumes micro-batch x deviceIterations x replicas x gradientAccumulation samples (``_narrow_tensor``,
      1503-1535) and runs ``deviceIterations`` optimizer steps; gradients of ``loss x loss_scaling`` are reduced
      over accumulation and replicas by the Options' ReductionType (Mean divides by accumulation x replicas),
      unscaled, and applied; with fp16 weights (the model was ``half()``-ed) gradients and updated weights are
      rounded to fp16, so too small a loss scaling underflows as on the IPU (compute itself runs in fp32 on CPU);
    - outputs follow the output mode: Default is Final for training and All for inference (163-174).
    """

    def __init__(self, standin: StandIn, model: torch.nn.Module, options: OptionsState | None, training: bool,
                 optimizer: StandInOptimizer | None = None) -> None:
        self.standin = standin
        self.serial = standin.next_serial()
        self.model = model
        self.options = options if options is not None else standin.new_options()
        self.training = training
        enums = self.options.enums
        if not training and self.options.Training.gradient_accumulation != 1:
            raise PoptorchError("You must set poptorch.Options().Training.gradientAccumulation to 1 or leave it as "
                                "its default value (1) when running a poptorch.inferenceModel().")
        self.output_mode = self.options.output_mode
        if self.output_mode == enums["OutputMode"].Default:
            self.output_mode = enums["OutputMode"].Final if training else enums["OutputMode"].All
        self.optimizer = optimizer
        if optimizer is not None:
            optimizer.executor = self
        self.compiled = self.attached = self.dirty_host_weights = False
        self.device: torch.nn.Module | None = None
        self.device_opt: torch.optim.Optimizer | None = None
        self.half = False
        self.transfers: list[str] = []  # 'to_device' / 'to_host', in order

    # ---------------------------------------------------------------- IPUs
    def num_ipus(self) -> int:
        ids = {self.standin.stage_ipu[m] for m in self.model.modules() if m in self.standin.stage_ipu}
        n = (max(ids) + 1 if ids else 1) * self.options.replication_factor
        if not _is_pow2(n):
            if not self.options.auto_round_num_ipus:
                raise PoptorchError(f"The model specifies the use of {n} IPUs, however PopTorch must reserve a "
                                    "power of 2: set poptorch.Options().autoRoundNumIPUs(True).")
            n = 1 << (n - 1).bit_length()
        return n

    def _acquire(self) -> None:
        self.standin.ipus.acquire(self.serial, self.num_ipus())
        self.attached = True
        self._on_device_attach()

    def _on_device_attach(self) -> None:
        self.copyWeightsToDevice()
        if self.optimizer is not None and self.optimizer.pending_state is not None:
            self.device_opt.load_state_dict(self.optimizer.pending_state)
            self.optimizer.pending_state = None

    # ---------------------------------------------------------------- compile
    def _params(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return list(module.parameters()) + list(module.buffers())

    def compile(self, *args: Any, **kwargs: Any) -> None:
        if self.compiled:
            return  # "Call to compile() ignored: the executable is already compiled"
        self._narrow(args[0])
        memo = {id(self.standin): self.standin, id(self.standin.poptorch): self.standin.poptorch}
        self.device = copy.deepcopy(self.model, memo)
        self.half = any(p.dtype == torch.float16 for p in self.device.parameters())
        if self.half:
            # The CPU computes in fp32 (torch 2.0.1 has no CPU fp16 convolution); storage stays fp16-rounded.
            self.device.float()
            for m in self.device.children():
                m.register_forward_pre_hook(
                    lambda _m, inputs: tuple(t.float() if torch.is_tensor(t) and t.is_floating_point() else t
                                             for t in inputs))
        self.device.train(self.training)
        if self.optimizer is not None:
            index = {id(p): q for p, q in zip(self.model.parameters(), self.device.parameters())}
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                      for g in self.optimizer.param_groups]
            self.device_opt = getattr(torch.optim, self.optimizer.name)(groups, **self.optimizer.torch_kw)
        self.compiled = True
        if self.options.connection_type == self.options.enums["ConnectionType"].Always:
            self._acquire()

    def _narrow(self, tensor: torch.Tensor) -> int:
        o = self.options
        k = o.device_iterations * o.replication_factor * o.Training.gradient_accumulation
        if tensor.shape[0] % k:
            raise AssertionError(
                f"Invalid batch dimension: In the input {tuple(tensor.shape)}, the batch dimension "
                f"({tensor.shape[0]}) must be a multiple of Options.deviceIterations({o.device_iterations}) * "
                f"(Options.replicationFactor({o.replication_factor}) / input_group_size(1)) * "
                f"Options.Training.gradientAccumulation({o.Training.gradient_accumulation}) = {k}")
        return tensor.shape[0] // k

    # ---------------------------------------------------------------- weights
    def copyWeightsToDevice(self) -> None:  # noqa: N802
        if not self.compiled:
            raise PoptorchError(NO_EXECUTABLE_ERR)
        with torch.no_grad():
            for d, h in zip(self._params(self.device), self._params(self.model)):
                d.copy_(h)
        self.dirty_host_weights = False
        self.transfers.append("to_device")

    def copyWeightsToHost(self) -> None:  # noqa: N802
        if not self.compiled:
            raise PoptorchError(NO_EXECUTABLE_ERR)
        with torch.no_grad():
            for h, d in zip(self._params(self.model), self._params(self.device)):
                h.copy_(d)
        self.dirty_host_weights = False
        self.transfers.append("to_host")

    def copyWeightsToHostIfNeeded(self) -> bool:  # noqa: N802
        if self.dirty_host_weights:
            self.copyWeightsToHost()
            return True
        return False

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> Any:
        out = self.model.load_state_dict(state_dict, strict)
        if self.isAttachedToDevice():
            self.copyWeightsToDevice()
        return out

    def device_optimizer_state(self) -> dict:
        return self.device_opt.state_dict()

    def setOptimizer(self, optimizer: Any) -> None:  # noqa: N802
        opt = unwrap(optimizer)
        if self.device_opt is not None:
            for src, dst in zip(opt.param_groups, self.device_opt.param_groups):
                dst.update({k: v for k, v in src.items() if k != "params"})
        self.optimizer = opt
        opt.executor = self

    # ---------------------------------------------------------------- attach / detach
    def isAttachedToDevice(self) -> bool:  # noqa: N802
        return self.compiled and self.attached

    def isCompiled(self) -> bool:  # noqa: N802
        return self.compiled

    def detachFromDevice(self) -> None:  # noqa: N802
        if not self.compiled:
            raise PoptorchError(NO_EXECUTABLE_ERR)
        if not self.attached:
            raise PoptorchError("Device is not attached")
        if self.training:
            self.copyWeightsToHostIfNeeded()
        self.standin.ipus.release(self.serial)
        self.attached = False

    def attachToDevice(self) -> None:  # noqa: N802
        if not self.compiled:
            raise PoptorchError(NO_EXECUTABLE_ERR)
        if self.attached:
            raise PoptorchError("Device is already attached")
        self._acquire()

    def destroy(self) -> None:
        if not self.compiled:
            return
        if self.training:
            self.copyWeightsToHostIfNeeded()
        self.standin.ipus.release(self.serial)
        self.compiled = self.attached = False

    # ---------------------------------------------------------------- run
    def __call__(self, *args: Any) -> Any:
        if not self.compiled:
            self.compile(*args)
        if not self.attached:
            self.attachToDevice()
        micro = self._narrow(args[0])
        if self.optimizer is not None and self.optimizer.pending_state is not None:
            # A state loaded while attached is written before the run (_write_optim_state_dict_if_needed, 1267-1268).
            self.device_opt.load_state_dict(self.optimizer.pending_state)
            self.optimizer.pending_state = None
        out = self._train(args, micro) if self.training else self._infer(args[0], micro)
        if self.training:
            self.dirty_host_weights = True
        return out

    def _outputs(self, per_batch: list[torch.Tensor]) -> torch.Tensor:
        """Per micro-batch outputs (order: device iteration, accumulation, replica) -> what the mode returns."""
        modes = self.options.enums["OutputMode"]
        r = self.options.replication_factor
        if self.output_mode == modes.All:
            return torch.cat([t.reshape(-1, *t.shape[1:]) if t.dim() else t.reshape(1) for t in per_batch])
        if self.output_mode == modes.Final:
            last = per_batch[-r:]
            return torch.stack(last) if last[0].dim() == 0 else torch.cat(last)
        if self.output_mode == modes.Sum:
            by_replica = [torch.stack(per_batch[i::r]).sum(0) for i in range(r)]
            return by_replica[0] if r == 1 else torch.stack(by_replica)
        raise NotImplementedError(f"the stand-in does not emulate output mode {self.output_mode!r}")

    @torch.no_grad()
    def _infer(self, images: torch.Tensor, micro: int) -> torch.Tensor:
        return self._outputs(list(self.device(images).split(micro)))

    def _train(self, args: tuple, micro: int) -> torch.Tensor:
        o = self.options
        per_step = o.replication_factor * o.Training.gradient_accumulation
        scale = self.optimizer.loss_scaling
        params = [p for g in self.device_opt.param_groups for p in g["params"]]
        chunks = list(zip(*(a.split(micro) for a in args)))
        outputs: list[tuple[torch.Tensor, ...]] = []  # per micro-batch; the first output is the loss
        for d in range(o.device_iterations):
            acc = [torch.zeros_like(p) for p in params]
            for batch in chunks[d * per_step:(d + 1) * per_step]:
                out = self.device(*batch)
                out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                grads = torch.autograd.grad(out[0] * scale, params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a += g.half().float() if self.half else g
                outputs.append(tuple(t.detach().float() for t in out))
            if o.Training.reduction == o.enums["ReductionType"].Mean:
                acc = [a / per_step for a in acc]
            for p, a in zip(params, acc):
                p.grad = a / scale
            self.device_opt.step()
            self.device_opt.zero_grad(set_to_none=True)
            if self.half:
                with torch.no_grad():
                    for p in params:
                        p.copy_(p.half().float())
        per_output = [self._outputs([b[k] for b in outputs]) for k in range(len(outputs[0]))]
        return per_output[0] if len(per_output) == 1 else tuple(per_output)


class StandInDataLoader:
    """``poptorch.DataLoader`` as PopTorch 3.4 runs it (docs/poptorch_rules.md rules 18-21).

    Batches hold ``batch_size x deviceIterations x replicationFactor x gradientAccumulation`` samples (one host
    call); in Async / AsyncRebatched mode the worker process is forked when the loader is built, so it iterates the
    sampler as it was then (later ``set_epoch`` calls in the parent are not seen), and each batch is returned in the
    worker's shared-memory buffers, which the next batch overwrites. ``len()`` counts ``len(dataset)``, not the
    sampler.
    """

    def __init__(self, standin: StandIn, options: Any, dataset: Any, batch_size: int = 1, shuffle: Any = None,
                 num_workers: int = 0, drop_last: bool = True, persistent_workers: Any = None,
                 auto_distributed_partitioning: bool = True, mode: Any = None, async_options: Any = None,
                 rebatched_worker_size: Any = None, batch_sampler: Any = None, **kwargs: Any) -> None:
        o = unwrap(options)
        modes = standin.lookup("poptorch.DataLoaderMode")
        mode = modes.Sync if mode is None else mode
        if batch_sampler is not None or rebatched_worker_size is not None:
            raise NotImplementedError("the stand-in does not emulate batch_sampler / rebatched_worker_size")
        combine = o.device_iterations * o.replication_factor * o.Training.gradient_accumulation
        self.combinedBatchSize = batch_size * combine  # noqa: N815 (PopTorch's name)
        self.asynchronous = mode in (modes.Async, modes.AsyncRebatched)
        sampler = kwargs.pop("sampler", None)
        if self.asynchronous and sampler is not None:
            sampler = copy.deepcopy(sampler)  # the forked worker's copy
        self.drop_last, self.dataset_len = bool(drop_last), len(dataset)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=self.combinedBatchSize, shuffle=bool(shuffle),
                                                  sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                                                  **kwargs)
        self.buffers: list[torch.Tensor] | None = None
        self.terminated = False

    def __len__(self) -> int:
        whole, rest = divmod(self.dataset_len, self.combinedBatchSize)
        return whole + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Any:
        for batch in self.loader:
            if not self.asynchronous:
                yield batch
                continue
            if self.buffers is None or any(b.shape != t.shape for b, t in zip(self.buffers, batch)):
                self.buffers = [torch.empty_like(t) for t in batch]
            for b, t in zip(self.buffers, batch):
                b.copy_(t)
            yield list(self.buffers)

    def terminate(self) -> None:
        self.terminated = True


def _executor_impls(standin: StandIn) -> dict[str, Callable[..., Any]]:
    def training_model(model: Any, options: Any = None, optimizer: Any = None) -> CpuExecutor:
        opt = unwrap(optimizer)
        if opt is None:
            raise NotImplementedError("the stand-in needs the poptorch.optim optimizer passed to trainingModel")
        return CpuExecutor(standin, model, unwrap(options), True, opt)

    def inference_model(model: Any, options: Any = None) -> CpuExecutor:
        return CpuExecutor(standin, model, unwrap(options), False)

    impl: dict[str, Callable[..., Any]] = {
        "poptorch.trainingModel": training_model,
        "poptorch.inferenceModel": inference_model,
        "poptorch.DataLoader": lambda *a, **k: StandInDataLoader(standin, *a, **k),
    }
    for name in StandInOptimizer._TORCH_KW:
        impl[f"poptorch.optim.{name}"] = lambda params, _n=name, **kw: StandInOptimizer(_n, params, **kw)
    return impl


def standin_with_executors(popdist_replicas: int | None = None, ipus: int | None = None) -> StandIn:
    """A StandIn whose trainingModel / inferenceModel run on the CPU as PopTorch runs them on IPUs
    (`CpuExecutor`), on an `IpuSystem` of `ipus` IPUs (None: sized by the first executor); with
    `popdist_replicas`, popdist.init / getNumTotalReplicas / poptorch.Options behave as under ``poprun``."""
    standin = StandIn(ipus=ipus)
    standin.impl.update(_executor_impls(standin))
    if popdist_replicas is not None:
        standin.impl["popdist.init"] = lambda: None
        standin.impl["popdist.getNumTotalReplicas"] = lambda: popdist_replicas
        standin.impl["popdist.poptorch.Options"] = lambda ipus_per_replica=1: standin.new_options(popdist_replicas)
    return standin
