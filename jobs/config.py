"""Job configuration: a YAML file in configs/, overridden on the command line by key=value.

Every key is typed and validated when the config is loaded, before any data, cluster or
tracking work starts. Errors are one line that names the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from cluster import TRANSPORTS
from core.functions import ACTIVATIONS, COSTS
from core.network import DTYPES, INITS

BACKENDS = ("local", "ray")


class ConfigError(ValueError):
    """A user's mistake in a config or an override; the message says what to write instead."""


@dataclass(frozen=True)
class JobConfig:
    # the data
    data: str = "digits"
    validation_size: int = 0
    test_size: int | None = None
    allow_pickle: bool = False
    # the network (chapter 1's network by default)
    sizes: tuple[int, ...] = (64, 30, 10)
    cost: str = "quadratic"
    activation: str = "sigmoid"
    init: str = "standard"
    init_scale: float = 1.0
    dtype: str = "float64"
    # stochastic gradient descent
    eta: float = 3.0
    lmbda: float = 0.0
    batch_size: int = 10
    epochs: int = 30
    seed: int = 0
    # where gradients are computed
    backend: str = "local"
    workers: int = 1
    chunk_size: int = 500
    threads: int = 0
    num_cpus: float = 1.0
    transport: str = "auto"
    max_worker_failures: int = 3
    # tracking and output
    experiment: str = "gradavg"
    run_name: str | None = None
    log_every: int = 100
    diagnostics: bool = True
    diagnostics_every: int = 0
    checkpoint_every: int = 1
    track: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sizes"] = list(self.sizes)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


HELP = {
    "data": "a bundled dataset (digits, mnist-5k, synthetic[:N:INPUTS:CLASSES]) or a path",
    "validation_size": "training examples held out for validation, >= 0",
    "test_size": "examples held out for test where the data has no test set (null: the dataset's default)",
    "allow_pickle": "read the book's pickled mnist.pkl.gz (unpickling can run code: only for files you trust)",
    "sizes": "layer sizes, input first, e.g. [784, 30, 10]",
    "cost": f"one of {', '.join(COSTS)}",
    "activation": f"one of {', '.join(ACTIVATIONS)}",
    "init": f"one of {', '.join(INITS)}",
    "init_scale": "multiplies the initial weights, > 0 (large values start the network saturated)",
    "dtype": f"one of {', '.join(DTYPES)}",
    "eta": "learning rate η, > 0",
    "lmbda": "L2 weight decay λ, >= 0",
    "batch_size": "mini-batch size, >= 1",
    "epochs": "passes over the training data, >= 1",
    "seed": "seed of the initial weights and the shuffles, >= 0",
    "backend": f"one of {', '.join(BACKENDS)}",
    "workers": "Ray workers (backend=ray), >= 1",
    "chunk_size": "examples per gradient chunk, >= 1; results are bit-identical for a given chunk_size",
    "threads": "threads computing chunks in the local backend, 0 for one per core",
    "num_cpus": "CPUs each Ray worker holds (and its BLAS threads), > 0",
    "transport": f"how Ray steps travel: one of {', '.join(TRANSPORTS)} (auto: a compiled graph where it works, "
                 "else tasks; the results are the same bits)",
    "max_worker_failures": "Ray worker deaths a job survives before it stops (to be resumed), >= 0",
    "experiment": "MLflow experiment name",
    "run_name": "MLflow run name (null: MLflow picks one)",
    "log_every": "log the mini-batch cost every this many steps, >= 1",
    "diagnostics": "log per-layer diagnostics (|δ|, gradient norms, saturation) every epoch",
    "diagnostics_every": "also log them every this many steps, 0 for only once an epoch",
    "checkpoint_every": "save a checkpoint every this many epochs, 0 for never",
    "track": "track the run in MLflow (false: train without tracking)",
}


def _check(key: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_show(value)}: {valid}")


def _show(value: Any, limit: int = 200) -> str:
    """A value as YAML on one line, as a user would write it, cut to ``limit`` characters."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip().removesuffix("...").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _coerce(key: str, value: Any) -> Any:
    """Check a value's type against the field's and normalise it (ints for floats, tuples for lists)."""
    kind = {f.name: f.type for f in fields(JobConfig)}[key]
    valid = HELP[key]
    if kind == "bool":
        _check(key, value, isinstance(value, bool), f"must be true or false ({valid})")
    elif kind == "int":
        _check(key, value, isinstance(value, int) and not isinstance(value, bool), f"must be a whole number ({valid})")
    elif kind == "int | None":
        _check(key, value, value is None or (isinstance(value, int) and not isinstance(value, bool)),
               f"must be a whole number or null ({valid})")
    elif kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        _check(key, value, isinstance(value, int | float) and not isinstance(value, bool),
               f"must be a number ({valid})")
        value = float(value)
    elif kind == "str":
        _check(key, value, isinstance(value, str), f"must be text ({valid})")
    elif kind == "str | None":
        _check(key, value, value is None or isinstance(value, str), f"must be text or null ({valid})")
    elif kind == "tuple[int, ...]":
        ok = isinstance(value, list | tuple) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
        _check(key, value, ok, f"must be a list of whole numbers ({valid})")
        value = tuple(value)
    return value


def _validate(cfg: JobConfig) -> None:
    c = _check
    c("sizes", cfg.sizes, len(cfg.sizes) >= 2 and min(cfg.sizes) >= 1,
      "needs at least two layer sizes, each >= 1, e.g. sizes=[784,30,10]")
    c("cost", cfg.cost, cfg.cost in COSTS, HELP["cost"])
    c("activation", cfg.activation, cfg.activation in ACTIVATIONS, HELP["activation"])
    c("init", cfg.init, cfg.init in INITS, HELP["init"])
    c("init_scale", cfg.init_scale, 0 < cfg.init_scale < float("inf"), "must be a finite number > 0")
    c("dtype", cfg.dtype, cfg.dtype in DTYPES, HELP["dtype"])
    c("eta", cfg.eta, cfg.eta > 0 and cfg.eta == cfg.eta and cfg.eta != float("inf"),
      "the learning rate η must be a finite number > 0, e.g. eta=3.0")
    c("lmbda", cfg.lmbda, 0 <= cfg.lmbda < float("inf"), "the L2 decay λ must be a finite number >= 0, e.g. lmbda=5.0")
    c("batch_size", cfg.batch_size, cfg.batch_size >= 1, "the mini-batch size must be >= 1, e.g. batch_size=10")
    c("epochs", cfg.epochs, cfg.epochs >= 1, "must be >= 1")
    c("seed", cfg.seed, cfg.seed >= 0, "must be >= 0")
    c("validation_size", cfg.validation_size, cfg.validation_size >= 0, "must be >= 0")
    c("test_size", cfg.test_size, cfg.test_size is None or cfg.test_size >= 1, "must be >= 1, or null")
    c("backend", cfg.backend, cfg.backend in BACKENDS, HELP["backend"])
    c("workers", cfg.workers, cfg.workers >= 1, "must be >= 1")
    c("chunk_size", cfg.chunk_size, cfg.chunk_size >= 1, "must be >= 1")
    c("threads", cfg.threads, cfg.threads >= 0, "must be >= 0 (0: one per core)")
    c("num_cpus", cfg.num_cpus, cfg.num_cpus > 0, "must be > 0")
    c("transport", cfg.transport, cfg.transport in TRANSPORTS, HELP["transport"])
    c("max_worker_failures", cfg.max_worker_failures, cfg.max_worker_failures >= 0, "must be >= 0")
    c("experiment", cfg.experiment, bool(cfg.experiment.strip()) and len(cfg.experiment) <= 500,
      "must be a name of 1 to 500 characters (MLflow's limit)")
    c("run_name", cfg.run_name, cfg.run_name is None or 0 < len(cfg.run_name) <= 250,
      "must be a name of 1 to 250 characters, or null")
    c("log_every", cfg.log_every, cfg.log_every >= 1, "must be >= 1")
    c("diagnostics_every", cfg.diagnostics_every, cfg.diagnostics_every >= 0, "must be >= 0 (0: once an epoch)")
    c("checkpoint_every", cfg.checkpoint_every, cfg.checkpoint_every >= 0, "must be >= 0 (0: never)")
    c("data", cfg.data, bool(cfg.data.strip()) and len(cfg.data) <= 4096, HELP["data"])


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value``; the value is read as YAML (so ``sizes=[784,30,10]`` is a list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: write key=value, e.g. eta=0.5")
    _known(key)
    kind = {f.name: f.type for f in fields(JobConfig)}[key]
    if kind in ("str", "str | None") and raw not in ("null", "~", ""):
        return key, raw  # text stays text: data=2024 is a path, not a number
    try:
        return key, parse_yaml(raw) if raw != "" else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML; e.g. sizes=[784,30,10]") from None


def _known(key: str) -> None:
    names = [f.name for f in fields(JobConfig)]
    if key not in names:
        import difflib

        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown key {key!r}: {hint}valid keys: {', '.join(names)}")


def build_config(values: dict[str, Any]) -> JobConfig:
    coerced = {}
    for key, value in values.items():
        _known(key)
        coerced[key] = _coerce(key, value)
    cfg = JobConfig(**coerced)
    _validate(cfg)
    return cfg


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
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
    return values


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> JobConfig:
    """The YAML file's values, then the overrides in order, typed and validated."""
    values = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return build_config(values)


def check_against_data(cfg: JobConfig, n_inputs: int, n_classes: int, max_label: int) -> None:
    """sizes must fit the data: one input neuron per feature, one output neuron per class."""
    if cfg.sizes[0] != n_inputs:
        raise ConfigError(f"sizes={_show(cfg.sizes)}: the input layer has {cfg.sizes[0]} neurons but {cfg.data} "
                          f"has {n_inputs} inputs per example; use sizes=[{n_inputs},...]")
    if cfg.sizes[-1] < n_classes or max_label >= cfg.sizes[-1]:
        raise ConfigError(f"sizes={_show(cfg.sizes)}: the output layer has {cfg.sizes[-1]} neurons but {cfg.data} "
                          f"has labels up to {max_label}; use sizes=[...,{max(n_classes, max_label + 1)}]")


def replace(cfg: JobConfig, **changes: Any) -> JobConfig:
    return build_config({**cfg.to_dict(), **changes})




# Keys whose change changes the numbers a run computes: a resumed run must keep them.
RESULT_KEYS = ("data", "validation_size", "test_size", "sizes", "cost", "activation", "init", "init_scale", "dtype",
               "eta",
               "lmbda", "batch_size", "seed", "chunk_size")


def result_changes(before: JobConfig, after: JobConfig) -> list[str]:
    """``key: old -> new`` for each result-changing key that differs."""
    return [f"{key}: {_show(getattr(before, key))} -> {_show(getattr(after, key))}" for key in RESULT_KEYS
            if getattr(before, key) != getattr(after, key)]
