"""A poptorch / popdist stand-in generated from the SDK 3.4 API table (tests/poptorch_api_sdk34.py).

An attribute exists only if the table has it, and every call is bound with ``inspect.Signature.bind`` against the
table's real parameter list, so the stand-in refuses what real poptorch would refuse (a misspelt option, an unknown
keyword, too many positional arguments) -- and a few documented value checks of the real functions (see
`VALUE_CHECKS`). Every call is recorded in ``StandIn.log`` as ``Call(api_name, args, kwargs)``.

Behaviour is pluggable: ``StandIn(impl={"poptorch.trainingModel": make_executor, ...})``. An implementation runs
after the call was validated; when it returns an object for a table class (e.g. a CPU executor for
``poptorch.PoplarExecutor``), the object is wrapped in a checked proxy so the code under test can use only the
table's members of that class on it. Default behaviours (identity for BeginBlock / recomputationCheckpoint, the
reductions of identity_loss, ...) mirror the real functions' outputs on the host.
"""

from __future__ import annotations

import enum
import inspect
import types
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
        "poptorch.BeginBlock": lambda layer_to_call, user_id=None, ipu_id=None: layer_to_call,
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

    def __init__(self, impl: dict[str, Callable[..., Any]] | None = None) -> None:
        self.log: list[Call] = []
        self.impl = {**_default_impls(), **(impl or {})}
        self._enums: dict[str, type[enum.IntEnum]] = {}
        self.poptorch = Namespace(self, "poptorch")
        self.popdist = Namespace(self, "popdist")

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
        if entry.kind == "enum":
            return self._enums.setdefault(name, _enum(name, entry))
        if entry.kind == "function":
            return Function(self, name)
        if entry.kind == "class":
            return Class(self, name)
        raise AttributeError(f"{name} is a {entry.kind}; not a module attribute")


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


# ------------------------------------------------------------------------------------------------ CPU behaviours


class CpuExecutor:
    """Behaviour behind a ``poptorch.PoplarExecutor`` stand-in: runs the model on the CPU the way PopTorch runs it
    on the device (training: one call = accumulation over the micro-batches with Mean reduction, then one optimizer
    step; inference: the forward pass)."""

    def __init__(self, module: torch.nn.Module, optimizer: Any = None, micro: int | None = None) -> None:
        self.module, self.optimizer, self.micro = module, optimizer, micro
        self.attached = self.compiled = False

    def __call__(self, *args: Any) -> Any:
        self.attached = self.compiled = True
        if self.optimizer is None:
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

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Tracing only (no step): PopTorch compiles with the example inputs without running them."""
        self.compiled = True

    def isAttachedToDevice(self) -> bool:  # noqa: N802 (PopTorch's names)
        return self.attached

    def isCompiled(self) -> bool:  # noqa: N802
        return self.compiled

    def detachFromDevice(self) -> None:  # noqa: N802
        self.attached = False


def torch_optim_impls() -> dict[str, Callable[..., Any]]:
    """poptorch.optim.{SGD, RMSprop, AdamW} behaviours: the torch optimizer with the kwargs torch knows (the IPU-only
    ones, loss_scaling and the accumulator dtypes, have no CPU meaning)."""
    keep = {
        "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
        "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
        "AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    }

    def make(name: str) -> Callable[..., Any]:
        def build(params: Any, **kw: Any) -> torch.optim.Optimizer:
            return getattr(torch.optim, name)(params, **{k: v for k, v in kw.items() if k in keep[name]})

        return build

    return {f"poptorch.optim.{n}": make(n) for n in keep}


def standin_with_executors(micro: int, popdist_replicas: int | None = None) -> StandIn:
    """A StandIn whose trainingModel / inferenceModel run on the CPU (`CpuExecutor`) with torch optimizers;
    with `popdist_replicas`, popdist.init / getNumTotalReplicas behave as under ``poprun``."""
    impl: dict[str, Callable[..., Any]] = {
        "poptorch.trainingModel": lambda model, options=None, optimizer=None: CpuExecutor(model, unwrap(optimizer),
                                                                                         micro),
        "poptorch.inferenceModel": lambda model, options=None: CpuExecutor(model),
        **torch_optim_impls(),
    }
    if popdist_replicas is not None:
        impl["popdist.init"] = lambda: None
        impl["popdist.getNumTotalReplicas"] = lambda: popdist_replicas
    return StandIn(impl)
