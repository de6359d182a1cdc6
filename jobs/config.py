"""Job configuration: a YAML file in configs/, overridden on the command line by key=value.

Every key is defined once, in ``JobConfig``: its type, its default, what it means, what is
valid and whether changing it changes what a run computes. Keys are typed and validated when
the config is loaded, before any data, cluster or tracking work starts. Errors are one line
that names the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cluster import TRANSPORTS
from core.functions import ACTIVATIONS, COSTS
from core.network import DTYPES, INITS
from jobs.errors import UserError

BACKENDS = ("local", "ray")
SHUFFLES = ("global", "blocks")
KEEPS = ("last", "best")


class ConfigError(UserError, ValueError):
    """A user's mistake in a config or an override; the message says what to write instead."""


def key(default: Any, help: str, valid: Callable[[Any], bool] | None = None, invalid: str = "",
        result: bool = False, not_swept: str = "") -> Any:
    """One config key. ``valid`` checks a value of the right type; ``invalid`` says what is valid
    when it fails (default: ``help``). ``result``: a changed value changes the numbers a run
    computes, so a resumed run must keep it. ``not_swept``: why a sweep cannot vary it (where and
    how trials run, their tracking), when it cannot."""
    return field(default=default, metadata={"help": help, "valid": valid, "invalid": invalid or help,
                                            "result": result, "not_swept": not_swept})


def one_of(names) -> Callable[[Any], bool]:
    return lambda value: value in names


def at_least(low) -> Callable[[Any], bool]:
    return lambda value: low <= value < math.inf  # NaN compares false


@dataclass(frozen=True)
class JobConfig:
    # the data
    data: str = key("digits", "a bundled dataset (digits, mnist-5k, synthetic[:N:INPUTS:CLASSES]) or a path",
                    lambda v: bool(v.strip()) and len(v) <= 4096, result=True)
    validation_size: int = key(0, "training examples held out for validation, >= 0", at_least(0),
                               "must be >= 0", result=True)
    test_size: int | None = key(None, "examples held out for test where the data has no test set (null: the "
                                "dataset's default)", lambda v: v is None or v >= 1, "must be >= 1, or null",
                                result=True)
    allow_pickle: bool = key(False, "read the book's pickled mnist.pkl.gz (unpickling can run code: only for "
                             "files you trust)")
    # the network (chapter 1's network by default)
    sizes: tuple[int, ...] = key((64, 30, 10), "layer sizes, input first, e.g. [784, 30, 10]",
                                 lambda v: len(v) >= 2 and min(v) >= 1,
                                 "needs at least two layer sizes, each >= 1, e.g. sizes=[784,30,10]", result=True)
    cost: str = key("quadratic", f"one of {', '.join(COSTS)}", one_of(COSTS), result=True)
    activation: str = key("sigmoid", f"one of {', '.join(ACTIVATIONS)}", one_of(ACTIVATIONS), result=True)
    init: str = key("standard", f"one of {', '.join(INITS)}", one_of(INITS), result=True)
    init_scale: float = key(1.0, "multiplies the initial weights, > 0 (large values start the network saturated)",
                            lambda v: 0 < v < math.inf, "must be a finite number > 0", result=True)
    dtype: str = key("float64", f"one of {', '.join(DTYPES)}", one_of(DTYPES), result=True)
    # stochastic gradient descent
    eta: float = key(3.0, "learning rate η, > 0", lambda v: 0 < v < math.inf,
                     "the learning rate η must be a finite number > 0, e.g. eta=3.0", result=True)
    lmbda: float = key(0.0, "L2 weight decay λ, >= 0", at_least(0),
                       "the L2 decay λ must be a finite number >= 0, e.g. lmbda=5.0", result=True)
    batch_size: int = key(10, "mini-batch size, >= 1", at_least(1),
                          "the mini-batch size must be >= 1, e.g. batch_size=10", result=True)
    epochs: int = key(30, "passes over the training data, >= 1", at_least(1), "must be >= 1")
    early_stopping: int = key(0, "stop once validation accuracy has not improved in this many epochs (the book's "
                              "network2 rule; needs validation_size > 0), 0 for never", at_least(0),
                              "must be >= 0 (0: never)", result=True)
    keep: str = key("last", "the weights a run ends with, as its model and weights.npz: last (the last epoch's) or "
                    "best (the epoch of best validation accuracy; needs validation_size > 0)", one_of(KEEPS),
                    result=True)
    seed: int = key(0, "seed of the initial weights and the shuffles, >= 0", at_least(0), "must be >= 0",
                    result=True)
    shuffle: str = key("global", f"each epoch's order: one of {', '.join(SHUFFLES)} (global: every example "
                       "anywhere, every worker holds the whole training set; blocks: blocks and their rows, each "
                       "worker holds only its blocks of a sharded dataset)", one_of(SHUFFLES), result=True)
    mix_blocks: int = key(4, "shuffle=blocks: blocks whose rows are interleaved, so each mini-batch draws from "
                          "about this many, >= 1", at_least(1), "must be >= 1", result=True)
    # where gradients are computed
    backend: str = key("local", f"one of {', '.join(BACKENDS)}", one_of(BACKENDS),
                       not_swept="trials run on the local backend, one core each")
    workers: int = key(1, "Ray workers (backend=ray), >= 1", at_least(1), "must be >= 1",
                       not_swept="trials run on the local backend")
    chunk_size: int = key(500, "examples per gradient chunk, >= 1; results are bit-identical for a given "
                          "chunk_size", at_least(1), "must be >= 1", result=True)
    threads: int = key(0, "threads computing chunks in the local backend, 0 for one per core", at_least(0),
                       "must be >= 0 (0: one per core)", not_swept="give it once, e.g. threads=2")
    num_cpus: float = key(1.0, "CPUs each Ray worker holds (and its BLAS threads), > 0",
                          lambda v: 0 < v < math.inf, "must be > 0", not_swept="trials run on the local backend")
    transport: str = key("auto", f"how Ray steps travel: one of {', '.join(TRANSPORTS)} (auto: a compiled graph "
                         "where it works, else tasks; the results are the same bits)", one_of(TRANSPORTS),
                         not_swept="trials run on the local backend")
    max_worker_failures: int = key(3, "Ray worker deaths a job survives before it stops (to be resumed), >= 0",
                                   at_least(0), "must be >= 0", not_swept="trials run on the local backend")
    # tracking and output
    experiment: str = key("gradavg", "MLflow experiment name", lambda v: bool(v.strip()) and len(v) <= 500,
                          "must be a name of 1 to 500 characters (MLflow's limit)",
                          not_swept="a sweep's runs share one experiment")
    run_name: str | None = key(None, "MLflow run name (null: the config file's name and the overrides)",
                               lambda v: v is None or 0 < len(v) <= 250,
                               "must be a name of 1 to 250 characters, or null",
                               not_swept="each trial's run is named after its values")
    log_every: int = key(100, "log the mini-batch cost every this many steps, >= 1", at_least(1), "must be >= 1")
    diagnostics: bool = key(True, "log per-layer diagnostics (|δ|, gradient norms, saturation) every epoch")
    diagnostics_every: int = key(0, "also log them every this many steps, 0 for only once an epoch", at_least(0),
                                 "must be >= 0 (0: once an epoch)")
    checkpoint_every: int = key(1, "save a checkpoint every this many epochs, 0 for never", at_least(0),
                                "must be >= 0 (0: never)")
    track: bool = key(True, "track the run in MLflow (false: train without tracking)",
                      not_swept="every trial is tracked")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sizes"] = list(self.sizes)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


KEYS = {f.name: f for f in fields(JobConfig)}
TYPES = typing.get_type_hints(JobConfig)
HELP = {name: f.metadata["help"] for name, f in KEYS.items()}
RESULT_KEYS = tuple(name for name, f in KEYS.items() if f.metadata["result"])


def load_job(path: str, overrides: list[str] = ()) -> JobConfig:
    """A job's config as a command line gives it (``-``: none): ``load_config``, with a run name from the
    config file and the overrides (``default_name``) unless it has one, so that the run list and the
    Overview say what each run is."""
    cfg = load_config(None if path == "-" else path, overrides)
    return cfg if cfg.run_name else replace(cfg, run_name=default_name(path, overrides))


def input_params(cfg: JobConfig) -> dict[str, str]:
    """A run's MLflow params: the inputs of what it computes (``RESULT_KEYS``) that bear on it (``mix_blocks``
    only under shuffle=blocks; none that is null, a dataset's default), so that a compare view plots nothing
    else. How long it trains is a tag (a resume may extend it, and a param cannot change), where and how it
    ran are tags, and the whole config is its config.yaml."""
    return {k: str(v) for k, v in cfg.to_dict().items()
            if k in RESULT_KEYS and v is not None and (k != "mix_blocks" or cfg.shuffle == "blocks")}


# Overrides that say nothing of what a run computes, left out of the name it is given (``default_name``)
_UNNAMED = {"experiment", "run_name", "track", "log_every", "checkpoint_every", "diagnostics", "diagnostics_every"}


def default_name(path: str | os.PathLike | None, overrides: list[str] = ()) -> str:
    """A run's name where its config gives none: the config file's name, then the overrides that change
    what it computes or where, as given: ``digits eta=0.5 workers=2``."""
    stem = Path(path).stem if path not in (None, "-") else "defaults"
    shown = [text for text in overrides if text.partition("=")[0].strip() not in _UNNAMED]
    return " ".join([stem, *shown])[:250]


def renamed(name: str, saved: JobConfig, cfg: JobConfig) -> str:
    """A resumed run's name, with the values it states that ``cfg`` changes brought up to date: ``digits
    epochs=5``, resumed with epochs=8, is ``digits epochs=8``."""
    changed = {k for k in KEYS if k not in _UNNAMED and getattr(saved, k) != getattr(cfg, k)}
    return " ".join(f"{k}={show(getattr(cfg, k))}" if (k := word.partition("=")[0]) in changed and "=" in word
                    else word for word in name.split(" "))[:250]


def _check(key: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={show(value)}: {valid}")


def show(value: Any, limit: int | None = 200) -> str:
    """A value as YAML on one line, as a user would write it (``key=VALUE``), cut to ``limit`` characters."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip().removesuffix("...").strip()
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice (plain YAML keeps the last one silently) and
    aliases (a config writes its values out; nested aliases can make a small file expand without end)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"an alias (*{event.anchor}) at line {event.start_mark.line + 1}: write each value "
                              "out instead of YAML's & anchors and * aliases")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"key {key!r} is written twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values: the safe loader, duplicate keys refused."""
    return yaml.load(text, Loader=_Loader)


def _coerce(name: str, value: Any) -> Any:
    """Check a value's type against the key's and normalise it (floats from ints, a tuple from a list)."""
    kind, what = TYPES[name], HELP[name]
    if isinstance(kind, types.UnionType) and value is None:  # X | None
        return None
    kind = next(k for k in typing.get_args(kind) if k is not type(None)) if isinstance(kind, types.UnionType) else kind
    null = " or null" if isinstance(TYPES[name], types.UnionType) else ""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if kind is bool:
        _check(name, value, isinstance(value, bool), f"must be true or false ({what})")
    elif kind is int:
        _check(name, value, whole, f"must be a whole number{null} ({what})")
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        _check(name, value, whole or isinstance(value, float), f"must be a number{null} ({what})")
        value = float(value)
    elif kind is str:
        _check(name, value, isinstance(value, str), f"must be text{null} ({what})")
    else:  # tuple[int, ...]
        ok = isinstance(value, list | tuple) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
        _check(name, value, ok, f"must be a list of whole numbers ({what})")
        value = tuple(value)
    return value


def _validate(cfg: JobConfig) -> None:
    for name, f in KEYS.items():
        valid = f.metadata["valid"]
        if valid is not None:
            _check(name, getattr(cfg, name), valid(getattr(cfg, name)), f.metadata["invalid"])


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value``; the value is read as YAML (so ``sizes=[784,30,10]`` is a list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: write key=value, e.g. eta=0.5")
    known(key)
    if TYPES[key] in (str, str | None) and raw not in ("null", "~", ""):
        return key, raw  # text stays text: data=2024 is a path, not a number
    try:
        return key, parse_yaml(raw) if raw != "" else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML; e.g. sizes=[784,30,10]") from None


def known(key: Any) -> None:
    names = list(KEYS)
    if not isinstance(key, str):
        raise ConfigError(f"key {show(key)}: a key is a name, e.g. eta: 3.0; valid keys: {', '.join(names)}")
    if key not in names:
        import difflib

        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown key {key!r}: {hint}valid keys: {', '.join(names)}")


def check_value(key: str, value: Any) -> Any:
    """One key's value, typed and checked on its own (not against other keys); a ConfigError if invalid."""
    value = _coerce(key, value)
    valid = KEYS[key].metadata["valid"]
    if valid is not None:
        _check(key, value, valid(value), KEYS[key].metadata["invalid"])
    return value


def build_config(values: dict[str, Any]) -> JobConfig:
    coerced = {}
    for key, value in values.items():
        known(key)
        coerced[key] = _coerce(key, value)
    cfg = JobConfig(**coerced)
    _validate(cfg)
    _check_together(cfg)
    return cfg


def _check_together(cfg: JobConfig) -> None:
    """Keys that are valid alone but not with each other."""
    if cfg.early_stopping and not cfg.validation_size:
        raise ConfigError(f"early_stopping={cfg.early_stopping} watches validation accuracy, but validation_size=0 "
                          "holds out no examples to watch; set validation_size (e.g. validation_size=500), or "
                          "early_stopping=0")
    if cfg.keep == "best" and not cfg.validation_size:
        raise ConfigError("keep=best keeps the epoch of best validation accuracy, but validation_size=0 holds out no "
                          "examples to measure it on; set validation_size (e.g. validation_size=500), or keep=last")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would be waited on forever; a folder is a mistake
        raise ConfigError(f"config {str(path)!r}: is not a regular file; pick one of configs/*.yaml")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config {str(path)!r}: no such file; pick one of configs/*.yaml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {str(path)!r}: cannot be read ({e})") from None
    try:
        values = parse_yaml(text)
    except ConfigError as e:
        raise ConfigError(f"config {str(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(f"config {str(path)!r}: {problem}{line}; write plain key: value lines") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config {str(path)!r}: must be a mapping of key: value lines")
    if any(isinstance(k, str) and not _NAME.fullmatch(k) for k in values):
        # its text is not quoted: a file given by mistake (gradavg run /etc/shadow) may be a private one
        raise ConfigError(f"config {str(path)!r}: is not a gradavg config (it has keys that are no names; a "
                          "config is key: value lines such as eta: 3.0); pick one of configs/*.yaml")
    return values


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def split_sweep(values: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A config's job keys, and its ``sweep:`` section (None where it has none)."""
    values = dict(values)
    return values, values.pop(SWEEP_SECTION, None)


SWEEP_SECTION = "sweep"  # a config's section of swept keys, which only `gradavg sweep` reads


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> JobConfig:
    """The YAML file's values, then the overrides in order, typed and validated."""
    values = read_yaml(path) if path is not None else {}
    if SWEEP_SECTION in values:
        raise ConfigError(f"config {str(path)!r} has a sweep: section, which runs several jobs: run it with "
                          f"`gradavg sweep {path}` (or remove the section to run one job)")
    return with_overrides(values, overrides)


def with_overrides(values: dict[str, Any], overrides: list[str]) -> JobConfig:
    """A config's values, then the command line's ``key=value`` overrides in order, typed and validated."""
    values, given = dict(values), {}
    for text in overrides:
        key, value = parse_override(text)
        if key in given:
            raise ConfigError(f"{key} is given twice on the command line ({given[key]}, {text}); keep one")
        given[key], values[key] = text, value
    return build_config(values)


def check_against_data(cfg: JobConfig, n_inputs: int, n_classes: int, max_label: int) -> None:
    """sizes must fit the data: one input neuron per feature, one output neuron per class."""
    if cfg.sizes[0] != n_inputs:
        raise ConfigError(f"sizes={show(cfg.sizes)}: the input layer has {cfg.sizes[0]} neurons but {cfg.data} "
                          f"has {n_inputs} inputs per example; use sizes=[{n_inputs},...]")
    if cfg.sizes[-1] < n_classes or max_label >= cfg.sizes[-1]:
        raise ConfigError(f"sizes={show(cfg.sizes)}: the output layer has {cfg.sizes[-1]} neurons but {cfg.data} "
                          f"has labels up to {max_label}; use sizes=[...,{max(n_classes, max_label + 1)}]")


def replace(cfg: JobConfig, **changes: Any) -> JobConfig:
    return build_config({**cfg.to_dict(), **changes})


def result_changes(before: JobConfig, after: JobConfig) -> list[str]:
    """``key: old -> new`` for each result-changing key that differs."""
    return [f"{key}: {show(getattr(before, key))} -> {show(getattr(after, key))}" for key in RESULT_KEYS
            if getattr(before, key) != getattr(after, key)]
