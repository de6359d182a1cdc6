"""Running a sweep: one MLflow parent run, one child run per trial, trials side by side.

Each trial is ``jobs.run.run_job`` of its config in a process of its own (a new process on this
machine, or a Ray task on the cluster a submitted sweep runs on), so it computes and logs what
``gradavg run`` would, tagged with its parent (``mlflow.parentRunId``) and its number. The driver
here hands out trials, at most ``at_once`` at a time, answers the scheduler's question after each
epoch when there is one (``jobs.sweep.SuccessiveHalving``), and, when every trial has ended,
logs the table of trials, the plots and the best trial to the parent run.

The plan is the parent's ``sweep/plan.json``: a sweep resumed (``--resume PARENT_RUN_ID``) runs
the trials that did not finish, each from its own last checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from jobs import claims
from jobs.config import build_config, show
from jobs.errors import one_line, reason
from jobs.store import (
    TrackingError,
    experiment_id_of,
    logged_models,
    open_store,
    process_uri,
    run_tags,
)
from jobs.sweep import Plan, SuccessiveHalving, Trial, scheduler_for
from jobs.train import Hooks

SOURCE = "gradavg sweep"
PLAN_ARTIFACT = "sweep/plan.json"
TRIAL_TAG = "sweep_trial"
PARENT_TAG = "mlflow.parentRunId"
CLEANUP_SECONDS = 20  # how long stopped trials get to close their runs before they are killed


@dataclass
class Outcome:
    """How a trial's process ended: FINISHED, FAILED (``cause`` says why) or KILLED."""

    status: str
    cause: str = ""
    seconds: float = 0.0


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


# -- one trial, in the process it runs in

class _Asked(Hooks):
    """Asks the sweep's scheduler, after each epoch, whether the trial goes on."""

    def __init__(self, ask):
        self.ask = ask

    def should_stop(self, result, state):
        if result.validation_accuracy is None:
            return None
        return self.ask(result.epoch, result.validation_accuracy)


def run_trial(config: dict, uri: str, parent_id: str, number: int, resume_id: str | None, ask=None,
              hooks: tuple[Hooks, ...] = ()) -> Outcome:
    """Train one trial as ``gradavg run`` would, its run a child of ``parent_id``."""
    from jobs.run import run_job

    started = time.perf_counter()
    tags = {PARENT_TAG: parent_id, TRIAL_TAG: str(number), "mlflow.source.name": SOURCE}
    try:
        run_job(build_config(config), uri, quiet=True, resume=resume_id, tags=tags,
                hooks=((_Asked(ask),) if ask else ()) + hooks)
    except KeyboardInterrupt:  # stopped: run_job ended the run KILLED
        return Outcome("KILLED", "stopped", time.perf_counter() - started)
    except Exception as e:  # a diverged trial, a failed worker, a lost store: the sweep goes on
        return Outcome("FAILED", one_line(e, 1000), time.perf_counter() - started)
    return Outcome("FINISHED", "", time.perf_counter() - started)


def _trial_process(config, uri, parent_id, number, resume_id, conn, scheduled) -> None:
    """A local trial's process: ends its run KILLED on SIGINT or a stop signal (a closed terminal's SIGHUP
    reaches it as well as the driver), and dies with the sweep's driver."""
    from jobs.run import STOP_SIGNALS

    for s in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(s, _interrupt_once)
    sys.unraisablehook = _quiet_interrupts  # an interrupt inside a finalizer is no traceback for the user
    _die_with_parent()

    def ask(epoch, accuracy):
        conn.send(("report", epoch, accuracy))
        return conn.recv()

    outcome = run_trial(config, uri, parent_id, number, resume_id, ask if scheduled else None,
                        hooks=(_StillInterrupted(),))
    try:
        conn.send(("done", outcome))
    except OSError:  # the driver is gone (killed): the run has ended all the same
        pass


def _interrupt_once(signum, frame):
    """The first SIGINT or stop signal interrupts the trial; later ones are ignored (the run is closing)."""
    from jobs.run import STOPPING

    if STOPPING.is_set():
        return
    STOPPING.set()
    raise KeyboardInterrupt


def _quiet_interrupts(unraisable) -> None:
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


class _StillInterrupted(Hooks):
    """An interrupt that arrived while Python ran a finalizer was swallowed there: raise it at the
    next epoch's end instead."""

    def on_epoch_end(self, result, state):
        from jobs.run import STOPPING

        if STOPPING.is_set():
            raise KeyboardInterrupt


def _die_with_parent() -> None:
    """SIGTERM this process when the process that started it dies, even by SIGKILL (Linux's prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalTrials:
    """Trials as new processes on this machine (spawned: nothing of the driver's state is shared)."""

    where = "this machine"

    def __init__(self, uri: str, parent_id: str, scheduler: SuccessiveHalving | None):
        self.uri, self.parent_id, self.scheduler = uri, parent_id, scheduler
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def capacity(self, threads: int) -> int:
        return max(1, (os.cpu_count() or 1) // threads)

    def run(self, trial: Trial, resume_id: str | None) -> Outcome:
        started = time.perf_counter()
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_trial_process, name=f"gradavg-trial-{trial.number}",
            args=(trial.config.to_dict(), self.uri, self.parent_id, trial.number, resume_id, theirs,
                  self.scheduler is not None))
        with self._lock:
            if self._stopping:  # the sweep is being stopped: start nothing more
                return Outcome("KILLED", "stopped before it started")
            process.start()
            self._processes[trial.number] = process
        theirs.close()
        outcome = None
        try:
            while outcome is None:
                message = ours.recv()
                if message[0] == "report":
                    with self._lock:
                        ours.send(self.scheduler.report(trial.number, message[1], message[2]))
                else:
                    outcome = message[1]
        except (EOFError, OSError):  # the process died without a word
            process.join()
            outcome = Outcome("FAILED", f"the trial's process died (exit code {process.exitcode})",
                              time.perf_counter() - started)
        process.join()
        with self._lock:
            self._processes.pop(trial.number, None)
        return outcome

    def stop(self) -> None:
        """SIGTERM every trial (each ends its run KILLED), then wait for them, then kill what is left."""
        with self._lock:
            self._stopping = True
            processes = list(self._processes.values())
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + CLEANUP_SECONDS
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def _ray_trial(config, uri, parent_id, number, resume_id, rungs) -> Outcome:
    """A trial as a Ray task: the same ``run_trial``; the scheduler is an actor every task can ask."""
    import ray

    if threading.current_thread() is threading.main_thread():  # Ray cancels a task by interrupting it (SIGINT)
        signal.signal(signal.SIGINT, _interrupt_once)
    ask = (lambda epoch, accuracy: ray.get(rungs.report.remote(number, epoch, accuracy))) if rungs else None
    return run_trial(config, uri, parent_id, number, resume_id, ask, hooks=(_StillInterrupted(),))


class RayTrials:
    """Trials as Ray tasks on the cluster this process is connected to (a submitted sweep's), each
    holding ``threads`` CPUs and a worker process of its own."""

    where = "the Ray cluster"

    def __init__(self, uri: str, parent_id: str, scheduler: SuccessiveHalving | None):
        import ray

        from cluster.driver import keeping_sigterm_handler  # and Ray's loopback and auth settings

        self._ray = ray
        if not ray.is_initialized():
            with keeping_sigterm_handler():  # a stopped sweep still ends its runs KILLED
                ray.init(logging_level="ERROR", log_to_driver=False)
        self.uri, self.parent_id = uri, parent_id
        self._task = ray.remote(max_retries=0, max_calls=1)(_ray_trial)
        # the scheduler goes to an actor with the records it has (a resumed sweep's, rebuilt from its runs)
        self._rungs = ray.remote(num_cpus=0)(_Rungs).remote(scheduler) if scheduler else None
        self._refs: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def capacity(self, threads: int) -> int:
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)) // threads)

    def run(self, trial: Trial, resume_id: str | None) -> Outcome:
        started = time.perf_counter()
        with self._lock:
            if self._stopping:  # the sweep is being stopped: start nothing more
                return Outcome("KILLED", "stopped before it started")
            ref = self._task.options(num_cpus=trial.config.threads, name=f"gradavg-trial-{trial.number}").remote(
                trial.config.to_dict(), self.uri, self.parent_id, trial.number, resume_id, self._rungs)
            self._refs[trial.number] = ref
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.TaskCancelledError:
            return Outcome("KILLED", "stopped", time.perf_counter() - started)
        except Exception as e:  # the worker died (out of memory, killed, its node lost)
            return Outcome("FAILED", f"the trial's Ray task failed ({reason(e)})", time.perf_counter() - started)
        finally:
            self._refs.pop(trial.number, None)

    def stop(self) -> None:
        """Interrupt every trial's task (each ends its run KILLED); kill those still running after."""
        with self._lock:
            self._stopping = True
            refs = list(self._refs.values())
        for ref in refs:
            self._ray.cancel(ref)
        _, running = self._ray.wait(refs, num_returns=len(refs), timeout=CLEANUP_SECONDS) if refs else ([], [])
        for ref in running:
            self._ray.cancel(ref, force=True)


class _Rungs:
    """The scheduler as a Ray actor: its records live in one place, however many nodes ask."""

    def __init__(self, scheduler: SuccessiveHalving):
        self.scheduler = scheduler

    def report(self, trial: int, epoch: int, accuracy: float) -> str | None:
        return self.scheduler.report(trial, epoch, accuracy)


# -- the driver

@dataclass
class SweepResult:
    parent_id: str
    uri: str
    rows: list[Row]
    best: Row | None


def start(plan: Plan, uri: str, driven_here: bool = True) -> str:
    """Open the sweep's parent run: the swept keys as params, the plan and base config as files. Unless
    ``driven_here``, the run is not claimed by this process (a submitted sweep's job drives it)."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking.context.registry import resolve_tags

    client = open_store(uri)
    keys = [a.key for a in plan.axes]
    try:
        experiment_id = experiment_id_of(client, plan.base.experiment)
        tags = {**run_tags(SOURCE, claim=driven_here), "sweep_keys": ", ".join(keys),
                "sweep_trials": str(len(plan.trials))}
        name = plan.base.run_name or f"sweep {' × '.join(keys)}"
        run = client.create_run(experiment_id, run_name=name[:250], tags=resolve_tags(tags))
        params = {**{a.key: a.text for a in plan.axes}, "trials": len(plan.trials), "scheduler": _scheduler_text(plan),
                  **({"samples": plan.samples} if plan.samples else {})}
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        client.log_text(run.info.run_id, json.dumps(plan.to_dict(), indent=1), PLAN_ARTIFACT)
        client.log_text(run.info.run_id, plan.base.to_yaml(), "config.yaml")
    except Exception as e:
        raise TrackingError(f"tracking store {uri} failed while opening the sweep's run ({reason(e)}); check the "
                            "store") from None
    return run.info.run_id


def _scheduler_text(plan: Plan) -> str:
    spec = plan.scheduler
    return f"asha (grace {spec['grace']}, reduction {spec['reduction']})" if spec.get("name") == "asha" else "none"


def load_plan(uri: str, parent_id: str, allow_pickle: bool = False) -> Plan:
    """A sweep's plan, from its parent run (``--resume PARENT_RUN_ID``). Its configs' ``allow_pickle`` is
    the resuming command's own (``--allow-pickle``), never the stored one: a store may not widen what a
    command does."""
    from jobs.store import _get_run

    client = open_store(uri, create=False)
    _get_run(client, parent_id, uri, "--resume")
    try:
        path = client.download_artifacts(parent_id, PLAN_ARTIFACT)
    except Exception:
        raise TrackingError(f"--resume {parent_id}: that run is not a sweep's (it holds no {PLAN_ARTIFACT}); a "
                            f"single run resumes with `gradavg run CONFIG --resume {parent_id}`") from None
    try:
        plan = Plan.from_dict(json.loads(Path(path).read_text()))
    except Exception as e:
        raise TrackingError(f"--resume {parent_id}: its {PLAN_ARTIFACT} cannot be read ({reason(e)})") from None
    return plan.with_allow_pickle(allow_pickle)


def check_data(plan: Plan) -> None:
    """Every trial's config against its data and this machine's memory, before anything runs."""
    from jobs.config import check_against_data
    from jobs.data import load_dataset
    from jobs.run import check_memory, check_shuffle

    loaded = {}
    for trial in plan.trials:
        cfg = trial.config
        check_memory(cfg)
        check_shuffle(cfg)
        split = (cfg.data, cfg.validation_size, cfg.test_size, cfg.allow_pickle)
        if split not in loaded:
            data = load_dataset(*split, rows=False)  # a sharded folder's manifest is enough here
            loaded[split] = (data.n_inputs, data.n_classes, data.max_label)
        check_against_data(cfg, *loaded[split])


def run_sweep(plan: Plan, uri: str, parent_id: str, at_once: int | None = None, on_ray: bool = False,
              register: str | None = None, stream: TextIO | None = None) -> SweepResult:
    """Run every trial of ``plan`` not yet FINISHED under the parent run, then log the sweep's results."""

    stream = stream or sys.stderr
    client = open_store(uri)
    parent = client.get_run(parent_id)
    children = latest_children(client, parent_id)
    if parent.info.status == "FINISHED" and all(
            children.get(t.number) is not None and children[t.number].info.status == "FINISHED" for t in plan.trials):
        stream.write(f"gradavg: sweep {parent_id} is already complete: every trial FINISHED\n")
        rows = [read_row(client, t, children[t.number]) for t in plan.trials]
        best_id = parent.data.tags.get("best_run_id")
        _register_once(client, uri, parent_id, register, best_id, stream)
        return SweepResult(parent_id, uri, rows, next((r for r in rows if r.run_id == best_id), None))
    claims.take(client, parent_id, f"sweep --resume {parent_id}")  # this process drives it now, and only this one
    try:
        pending = _pending(client, plan, children)
    except Exception as e:  # nothing was deleted: the sweep is as it was, for a resume once the store answers
        try:
            client.set_terminated(parent_id, parent.info.status if parent.info.status != "RUNNING" else "KILLED")
        except Exception:
            pass
        raise TrackingError(f"tracking store {uri} failed while the sweep's trials were read ({reason(e)}); nothing "
                            f"was changed: run `gradavg sweep --resume {parent_id}` again when it answers") from None
    scheduler = scheduler_for(plan)
    if scheduler is not None:
        _restore(scheduler, client, children)
    runner = (RayTrials if on_ray else LocalTrials)(uri, parent_id, scheduler)
    at_once = min(at_once or runner.capacity(max(t.config.threads for t in plan.trials)), max(1, len(pending)))
    done = len(plan.trials) - len(pending)
    stream.write(f"gradavg: sweep {parent_id}: {len(plan.trials)} trials of {', '.join(a.key for a in plan.axes)}"
                 + (f" ({done} finished before, {len(pending)} to run)" if done else "")
                 + (f", {at_once} at a time on {runner.where}\n" if pending else "; logging its results\n"))
    stream.flush()
    outcomes, settled = _run_trials(runner, pending, at_once, client, parent_id, len(plan.trials), stream)
    try:
        return _finish(client, uri, plan, parent_id, outcomes, settled, register, stream)
    except TrackingError:
        raise
    except Exception as e:
        from jobs.tracking import TrackingLostError

        try:  # one bounded try: a parent left RUNNING would look driven
            client.set_terminated(parent_id, "FAILED")
        except Exception:
            pass

        raise TrackingLostError(f"the tracking store {uri} failed while the sweep's results were logged "
                                f"({reason(e)}); each trial's run holds its own; when the store answers again, "
                                f"`gradavg sweep --resume {parent_id}` logs the sweep's table and plots") from None


def _run_trials(runner, pending, at_once, client, parent_id, total, stream) -> tuple[dict[int, Outcome],
                                                                                   dict[int, Row]]:
    """Each trial's outcome, and its row as read back from its ended run (where the store answered)."""
    outcomes: dict[int, Outcome] = {}
    settled: dict[int, Row] = {}
    pool = ThreadPoolExecutor(at_once, thread_name_prefix="gradavg-sweep")
    futures = {pool.submit(runner.run, trial, resume_id): trial for trial, resume_id in pending}
    beaten = time.monotonic()
    try:
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, timeout=0.5, return_when=FIRST_COMPLETED)
            if time.monotonic() - beaten >= claims.HEARTBEAT_SECONDS:  # the driver's claim of the parent run
                beaten = time.monotonic()
                try:
                    claims.heartbeat(client, parent_id)
                except Exception:  # the store is away: the trials go on, and the sweep's end says so
                    pass
            for future in finished:
                trial = futures[future]
                try:
                    outcome = future.result()
                except Exception as e:  # the runner itself failed: the trial did not run to its end
                    outcome = Outcome("FAILED", reason(e))
                outcomes[trial.number] = outcome
                try:
                    row = settled[trial.number] = _settle_trial(client, parent_id, trial, outcome)
                except Exception:  # the store stopped answering: the sweep's end says so; the trials go on
                    row = Row(trial, outcome.status, cause=outcome.cause)
                stream.write(f"trial {trial.number}/{total} ({trial.label}): {_describe(row)} "
                             f"({outcome.seconds:.1f} s)\n")
                stream.flush()
    except KeyboardInterrupt:
        stream.write("gradavg: stopping the sweep: its running trials end KILLED ...\n")
        stream.flush()
        for future in futures:
            future.cancel()
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        try:
            _end_killed(client, parent_id)
        except Exception:  # the store is gone too: `gradavg runs repair` settles the runs once it answers
            pass
        raise
    pool.shutdown()
    return outcomes, settled


def _end_killed(client, parent_id: str) -> None:
    """The sweep was stopped: no run of it is left RUNNING."""
    for child in _children(client, parent_id):
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "KILLED")
    client.set_terminated(parent_id, "KILLED")


def _children(client, parent_id: str) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=50000, order_by=["attributes.start_time ASC"])


def latest_children(client, parent_id: str) -> dict[int, Any]:
    """Each trial's child run (the latest, where a trial started over), by trial number."""
    return {int(run.data.tags[TRIAL_TAG]): run for run in _children(client, parent_id)
            if run.data.tags.get(TRIAL_TAG, "").isdigit()}


def _pending(client, plan: Plan, children: dict[int, Any]) -> list[tuple[Trial, str | None]]:
    """The trials to run, each with the child run it resumes (None: it starts over). A child stopped before
    its first checkpoint is deleted, for a new run to take its place (one child a trial); that is decided only
    on a listing of its artifacts that succeeded: a store that fails raises, and nothing is deleted."""
    pending = []
    for trial in plan.trials:
        child = children.get(trial.number)
        if child is not None and child.info.status == "FINISHED":
            continue
        resume_id = child.info.run_id if child is not None and _has_checkpoint(client, child.info.run_id) else None
        if child is not None and resume_id is None:
            client.delete_run(child.info.run_id)
        pending.append((trial, resume_id))
    return pending


def _has_checkpoint(client, run_id: str) -> bool:
    """Whether the store holds the run's checkpoint; an error of the store's is raised, never taken for no."""
    return any(f.path.endswith("checkpoint.npz") for f in client.list_artifacts(run_id, "checkpoints"))


def _restore(scheduler: SuccessiveHalving, client, children: dict[int, Any]) -> None:
    """A resumed sweep's scheduler starts from what its trials recorded at each rung."""
    for number, child in children.items():
        for m in client.get_metric_history(child.info.run_id, "accuracy/validation"):
            if m.step in scheduler.rungs:
                scheduler.rungs[m.step][number] = m.value


def _settle_trial(client, parent_id: str, trial: Trial, outcome: Outcome) -> Row:
    """The trial's child run ends as its process did (a process killed outright could not say), with
    the cause of a failure as a tag; its row of the table, read back from the run."""
    child = latest_children(client, parent_id).get(trial.number)
    if child is not None and outcome.status != "FINISHED":
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, outcome.status)
        if outcome.status == "FAILED":
            client.set_tag(child.info.run_id, "failure", outcome.cause[:4000])
        child = client.get_run(child.info.run_id)
    return read_row(client, trial, child, outcome)


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
        cause = outcome.cause if outcome is not None and outcome.status == "FAILED" else tags.get("failure", "")
    return Row(trial, child.info.status, run_id, best_accuracy, best_epoch, costs[-1][1] if costs else None,
               costs[-1][0] if costs else 0, tags.get("stopped_reason", ""), cause, curves)


def _describe(row: Row) -> str:
    if row.status != "FINISHED":
        return row.status + (f": {row.cause}" if row.cause else "")
    best = (f", best validation accuracy {100 * row.best_accuracy:.2f}% at epoch {row.best_epoch}"
            if row.best_accuracy is not None else "")
    stopped = f"; stopped: {row.stopped}" if row.stopped else ""
    return f"FINISHED after {row.epochs} epochs{best}{stopped}"


def _finish(client, uri: str, plan: Plan, parent_id: str, outcomes: dict[int, Outcome], settled: dict[int, Row],
            register: str | None, stream: TextIO) -> SweepResult:
    """Every trial has ended: the table, the plots and the best trial go to the parent run, which ends
    FINISHED (a failed trial is a row of the table, not the sweep's failure)."""
    from mlflow.entities import Metric, RunTag

    children = latest_children(client, parent_id)
    rows = [settled.get(t.number) or read_row(client, t, children.get(t.number), outcomes.get(t.number))
            for t in plan.trials]
    best = max((r for r in rows if r.status == "FINISHED" and r.best_accuracy is not None),
               key=lambda r: (r.best_accuracy, -r.trial.number), default=None)
    with tempfile.TemporaryDirectory(prefix="gradavg-sweep-") as folder:
        (Path(folder) / "trials.csv").write_text(table_csv(plan, rows))
        _plots(plan, rows, Path(folder) / "plots")
        client.log_artifacts(parent_id, folder)
    counts = {s: sum(r.status == s for r in rows) for s in ("FINISHED", "FAILED", "KILLED")}
    tags = {"sweep_finished": str(counts["FINISHED"]), "sweep_failed": str(counts["FAILED"])}
    metrics = []
    if best is not None:
        tags.update({"best_run_id": best.run_id, "best_trial": str(best.trial.number),
                     **{f"best.{k}": show(v) for k, v in best.trial.values.items()}})
        metrics.append(Metric("best_validation_accuracy", best.best_accuracy, int(time.time() * 1000), 0))
    client.log_batch(parent_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
    _register_once(client, uri, parent_id, register, best.run_id if best else None, stream)
    client.set_terminated(parent_id, "FINISHED")
    return SweepResult(parent_id, uri, rows, best)


def _register_once(client, uri: str, parent_id: str, name: str | None, best_id: str | None, stream) -> None:
    """``--register NAME``: the best trial's model, once a sweep (a resumed sweep's may be registered already)."""
    parent = client.get_run(parent_id)
    registered = parent.data.tags.get("registered_model")
    if registered:
        if name:
            stream.write(f"gradavg: the best trial's model is registered already, as {registered}\n")
        return
    if not name or best_id is None:
        return
    version = register_best(client, uri, name, best_id)
    client.set_tag(parent_id, "registered_model", f"models:/{name}/{version}")
    number = parent.data.tags.get("best_trial") or client.get_run(best_id).data.tags.get(TRIAL_TAG)
    stream.write(f"gradavg: registered trial {number}'s model as models:/{name}/{version}\n")


def register_best(client, uri: str, name: str, run_id: str) -> str:
    """Register the best trial's logged model under ``name``; return the new version."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    ready = [m for m in logged_models(uri, client.get_run(run_id).info.experiment_id, run_id)
             if m.status == LoggedModelStatus.READY]
    if not ready:
        raise TrackingError(f"--register {name}: the best trial's run {run_id} has no model to register")
    with process_uri(uri):  # models:/ URIs are resolved in the process's store
        return str(mlflow.register_model(f"models:/{ready[0].model_id}", name).version)


COLUMNS = ("status", "best_validation_accuracy", "best_epoch", "epochs", "final_train_cost", "stopped", "cause",
           "run_id")


def table_csv(plan: Plan, rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *(a.key for a in plan.axes), *COLUMNS])
    for r in rows:
        writer.writerow([r.trial.number, *(show(r.trial.values[a.key]) for a in plan.axes), r.status,
                         "" if r.best_accuracy is None else f"{r.best_accuracy:.6f}", r.best_epoch or "", r.epochs,
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
                      "" if r.best_accuracy is None else f"{100 * r.best_accuracy:.2f}%", str(r.best_epoch or ""),
                      "" if r.final_train_cost is None else f"{r.final_train_cost:.4f}", r.run_id])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    if any(r.stopped for r in rows):
        text += "\n* stopped early (the run's stopped_reason tag says why)"
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
        scale = 100 if metric.startswith("accuracy") else 1
        series = {f"{r.trial.number}: {r.trial.label}": [(e, scale * v) for e, v in r.curves.get(metric, [])]
                  for r in rows if r.curves.get(metric)}
        plots.overlaid(series, ylabel, folder / f"{name}.png")


def best_line(result: SweepResult) -> str:
    best = result.best
    if best is None:
        return f"no trial finished; the sweep's run {result.parent_id} in {result.uri} holds the table"
    return (f"best: trial {best.trial.number} ({best.trial.label}), validation accuracy "
            f"{100 * best.best_accuracy:.2f}% at epoch {best.best_epoch}, run {best.run_id}")

