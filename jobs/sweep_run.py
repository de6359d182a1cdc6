"""A sweep's driver and its parent run's life: one MLflow parent run, one child run per trial, each
opened, reopened and closed through ``jobs.runs``.

``start`` opens the parent run; ``run_sweep`` hands out the trials not yet FINISHED, at most
``at_once`` at a time, to processes on this machine or Ray tasks (``jobs.trials``), settles each
trial's run as its process ended, and, when every trial has ended, logs the sweep's report
(``jobs.sweep_report``: the table of trials, the plots and the best trial) and ends the parent run.
A stopped sweep ends its runs KILLED.

The plan is the parent's ``sweep/plan.json``: a sweep resumed (``--resume PARENT_RUN_ID``) runs
the trials that did not finish, each from its own last checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TextIO

from jobs import claims, runs
from jobs.errors import reason
from jobs.stopping import Interrupted, interrupts_deferred, no_interrupts
from jobs.store import TrackingError, open_store
from jobs.sweep import Plan, SuccessiveHalving, Trial, scheduler_for
from jobs.sweep_report import Row, SweepResult, best_of, describe, log_report, read_row, register_once
from jobs.trials import LocalTrials, Outcome, RayTrials

PLAN_ARTIFACT = "sweep/plan.json"


def start(plan: Plan, uri: str, driven_here: bool = True, register: str | None = None) -> str:
    """Open the sweep's parent run: the swept keys as params, the plan and base config as files (and the name it
    is to ``register`` its best model as, which its continue commands repeat). Unless
    ``driven_here``, the run is not claimed by this process (a submitted sweep's job drives it). Stopped while
    it opens the run, it ends the run KILLED."""
    client = open_store(uri)
    run_id = None
    try:
        with interrupts_deferred():  # opened whole, so that it is known, and closed if stopped
            run_id = _open(plan, uri, client, driven_here, register)
    except KeyboardInterrupt:
        if run_id is None:
            raise
        with no_interrupts():
            runs.try_close(client, run_id, "KILLED")
        if not driven_here:
            raise
        raise Interrupted(f"sweep {run_id} ended KILLED before its first trial; continue it: "
                          f"{runs.continue_command(run_id, uri, sweep=True, register=register)}") from None
    return run_id


def _open(plan: Plan, uri: str, client, driven_here: bool, register: str | None) -> str:
    keys = [a.key for a in plan.axes]
    try:
        tags = {**runs.run_tags(runs.FROM_SWEEP, claims.driver_tags(claim=driven_here)),
                runs.SWEEP_KEYS: ", ".join(keys), runs.SWEEP_TRIALS: str(len(plan.trials)),
                **({runs.REGISTER_AS: register} if register else {})}
        name = f"{plan.base.run_name or ''} sweep of {', '.join(keys)}".strip()
        params = {**{a.key: a.text for a in plan.axes}, "trials": len(plan.trials), "scheduler": _scheduler_text(plan),
                  **({"samples": plan.samples} if plan.samples else {})}
        run_id, _ = runs.open_run(client, plan.base.experiment, name[:250], tags,
                                  {k: str(v)[:6000] for k, v in params.items()})
    except Exception as e:
        raise _not_opened(uri, e) from None
    try:
        client.log_text(run_id, json.dumps(plan.to_dict(), indent=1), PLAN_ARTIFACT)
        client.log_text(run_id, plan.base.to_yaml(), "config.yaml")
    except Exception as e:
        runs.try_close(client, run_id, "FAILED")  # no sweep without its plan
        raise _not_opened(uri, e) from None
    return run_id


def _not_opened(uri: str, e: Exception) -> TrackingError:
    return TrackingError(f"tracking store {uri} failed while opening the sweep's run ({reason(e)}); check the store")


def _scheduler_text(plan: Plan) -> str:
    spec = plan.scheduler
    return f"asha (grace {spec['grace']}, reduction {spec['reduction']})" if spec.get("name") == "asha" else "none"


def load_plan(uri: str, parent_id: str, allow_pickle: bool = False) -> Plan:
    """A sweep's plan, from its parent run (``--resume PARENT_RUN_ID``). Its configs' ``allow_pickle`` is
    the resuming command's own (``--allow-pickle``), never the stored one: a store may not widen what a
    command does."""
    client = open_store(uri, create=False)
    runs.get_run(client, parent_id, uri, "--resume")
    try:
        path = client.download_artifacts(parent_id, PLAN_ARTIFACT)
    except Exception:
        raise TrackingError(f"--resume {parent_id}: that run is not a sweep's (it holds no {PLAN_ARTIFACT}); a "
                            f"single run resumes with `{runs.continue_command(parent_id, uri)}`") from None
    try:
        plan = Plan.from_dict(json.loads(Path(path).read_text()))
    except Exception as e:
        raise TrackingError(f"--resume {parent_id}: its {PLAN_ARTIFACT} cannot be read ({reason(e)})") from None
    return plan.with_allow_pickle(allow_pickle)


def check_data(plan: Plan) -> None:
    """Every trial's config against its data and this machine's memory, before anything runs: as a job
    checks its own (``jobs.run.prepare_data``), a sharded folder's manifest being enough here. Data that
    several trials share is loaded once, and only what the checks need of it is kept."""
    from jobs.config import check_against_data
    from jobs.run import check_memory, check_shuffle, prepare_data

    shapes = {}
    for trial in plan.trials:
        cfg = trial.config
        split = (cfg.data, cfg.validation_size, cfg.test_size, cfg.allow_pickle)
        if split not in shapes:
            data = prepare_data(cfg, rows=False)
            shapes[split] = (data.n_inputs, data.n_classes, data.max_label)
        else:  # an earlier trial's data: the same checks, without loading it again
            check_memory(cfg)
            check_shuffle(cfg)
            check_against_data(cfg, *shapes[split])


def run_sweep(plan: Plan, uri: str, parent_id: str, at_once: int | None = None, on_ray: bool = False,
              register: str | None = None, stream: TextIO | None = None, claimed: bool = False) -> SweepResult:
    """Run every trial of ``plan`` not yet FINISHED under the parent run, then log the sweep's results.
    ``claimed``: this process opened the parent run, claimed as it was (``start``). Stopped (Ctrl-C, a stop
    signal) once it holds the parent's claim, it ends the parent and its running trials KILLED and raises
    ``Interrupted`` with the command that continues the sweep."""
    stream = stream or sys.stderr
    client = None
    try:
        client = open_store(uri)
        parent = client.get_run(parent_id)
        children = latest_children(client, parent_id)
        if parent.info.status == "FINISHED" and all(children.get(t.number) is not None and
                                                    children[t.number].info.status == "FINISHED" for t in plan.trials):
            stream.write(f"gradavg: sweep {parent_id} is already complete: every trial FINISHED\n")
            rows = [read_row(client, t, children[t.number]) for t in plan.trials]
            best_id = parent.data.tags.get(runs.BEST_RUN_ID)
            register_once(client, uri, parent_id, register, best_id, stream)
            return SweepResult(parent_id, uri, rows, next((r for r in rows if r.run_id == best_id), None),
                               parent.info.experiment_id)
        with interrupts_deferred():  # claimed whole, so that a stop closes what it claimed
            claims.take(client, parent_id, f"sweep --resume {parent_id}")  # this process drives it, and only this
            claimed = True
        return _drive(plan, uri, parent_id, parent, children, client, at_once, on_ray, register, stream)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted) or client is None or not claimed:
            raise
        with no_interrupts():
            try:
                _end_killed(client, parent_id)
            except Exception:  # the store is gone too: `gradavg runs repair` settles the runs once it answers
                pass
        raise Interrupted(f"sweep {parent_id} ended KILLED; continue it (its finished trials are kept, the others "
                          f"resume from their checkpoints): "
                          f"{runs.continue_command(parent_id, uri, sweep=True, register=register)}") \
            from None


def _drive(plan: Plan, uri: str, parent_id: str, parent, children: dict[int, Any], client, at_once: int | None,
           on_ray: bool, register: str | None, stream: TextIO) -> SweepResult:
    """The trials of a claimed sweep, then its results."""
    try:
        pending = _pending(client, plan, children)
    except Exception as e:  # nothing was deleted: the sweep is as it was, for a resume once the store answers
        runs.try_close(client, parent_id, parent.info.status if parent.info.status != "RUNNING" else "KILLED")
        again = runs.continue_command(parent_id, uri, sweep=True, register=register)
        raise TrackingError(f"tracking store {uri} failed while the sweep's trials were read ({reason(e)}); nothing "
                            f"was changed: run `{again}` again when it answers") from None
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
    outcomes, settled = _run_trials(runner, pending, at_once, client, uri, parent_id, len(plan.trials), stream)
    try:
        return _finish(client, uri, plan, parent_id, outcomes, settled, register, stream)
    except TrackingError:
        raise
    except Exception as e:
        from jobs.tracking import TrackingLostError

        runs.try_close(client, parent_id, "FAILED")  # a parent left RUNNING would look driven
        again = runs.continue_command(parent_id, uri, sweep=True, register=register)
        raise TrackingLostError(f"the tracking store {uri} failed while the sweep's results were logged "
                                f"({reason(e)}); each trial's run holds its own; when the store answers again, "
                                f"`{again}` logs the sweep's table and plots") from None


def _run_trials(runner, pending, at_once, client, uri, parent_id, total, stream) -> tuple[dict[int, Outcome],
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
                    runs.renew_claim(client, parent_id)
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
                stream.write(f"trial {trial.number}/{total} ({trial.label}): {describe(row)} "
                             f"({outcome.seconds:.1f} s)\n")
                stream.flush()
    except KeyboardInterrupt:
        stream.write("gradavg: stopping the sweep: its running trials end KILLED ...\n")
        stream.flush()
        for future in futures:
            future.cancel()
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise  # run_sweep ends the runs KILLED
    pool.shutdown()
    return outcomes, settled


def _end_killed(client, parent_id: str) -> None:
    """The sweep was stopped: no run of it is left RUNNING."""
    for child in _children(client, parent_id):
        if child.info.status == "RUNNING":
            runs.close(client, child.info.run_id, "KILLED")
    runs.close(client, parent_id, "KILLED")


def _children(client, parent_id: str) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`{runs.PARENT}` = '{parent_id}'",
                              max_results=50000, order_by=["attributes.start_time ASC"])


def latest_children(client, parent_id: str) -> dict[int, Any]:
    """Each trial's child run (the latest, where a trial started over), by trial number."""
    return {int(run.data.tags[runs.TRIAL]): run for run in _children(client, parent_id)
            if run.data.tags.get(runs.TRIAL, "").isdigit()}


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
            runs.delete(client, child.info.run_id)
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
            runs.close(client, child.info.run_id, outcome.status)
        if outcome.status == "FAILED":
            runs.set_tag(client, child.info.run_id, runs.FAILURE, outcome.cause[:4000])
        child = client.get_run(child.info.run_id)
    return read_row(client, trial, child, outcome)


def _finish(client, uri: str, plan: Plan, parent_id: str, outcomes: dict[int, Outcome], settled: dict[int, Row],
            register: str | None, stream: TextIO) -> SweepResult:
    """Every trial has ended: the table, the plots and the best trial go to the parent run, which ends
    FINISHED (a failed trial is a row of the table, not the sweep's failure)."""
    children = latest_children(client, parent_id)
    rows = [settled.get(t.number) or read_row(client, t, children.get(t.number), outcomes.get(t.number))
            for t in plan.trials]
    best = best_of(rows)
    log_report(client, plan, parent_id, rows, best)
    register_once(client, uri, parent_id, register, best.run_id if best else None, stream)
    runs.close(client, parent_id, "FINISHED")
    return SweepResult(parent_id, uri, rows, best, client.get_run(parent_id).info.experiment_id)
