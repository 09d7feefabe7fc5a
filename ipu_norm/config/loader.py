"""Load a run configuration: YAML inheritance, CLI overrides, and recursive validation against the schema.

- ``base: other.yml`` (or a list of files) at the top of a YAML file inherits from other files, resolved
  relative to the including file; the bases are deep-merged in order, then the file itself on top
  (mappings merge key by key, everything else - lists included - is replaced). Cycles are an error.
- Overrides ``section.key=value`` (``--set`` on the command line) are YAML-parsed and applied after the
  files; dedicated flags (``--epochs`` ...) are applied last.
- The merged mapping is checked against the dataclasses in ``schema.py``: unknown keys, wrong types and
  values outside an enum are errors (``ConfigError``) that name the file (or the override) that set the
  key, the dotted key, and the allowed keys or the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ipu_norm.config.schema import Config

Sources = dict[str, str]  # dotted key -> where it was set ('configs/x.yml', '--set', '--epochs', ...)
DEFAULT_SOURCE = "<defaults>"


class ConfigError(ValueError):
    """An invalid configuration; the message names the source file and the dotted key."""


# --------------------------------------------------------------------------------------------- YAML


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A new mapping: ``override`` merged into ``base`` recursively (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _record_sources(data: Mapping[str, Any], source: str, sources: Sources, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        sources[dotted] = source
        if isinstance(value, Mapping):
            _record_sources(value, source, sources, dotted + ".")


class _ConfigYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false (any case) are booleans.

    PyYAML follows YAML 1.1, where ``off``/``on``/``yes``/``no`` are booleans too, so
    ``execution.memory_check: off`` (an enum value) would arrive as ``False`` and be rejected.
    """


_ConfigYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    """Parse config YAML (file or ``--set`` value) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_ConfigYamlLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_tree(path: str | Path, _stack: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Sources]:
    """Read a YAML config and its ``base:`` chain; returns the merged mapping and where each key came from."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"{path}: cyclic 'base:' inheritance: {chain}")
    if not path.is_file():
        where = f" (base of {_stack[-1]})" if _stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        raw = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_error_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: base: expected a file name or a list of file names, got {bases!r}")
    merged: dict[str, Any] = {}
    sources: Sources = {}
    for base in bases:
        data, src = load_yaml_tree(path.parent / base, (*_stack, path))
        merged = deep_merge(merged, data)
        sources.update(src)
    merged = deep_merge(merged, raw)
    _record_sources(raw, str(path), sources)
    return merged, sources


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line error (with a source excerpt) as one line: the problem and where it is."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=0.1' -> ('optim.lr', 0.1); the value is parsed as YAML ('null', '[a, b]', 'gn+pn')."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        parsed = _load_yaml(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value {value!r} is not valid YAML: {_yaml_error_line(exc)}") from exc
    return key, parsed


def set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str, sources: Sources) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating intermediate mappings."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])} is not a section, cannot set {dotted}")
        node = child
    node[parts[-1]] = value
    sources[dotted] = source
    if isinstance(value, Mapping):
        _record_sources(value, source, sources, dotted + ".")


# ------------------------------------------------------------------------------------------ schema


def _source_of(dotted: str, sources: Sources) -> str:
    """The file/override that set ``dotted`` (or its closest parent)."""
    key = dotted
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return DEFAULT_SOURCE


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return "mapping of names to values"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp: Any, dotted: str, sources: Sources) -> Any:
    """Check ``value`` against type ``tp`` (recursively); returns the converted value or raises _Mismatch."""
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, dotted, sources)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, dotted, sources)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(next(c for c in choices if c == value)):
            return value
        # YAML reads `precision: 16.32` as a float; accept it when its text is one of the string choices.
        if isinstance(value, float) and str(value) in choices:
            return str(value)
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (arg,) = typing.get_args(tp)
        return [_convert(v, arg, f"{dotted}[{i}]", sources) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        key_tp, val_tp = typing.get_args(tp)
        if val_tp is Any:
            return dict(value)
        return {k: _convert(v, val_tp, f"{dotted}.{k}", sources) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        # inf/nan (YAML .inf, .nan) pass range checks like `lr > 0`; no setting here means them.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        # PyYAML (YAML 1.1) reads '1e-3' (no dot) as a string; accept numeric text for float fields.
        if isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise _Mismatch from None
            if math.isfinite(out):
                return out
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported schema type {tp!r} for {dotted}")


def build_dataclass(cls: type, data: Any, prefix: str = "", sources: Sources | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, validating keys and types recursively.

    Missing keys take the dataclass defaults. Errors are ``ConfigError`` naming the source and dotted key.
    """
    sources = sources or {}
    where = prefix or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{_source_of(prefix, sources)}: {where}: expected a mapping of keys, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{_source_of(dotted, sources)}: unknown key {dotted!r}{hint}; allowed keys in "
                f"{where}: {', '.join(fields)}"
            )
        tp = hints[key]
        try:
            kwargs[key] = _convert(value, tp, dotted, sources)
        except _Mismatch:
            raise ConfigError(
                f"{_source_of(dotted, sources)}: {dotted}: expected {_type_name(tp)}, got {value!r} "
                f"({type(value).__name__})"
            ) from None
    return cls(**kwargs)


# ------------------------------------------------------------------------------------ semantics


def _check(cond: bool, dotted: str, message: str, sources: Sources) -> None:
    if not cond:
        raise ConfigError(f"{_source_of(dotted, sources)}: {dotted}: {message}")


def validate_config(cfg: Config, sources: Sources | None = None) -> Config:
    """Checks across values that types cannot express (ranges, model/norm names); normalises the norm string."""
    from ipu_norm.layers.norm_act import parse_norm
    from ipu_norm.models import is_model, list_models

    s = sources or {}
    m, d, o, t, e = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.execution
    if not is_model(m.name):
        known = list_models()
        close = difflib.get_close_matches(m.name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        _check(False, "model.name", f"unknown model {m.name!r}{hint} (registered: {len(known)} models)", s)
    if m.norm is not None:
        try:
            m.norm = str(parse_norm(m.norm))
        except ValueError as exc:
            _check(False, "model.norm", str(exc), s)
    for dotted, value in [
        ("model.norm_groups", m.norm_groups),
        ("model.num_classes", m.num_classes),
        ("data.train_size", d.train_size),
        ("data.test_size", d.test_size),
        ("data.generated_samples", d.generated_samples),
        ("data.generated_val_samples", d.generated_val_samples),
        ("data.digits_image_size", d.digits_image_size),
        ("data.val_batch_size", d.val_batch_size),
        ("optim.lr_reference_batch", o.lr_reference_batch),
        ("train.epochs", t.epochs),
        ("train.max_steps", t.max_steps),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
        ("train.log_every_steps", t.log_every_steps),
        ("train.checkpoint_every_steps", t.checkpoint_every_steps),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps),
        ("train.weight_avg_N", t.weight_avg_N),
        ("execution.replicas", e.replicas),
        ("execution.gradient_accumulation", e.gradient_accumulation),
        ("execution.device_iterations", e.device_iterations),
        ("execution.ipus_per_replica", e.ipus_per_replica),
        ("finetune.epochs", cfg.finetune.epochs),
        ("finetune.max_steps", cfg.finetune.max_steps),
        ("finetune.image_size", cfg.finetune.image_size),
        ("finetune.micro_batch_size", cfg.finetune.micro_batch_size),
        ("finetune.global_batch_size", cfg.finetune.global_batch_size),
    ]:
        _check(value is None or value >= 1, dotted, f"must be >= 1, got {value}", s)
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}", s)
    _check(t.val_every_epochs >= 0, "train.val_every_epochs", "must be >= 0 (0 = only at the end)", s)
    _check(d.dataset != "imagefolder" or bool(d.root), "data.root", "dataset 'imagefolder' needs data.root", s)
    _check(
        d.dataset != "generated" or d.root is None,
        "data.root",
        f"is set ({d.root}) but data.dataset is 'generated' (random images, no files read); set data.dataset: "
        "imagefolder (--data imagefolder) to train on the images there",
        s,
    )
    _check(m.drop_rate is None or 0 <= m.drop_rate < 1, "model.drop_rate", "must be in [0, 1)", s)
    _check(m.drop_path_rate is None or 0 <= m.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)", s)
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}", s)
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", s)
    _check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)", s)
    _check(not o.nesterov or (o.name == "sgd" and o.momentum > 0), "optim.nesterov", "needs sgd with momentum > 0", s)
    _check(o.eps is None or o.eps > 0, "optim.eps", "must be > 0", s)
    _check(0 < o.alpha < 1, "optim.alpha", "must be in (0, 1)", s)
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "expected two values in [0, 1)", s)
    _check(o.agc_clip is None or o.agc_clip > 0, "optim.agc_clip", "must be > 0 (null = off)", s)
    _check(o.agc_eps > 0, "optim.agc_eps", "must be > 0", s)
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0", s)
    _check(0 < o.decay_rate <= 1, "optim.decay_rate", "must be in (0, 1]", s)
    _check(o.decay_epochs > 0, "optim.decay_epochs", "must be > 0", s)
    _check(o.min_lr >= 0, "optim.min_lr", "must be >= 0", s)
    f = cfg.finetune
    _check(f.lr > 0, "finetune.lr", f"must be > 0, got {f.lr}", s)
    _check(0 <= f.momentum < 1, "finetune.momentum", "must be in [0, 1)", s)
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)", s)
    _check(t.mixup_alpha >= 0, "train.mixup_alpha", "must be >= 0 (0 = off)", s)
    _check(t.cutmix_alpha >= 0, "train.cutmix_alpha", "must be >= 0 (0 = off)", s)
    _check(
        (t.mixup_alpha == 0 and t.cutmix_alpha == 0) or t.micro_batch_size % 2 == 0,
        "train.micro_batch_size",
        f"must be even with mixup/cutmix on (each image is mixed with the reversed batch), got {t.micro_batch_size}",
        s,
    )
    _check(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay", "must be in (0, 1) (null = off)", s)
    _check(0 < t.weight_avg_exp_decay < 1, "train.weight_avg_exp_decay", "must be in (0, 1)", s)
    _check(
        t.weight_avg_strategy == "none" or t.weight_avg_N is None or t.weight_avg_N <= t.keep_checkpoints,
        "train.weight_avg_N",
        f"averages the last {t.weight_avg_N} saved checkpoints but train.keep_checkpoints keeps only "
        f"{t.keep_checkpoints}; raise keep_checkpoints or lower weight_avg_N",
        s,
    )
    if isinstance(e.loss_scaling, str):
        if e.loss_scaling != "auto":
            try:
                e.loss_scaling = float(e.loss_scaling)
            except ValueError:
                _check(False, "execution.loss_scaling", f"expected 'auto' or a number, got {e.loss_scaling!r}", s)
    if not isinstance(e.loss_scaling, str):
        _check(e.loss_scaling > 0, "execution.loss_scaling", "must be > 0", s)
    amp = e.available_memory_proportion
    if amp is not None:
        values = amp if isinstance(amp, list) else [amp]
        _check(all(0 < v <= 1 for v in values), "execution.available_memory_proportion", "values in (0, 1]", s)
    # Stage / IPU-count consistency needs the model: ipu_norm.core.plan.build_plan checks it at start.
    _check(
        e.recompute != "checkpoints" or bool(e.recompute_checkpoints),
        "execution.recompute_checkpoints",
        "recompute: checkpoints needs a list of module names",
        s,
    )
    if t.global_batch_size is not None and e.gradient_accumulation is not None:
        # The data-parallel size is only known at run time; check what can be checked here.
        per_worker = t.micro_batch_size * e.gradient_accumulation * e.replicas
        _check(
            t.global_batch_size % per_worker == 0,
            "train.global_batch_size",
            f"{t.global_batch_size} is not a multiple of micro_batch_size x gradient_accumulation x replicas "
            f"= {per_worker}",
            s,
        )
    return cfg


# ---------------------------------------------------------------------------------------- entry


def load_config_with_sources(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    *,
    validate: bool = True,
) -> tuple[Config, Sources]:
    """Load ``path`` (with its bases), apply ``--set`` overrides then dedicated flags, and validate.

    ``flags`` maps dotted keys to values with the flag name as source, e.g.
    ``{"train.epochs": (5, "--epochs")}``; plain values get the source ``<cli>``.
    """
    data, sources = load_yaml_tree(path) if path is not None else ({}, {})
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value, f"--set {text}", sources)
    for key, value in (flags or {}).items():
        source = "<cli>"
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
            value, source = value
        set_dotted(data, key, value, source, sources)
    cfg = build_dataclass(Config, data, "", sources)
    if validate:
        validate_config(cfg, sources)
    return cfg, sources


def load_config(
    path: str | Path | None, overrides: Iterable[str] = (), flags: Mapping[str, Any] | None = None
) -> Config:
    """Load and validate a config file (see ``load_config_with_sources``)."""
    return load_config_with_sources(path, overrides, flags)[0]


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON/checkpoint friendly)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a config from a plain nested dict (e.g. one stored in a checkpoint)."""
    sources: Sources = {}
    _record_sources(data, source, sources)
    return validate_config(build_dataclass(Config, data, "", sources), sources)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML (what the run actually used)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
