"""A sweep's plan: which keys vary and how, the trials that follow, and the scheduler that stops
trials clearly behind. Nothing here trains or tracks (``jobs.sweep_run`` and ``jobs.trials`` do).

A swept key is written as on the command line, ``key=TEXT``:
- ``eta=0.1,0.5,2.0``: a grid of listed values (any key a job's result depends on);
- ``eta=log(0.01,10)``: a range drawn log-uniformly, ``batch_size=[10,100]``: uniformly (numbers only;
  whole numbers for whole-number keys), once for each of ``--samples N``.
Trials are every combination of the grids, for each sample of the ranges, in that order.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.config import (
    HELP,
    KEYS,
    TYPES,
    ConfigError,
    JobConfig,
    build_config,
    check_value,
    default_name,
    known,
    parse_override,
    read_yaml,
    replace,
    show,
    split_sweep,
    with_overrides,
)
from jobs.errors import UsageError

MAX_TRIALS = 500  # each trial is an MLflow run: a sweep larger than this is more likely a typo than a plan
# Keys a trial does not take from the sweep (where and how it runs, one core each, and its tracking), and why:
# each key's ``not_swept`` (jobs.config.key).
NOT_SWEPT = {name: f.metadata["not_swept"] for name, f in KEYS.items() if f.metadata["not_swept"]}
_RANGE = re.compile(r"^\s*(log)?\s*[\[(]\s*([^,\[\]()]+?)\s*,\s*([^,\[\]()]+?)\s*[\])]\s*$")


class Axis:
    """One swept key: a grid of listed values, or a range drawn from once per sample."""

    def __init__(self, key: str, text: str, values: tuple = (), low: float | None = None,
                 high: float | None = None, log: bool = False):
        self.key, self.text, self.values = key, text, values
        self.low, self.high, self.log = low, high, log

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def draw(self, rng: np.random.Generator) -> Any:
        """One value from the range: log-uniform or uniform; whole numbers for an int key; 6 digits for
        a float (a value a user can read and type again)."""
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        if TYPES[self.key] is int:
            return int(min(max(round(value), self.low), self.high))
        return float(f"{value:.6g}")

    def to_dict(self) -> dict:
        return {"key": self.key, "text": self.text}


def parse_axis(key: str, raw: Any) -> Axis:
    """``key=TEXT`` from the command line, or a sweep section's entry (a YAML list is a grid)."""
    known(key)
    if key in NOT_SWEPT:
        raise ConfigError(f"{key} cannot be swept ({NOT_SWEPT[key]})")
    if isinstance(raw, list):  # a YAML list of values; sizes: [784, 30, 10] is one value, not a list of them
        if TYPES[key] != tuple[int, ...] or all(isinstance(v, list) for v in raw):
            return _grid(key, ",".join(show(v) for v in raw), list(raw))
    if not isinstance(raw, str):
        raise ConfigError(f"sweep {key}: {show(raw)} is one value; a swept key needs several, e.g. "
                          f"{key}: [A, B] or {key}=A,B on the command line")
    text = raw.strip()
    match = _RANGE.match(text)
    numeric = TYPES[key] in (int, float)
    if match and (numeric or match.group(1)):
        return _range(key, text, match)
    if text.startswith("log(") or numeric and text.startswith("["):
        raise ConfigError(f"sweep {key}={text}: a range has two ends, {key}=log(A,B) or {key}=[A,B] (with --samples "
                          f"N); to list values write {key}=A,B,C")
    parts = _split_top(text)
    empty = [i for i, part in enumerate(parts, start=1) if not part.strip()]
    if len(parts) >= 2 and empty:
        raise ConfigError(f"sweep {key}={text}: value {empty[0]} of {len(parts)} is empty; list the values as "
                          f"{key}=A,B,C")
    if len(parts) < 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"sweep {key}={text}: a swept key needs two or more values, e.g. {key}=A,B,C, "
                          + ("or a range, log(A,B) or [A,B] with --samples N" if numeric else
                             f"({HELP[key]})"))
    return _grid(key, text, [parse_override(f"{key}={p.strip()}")[1] for p in parts])


def _grid(key: str, text: str, values: list) -> Axis:
    if not values:
        raise ConfigError(f"sweep {key}: the list of values is empty; give two or more, e.g. {key}=A,B")
    typed = [check_value(key, v) for v in values]
    for i, value in enumerate(typed):
        if value in typed[:i]:
            raise ConfigError(f"sweep {key}={text}: {show(value)} is listed twice; list each value once")
    return Axis(key, text, tuple(typed))


def _range(key: str, text: str, match: re.Match) -> Axis:
    log, low_text, high_text = match.groups()
    if TYPES[key] not in (int, float):
        raise ConfigError(f"sweep {key}={text}: {key} takes no range ({HELP[key]}); list its values instead, "
                          f"e.g. {key}=A,B")
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        raise ConfigError(f"sweep {key}={text}: a range's ends are numbers, e.g. {key}=log(0.01,10)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        example = f"{key}=log(0.01,10)" if log else f"{key}=[1,10]"
        raise ConfigError(f"sweep {key}={text}: a range needs finite ends, the lower first, e.g. {example}")
    if log and low <= 0:
        raise ConfigError(f"sweep {key}={text}: a log range needs ends above 0, e.g. {key}=log(0.01,10)")
    if TYPES[key] is int and (low != int(low) or high != int(high)):
        raise ConfigError(f"sweep {key}={text}: {key} is a whole number; give whole-number ends")
    for end in (low, high):  # both ends must be valid values of the key
        check_value(key, int(end) if TYPES[key] is int else end)
    return Axis(key, text, low=low, high=high, log=bool(log))


def _split_top(text: str) -> list[str]:
    """``text`` split at its commas outside brackets: ``[1,2],[3,4]`` is two values."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[(" and 1 or char in "])" and -1 or 0
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def is_axis(text: str) -> bool:
    """Whether a command-line ``key=TEXT`` sweeps its key (several values, or a range) or sets it."""
    key, sep, raw = text.partition("=")
    if not sep:
        return False
    key, raw = key.strip(), raw.strip()
    if key in TYPES and TYPES[key] != tuple[int, ...] and (_RANGE.match(raw) or raw.startswith("log(")):
        return True  # a range (or one written wrong: parse_axis says how), and experiment=[a,b] is refused there
    if key in TYPES and TYPES[key] in (int, float) and raw.startswith("["):
        return True
    return len(_split_top(raw)) > 1


@dataclass
class Trial:
    number: int  # 1-based
    values: dict[str, Any]  # the swept keys' values
    config: JobConfig

    @property
    def label(self) -> str:
        return _label(self.values)


def _label(values: dict[str, Any]) -> str:
    """A trial's values as a user writes them: ``eta=0.5 lmbda=1.0``."""
    return " ".join(f"{k}={show(v)}" for k, v in values.items())


@dataclass
class Plan:
    """Every trial of a sweep, and how it was made (kept in the parent run, so a resume runs the same)."""

    base: JobConfig
    axes: list[Axis]
    samples: int | None
    trials: list[Trial] = field(default_factory=list)
    scheduler: dict[str, Any] = field(default_factory=dict)  # {} or {"name": "asha", "grace": .., "reduction": ..}

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "axes": [a.to_dict() for a in self.axes], "samples": self.samples,
                "scheduler": self.scheduler,
                "trials": [{"number": t.number, "values": t.values, "config": t.config.to_dict()}
                           for t in self.trials]}

    def with_allow_pickle(self, allow: bool) -> Plan:
        """The same plan, every config's ``allow_pickle`` set to ``allow``."""
        trials = [Trial(t.number, t.values, replace(t.config, allow_pickle=allow)) for t in self.trials]
        return Plan(replace(self.base, allow_pickle=allow), self.axes, self.samples, trials, self.scheduler)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        axes = [parse_axis(a["key"], a["text"]) for a in d["axes"]]
        trials = [Trial(t["number"], t["values"], build_config(t["config"])) for t in d["trials"]]
        return cls(build_config(d["base"]), axes, d["samples"], trials, d.get("scheduler") or {})


def plan_from(path: str | None, texts: list[str], samples: int | None, scheduler: dict | None = None) -> Plan:
    """The plan a command line gives: a config (its ``sweep:`` section too), keys set (``key=value``) and
    keys swept (``key=A,B``, ``key=log(A,B)``; the command line's replaces the section's)."""
    values = read_yaml(path) if path not in (None, "-") else {}
    values, section = split_sweep(values)
    axes: dict[str, Axis] = {}
    if section is not None:
        if not isinstance(section, dict) or not section:
            raise ConfigError(f"config {str(path)!r}: its sweep: section maps keys to values, e.g. "
                              "sweep: {eta: [0.1, 0.5, 2.0]}")
        for key, raw in section.items():
            axes[key] = parse_axis(key, raw)
    fixed, on_command_line = [], set()
    for text in texts:
        if not is_axis(text):
            fixed.append(text)
            continue
        key, _, raw = text.partition("=")
        key = key.strip()
        if key in on_command_line:
            raise ConfigError(f"sweep {key} is given twice on the command line; keep one")
        on_command_line.add(key)
        axes[key] = parse_axis(key, raw)
    for text in fixed:
        key = text.partition("=")[0].strip()
        if key in axes:
            raise ConfigError(f"{key} is both swept ({key}={axes[key].text}) and set ({text}); keep one")
    base = with_overrides(values, fixed)
    if base.run_name is None:  # the trials' names start as a run's would ("digits epochs=5 trial 1: eta=0.5")
        base = build_config({**base.to_dict(), "run_name": default_name(path, fixed)})
    if base.backend != "local":
        raise ConfigError(f"backend={base.backend}: a sweep's trials each run on the local backend, side by side "
                          "(on a Ray cluster's nodes with --address); set backend=local")
    if not base.track:
        raise ConfigError("track=false: a sweep's trials are compared through MLflow; drop track=false")
    return make_plan(base, list(axes.values()), samples, scheduler)


def make_plan(base: JobConfig, axes: list[Axis], samples: int | None, scheduler: dict | None = None) -> Plan:
    """The trials: each combination of the grids, for each sample of the ranges (drawn from a generator
    seeded by the config's ``seed``), each an ordinary config, checked here."""
    if not axes:
        raise ConfigError("a sweep needs a key with several values, e.g. eta=0.1,0.5,2.0 (or a sweep: section in "
                          "the config)")
    seen = [a.key for a in axes]
    for i, key in enumerate(seen):
        if key in seen[:i]:
            raise ConfigError(f"sweep {key} is given twice (a config's sweep: section and the command line, or "
                              "twice on the command line); keep one")
    ranges = [a for a in axes if a.is_range]
    if ranges and samples is None:
        raise ConfigError(f"{ranges[0].key}={ranges[0].text} is a range: say how many values to draw with "
                          "--samples N")
    if samples is not None and not ranges:
        raise ConfigError("--samples draws values from ranges (key=log(A,B) or key=[A,B]); this sweep lists every "
                          "value: drop --samples")
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples {samples}: draw at least 1")
    grids = [a for a in axes if not a.is_range]
    count = math.prod(len(a.values) for a in grids) * (samples or 1)
    if count > MAX_TRIALS:
        raise ConfigError(f"this sweep is {count:,} trials; a sweep runs at most {MAX_TRIALS}: list fewer values or "
                          "draw fewer --samples")
    if base.validation_size < 1:
        raise ConfigError("a sweep compares its trials on validation accuracy, but validation_size=0 holds out no "
                          "examples; set validation_size (e.g. validation_size=500)")
    rng = np.random.default_rng([base.seed, 2])  # the sweep's own stream: the trials' seed stays theirs
    trials = []
    for _ in range(samples or 1):
        drawn = {a.key: a.draw(rng) for a in ranges}
        for combination in itertools.product(*(a.values for a in grids)):
            values = {**dict(zip((a.key for a in grids), combination)), **drawn}
            values = {a.key: values[a.key] for a in axes}  # in the order the keys were given
            trials.append(Trial(len(trials) + 1, values, _trial_config(base, values, len(trials) + 1)))
    return Plan(base, axes, samples, trials, scheduler or {})


def _trial_config(base: JobConfig, values: dict[str, Any], number: int) -> JobConfig:
    name = f"trial {number}: {_label(values)}"
    if base.run_name:
        name = f"{base.run_name} {name}"
    changes = {**values, "run_name": name[:250], "backend": "local", "threads": base.threads or 1}
    return build_config({**base.to_dict(), **changes})


class SuccessiveHalving:
    """Asynchronous successive halving (ASHA; Li et al. 2018), the rule of Ray Tune's ASHAScheduler: at
    each rung (epochs ``grace``, ``grace·r``, ``grace·r²``, … below ``max_epochs``) a trial goes on only
    if its validation accuracy is not below the top 1/r of those recorded at that rung before it.

    Decisions depend on the order trials reach a rung (one at a time, the order is the trials' own)."""

    def __init__(self, max_epochs: int, grace: int = 1, reduction: int = 3):
        self.grace, self.reduction = grace, reduction
        self.rungs: dict[int, dict[int, float]] = {}
        epoch = grace
        while epoch < max_epochs:
            self.rungs[epoch] = {}
            epoch *= reduction

    def report(self, trial: int, epoch: int, accuracy: float) -> str | None:
        """Record a trial's validation accuracy (%) after ``epoch``; say why it stops, or None."""
        recorded = self.rungs.get(epoch)
        if recorded is None or trial in recorded:  # no rung, or decided before (a resumed trial)
            return None
        before = list(recorded.values())
        recorded[trial] = accuracy
        if not before:
            return None
        cutoff = float(np.percentile(before, 100 * (1 - 1 / self.reduction)))
        if accuracy < cutoff:
            return (f"successive halving: validation accuracy {accuracy:.2f}% at epoch {epoch} is below "
                    f"{cutoff:.2f}%, the top 1/{self.reduction} of the {len(before)} trial"
                    f"{'s' if len(before) > 1 else ''} that reached it before")
        return None


def scheduler_for(plan: Plan) -> SuccessiveHalving | None:
    spec = plan.scheduler
    if spec.get("name") != "asha":
        return None
    return SuccessiveHalving(max(t.config.epochs for t in plan.trials), spec["grace"], spec["reduction"])


def check_options(args) -> None:
    """The rules between ``gradavg sweep``'s options (``args``, as the command line parsed them), checked
    before anything is read or run."""
    if args.resume and (args.config or args.overrides or args.samples is not None or args.scheduler != "none"):
        raise UsageError(f"--resume {args.resume} continues a sweep as it was planned: drop the config, the keys, "
                         "--samples and --scheduler")
    if not args.resume and not args.config:
        raise UsageError("gradavg sweep needs a config and the keys to sweep, e.g. gradavg sweep "
                         "configs/digits.yaml validation_size=300 eta=0.5,3.0 (or --resume PARENT_RUN_ID)")
    if args.at_once is not None and args.at_once < 1:
        raise UsageError(f"--at-once {args.at_once}: run at least 1 trial at a time")
    if (args.grace is not None or args.reduction is not None) and args.scheduler != "asha":
        raise UsageError("--grace and --reduction set the asha scheduler: add --scheduler asha, or drop them")
    if args.grace is not None and args.grace < 1:
        raise UsageError(f"--grace {args.grace}: the first epoch a trial can be stopped at is at least 1")
    if args.reduction is not None and args.reduction < 2:
        raise UsageError(f"--reduction {args.reduction}: keep at most the top half at each rung (2 or more)")
    if args.register is not None and (not args.register.strip() or set(args.register) & set("/:")):
        raise UsageError(f"--register {args.register!r}: a model name is some text without / or : (MLflow's rule), "
                         "e.g. --register digits-best")
    if args.allow_pickle and not args.resume:
        raise UsageError("--allow-pickle goes with --resume (a new sweep takes allow_pickle=true as a key); drop it")
    if args.follow and not args.address:
        raise UsageError("--follow goes with --address (it streams a submitted sweep's log); drop it")
