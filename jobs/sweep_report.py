"""A sweep's report: its table of trials (one ``Row`` each, read back from the trial's child run), its
plots, its best trial and that trial's registered model, logged to the sweep's parent run."""

from __future__ import annotations

import csv
import io
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from jobs import runs
from jobs.config import show
from jobs.store import TrackingError, logged_models, model_version_path, process_uri, ui_hint
from jobs.sweep import Plan, Trial
from jobs.text import plural
from jobs.trials import Outcome


@dataclass
class Row:
    """One line of the sweep's table, read back from the trial's child run."""

    trial: Trial
    status: str
    run_id: str = ""
    best_accuracy: float | None = None
    best_epoch: int | None = None
    final_train_cost: float | None = None
    epochs: int = 0
    stopped: str = ""
    cause: str = ""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class SweepResult:
    """A sweep's rows, one a trial, and its best trial, under its parent run."""

    parent_id: str
    uri: str
    rows: list[Row]
    best: Row | None
    experiment_id: str = "0"


def read_row(client, trial: Trial, child, outcome: Outcome | None = None) -> Row:
    if child is None:
        return Row(trial, outcome.status if outcome else "NOT RUN", cause=outcome.cause if outcome else "")
    run_id, tags = child.info.run_id, child.data.tags
    curves = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
              for key in ("accuracy/validation", "cost/train")}
    best_accuracy, best_epoch = None, None
    for epoch, value in curves["accuracy/validation"]:
        if best_accuracy is None or value > best_accuracy:  # the first epoch that reached the best
            best_accuracy, best_epoch = value, epoch
    costs = curves["cost/train"]
    cause = ""  # a failure's cause, while the run stays failed (a resumed trial may finish after all)
    if child.info.status == "FAILED":
        cause = outcome.cause if outcome is not None and outcome.status == "FAILED" else tags.get(runs.FAILURE, "")
    return Row(trial, child.info.status, run_id, best_accuracy, best_epoch, costs[-1][1] if costs else None,
               costs[-1][0] if costs else 0, tags.get(runs.STOPPED_REASON, ""), cause, curves)


def describe(row: Row) -> str:
    """How a trial ended, as its line of the sweep's progress says it."""
    if row.status != "FINISHED":
        return row.status + (f": {row.cause}" if row.cause else "")
    best = (f", best validation accuracy {row.best_accuracy:.2f}% at epoch {row.best_epoch}"
            if row.best_accuracy is not None else "")
    stopped = f"; stopped: {row.stopped}" if row.stopped else ""
    return f"FINISHED after {plural(row.epochs, 'epoch')}{best}{stopped}"


def best_of(rows: list[Row]) -> Row | None:
    """The finished trial with the best validation accuracy (the first, on a tie)."""
    return max((r for r in rows if r.status == "FINISHED" and r.best_accuracy is not None),
               key=lambda r: (r.best_accuracy, -r.trial.number), default=None)


def log_report(client, plan: Plan, parent_id: str, rows: list[Row], best: Row | None) -> None:
    """The table, the plots and the best trial, to the parent run."""
    with tempfile.TemporaryDirectory(prefix="gradavg-sweep-") as folder:
        (Path(folder) / "trials.csv").write_text(table_csv(plan, rows))
        _plots(plan, rows, Path(folder) / "plots")
        client.log_artifacts(parent_id, folder)
    counts = {s: sum(r.status == s for r in rows) for s in ("FINISHED", "FAILED", "KILLED")}
    tags = {runs.SWEEP_FINISHED: str(counts["FINISHED"]), runs.SWEEP_FAILED: str(counts["FAILED"])}
    if best is not None:  # tags, not metrics: the parent draws nothing in a chart, as if it were a trial
        tags.update({runs.BEST_RUN_ID: best.run_id, runs.BEST_TRIAL: str(best.trial.number),
                     runs.BEST_ACCURACY: f"{best.best_accuracy:.2f}%", runs.BEST_EPOCH: str(best.best_epoch),
                     **{runs.BEST_VALUE + k: show(v) for k, v in best.trial.values.items()}})
    tags[runs.DESCRIPTION] = sweep_description(plan, parent_id, rows, best, counts)
    runs.set_tags(client, parent_id, tags)


def sweep_description(plan: Plan, parent_id: str, rows: list[Row], best: Row | None, counts: dict[str, int]) -> str:
    """The parent run's description: how its trials ended, the best one, and the trials' validation curves."""
    ended = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    text = f"A sweep of {', '.join(a.key for a in plan.axes)}: {plural(len(rows), 'trial')}, {ended}."
    if best is not None:
        text += (f" Best: trial {best.trial.number} ({best.trial.label}), validation accuracy "
                 f"{best.best_accuracy:.2f}% at epoch {best.best_epoch}, run {best.run_id}.")
    if any(r.curves.get("accuracy/validation") for r in rows):
        text += "\n\n" + runs.artifact_image(parent_id, "plots/validation_curves.png", "the trials' validation curves")
    return text


def register_once(client, uri: str, parent_id: str, name: str | None, best_id: str | None, stream) -> None:
    """``--register NAME``: the best trial's model, once a sweep (a resumed sweep's may be registered already)."""
    parent = client.get_run(parent_id)
    registered = parent.data.tags.get(runs.REGISTERED_MODEL)
    if registered:
        if name:
            stream.write(f"gradavg: the best trial's model is registered already, as {registered}\n")
        return
    asked = "".join(c for c in parent.data.tags.get(runs.REGISTER_AS, "") if c.isprintable())  # printed, not run
    if not name and asked and best_id is not None:  # registering is done only when the command line asks
        again = f"--register {shlex.quote(asked)}"
        stream.write(f"gradavg: note: this sweep was started with {again}, and its best trial's model is not "
                     f"registered yet: pass {again} to register it\n")
    if not name or best_id is None:
        return
    best = client.get_run(best_id)
    version = register_best(client, uri, name, best_id)
    tags = {"sweep_run_id": parent_id, "run_id": best_id, **_described(parent, best)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=_version_text(parent, best, tags))
    runs.set_tag(client, parent_id, runs.REGISTERED_MODEL, f"models:/{name}/{version}")
    number = tags.get("trial", "?")
    page = f" (its page: {ui_hint(uri, model_version_path(name, version))})" if uri.startswith("http") else ""
    stream.write(f"gradavg: registered trial {number}'s model as models:/{name}/{version}{page}\n")
    if best.data.params.get("keep", "last") != "best" and tags.get("kept_epoch") != tags.get("best_epoch"):
        stream.write(f"gradavg: note: the trials kept their last epoch's weights (keep=last), so this model is epoch "
                     f"{tags.get('kept_epoch')}'s, not that of its best validation accuracy (epoch "
                     f"{tags.get('best_epoch')}); sweep with keep=best to register the best epoch's weights\n")


def _described(parent, best) -> dict[str, str]:
    """What a registered version says of itself: its trial, the swept values, its validation accuracy, and
    which epoch's weights it holds."""
    tags, values = {}, parent.data.tags
    if trial := values.get(runs.BEST_TRIAL) or best.data.tags.get(runs.TRIAL):
        tags["trial"] = trial
    tags.update({k.removeprefix(runs.BEST_VALUE): v for k, v in values.items() if k.startswith(runs.BEST_VALUE)})
    if runs.BEST_ACCURACY in values:
        tags["validation_accuracy"] = values[runs.BEST_ACCURACY]
    tags["kept_epoch"] = best.data.tags.get(runs.KEPT_EPOCH, "")
    tags["best_epoch"] = values.get(runs.BEST_EPOCH, "")
    return {k: v for k, v in tags.items() if v}


def _version_text(parent, best, tags: dict[str, str]) -> str:
    swept = ", ".join(f"{k}={tags[k]}" for k in parent.data.tags.get(runs.SWEEP_KEYS, "").split(", ") if k in tags)
    return (f"The best trial (trial {tags.get('trial', '?')}: {swept}) of sweep run {parent.info.run_id}, by "
            f"validation accuracy ({tags.get('validation_accuracy', '?')} at epoch {tags.get('best_epoch', '?')}). "
            f"It holds the weights of epoch {tags.get('kept_epoch', '?')} of run {best.info.run_id} (keep="
            f"{best.data.params.get('keep', 'last')}).")


def register_best(client, uri: str, name: str, run_id: str) -> str:
    """Register the best trial's logged model under ``name``; return the new version."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    ready = [m for m in logged_models(uri, client.get_run(run_id).info.experiment_id, run_id)
             if m.status == LoggedModelStatus.READY]
    if not ready:
        raise TrackingError(f"--register {name}: the best trial's run {run_id} has no model to register")
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    was, MLFLOW_LOGGING_STREAM.enabled = MLFLOW_LOGGING_STREAM.enabled, False  # gradavg's line says what it did
    try:
        with process_uri(uri):  # models:/ URIs are resolved in the process's store
            return str(mlflow.register_model(f"models:/{ready[0].model_id}", name).version)
    finally:
        MLFLOW_LOGGING_STREAM.enabled = was


COLUMNS = ("status", "best_validation_accuracy", "best_epoch", "epochs", "final_train_cost", "stopped", "cause",
           "run_id")


def table_csv(plan: Plan, rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *(a.key for a in plan.axes), *COLUMNS])
    for r in rows:
        writer.writerow([r.trial.number, *(show(r.trial.values[a.key]) for a in plan.axes), r.status,
                         "" if r.best_accuracy is None else f"{r.best_accuracy:.4f}", r.best_epoch or "", r.epochs,
                         "" if r.final_train_cost is None else f"{r.final_train_cost:.6g}", r.stopped, r.cause,
                         r.run_id])
    return out.getvalue()


def table_text(plan: Plan, rows: list[Row]) -> str:
    """The table as a user reads it on a terminal."""
    head = ["trial", *(a.key for a in plan.axes), "status", "best val.", "epoch", "train cost", "run"]
    lines = [head]
    for r in rows:
        lines.append([str(r.trial.number), *(show(r.trial.values[a.key]) for a in plan.axes),
                      r.status + ("*" if r.stopped else ""),
                      "" if r.best_accuracy is None else f"{r.best_accuracy:.2f}%", str(r.best_epoch or ""),
                      "" if r.final_train_cost is None else f"{r.final_train_cost:.4f}", r.run_id])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    if any(r.stopped for r in rows):
        text += f"\n* stopped early (the run's {runs.STOPPED_REASON} tag says why)"
    return text


def _plots(plan: Plan, rows: list[Row], folder: Path) -> None:
    from jobs import plots

    folder.mkdir()
    ran = [r for r in rows if r.best_accuracy is not None]
    for axis in plan.axes:
        points = [(r.trial.values[axis.key], r.best_accuracy) for r in ran]
        plots.against_key(axis.key, points, folder / f"validation_accuracy_vs_{axis.key}.png")
    for metric, name, ylabel in (("accuracy/validation", "validation_curves", "validation accuracy (%)"),
                                 ("cost/train", "training_cost_curves", "training cost C")):
        series = {f"{r.trial.number}: {r.trial.label}": r.curves.get(metric, [])
                  for r in rows if r.curves.get(metric)}
        plots.overlaid(series, ylabel, folder / f"{name}.png")


def best_line(result: SweepResult) -> str:
    best = result.best
    if best is None:
        return f"no trial finished; the sweep's run {result.parent_id} in {result.uri} holds the table"
    return (f"best: trial {best.trial.number} ({best.trial.label}), validation accuracy "
            f"{best.best_accuracy:.2f}% at epoch {best.best_epoch}, run {best.run_id}")
