"""Running a sweep's trials: each is ``jobs.run.run_job`` of its config in a process of its own (a new
process on this machine, ``LocalTrials``, or a Ray task on the cluster a submitted sweep runs on,
``RayTrials``), so it computes and logs what ``gradavg run`` would, tagged with its parent
(``mlflow.parentRunId``), its number and its source (``gradavg sweep``). A trial asks the sweep's
scheduler, after each epoch, whether it goes on; a stopped sweep stops its trials, and each ends
its run KILLED.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from jobs import runs
from jobs.config import build_config
from jobs.errors import one_line, reason
from jobs.stopping import stop_once_on_signals
from jobs.sweep import SuccessiveHalving, Trial
from jobs.text import percent
from jobs.train import Hooks

CLEANUP_SECONDS = 20  # how long stopped trials get to close their runs before they are killed


@dataclass
class Outcome:
    """How a trial's process ended: FINISHED, FAILED (``cause`` says why) or KILLED."""

    status: str
    cause: str = ""
    seconds: float = 0.0


# -- one trial, in the process it runs in

class _Asked(Hooks):
    """Asks the sweep's scheduler, after each epoch, whether the trial goes on."""

    def __init__(self, ask):
        self.ask = ask

    def should_stop(self, result, state):
        if result.validation_accuracy is None:
            return None
        return self.ask(result.epoch, percent(result.validation_accuracy))  # as logged: a resumed sweep's rungs


def run_trial(config: dict, uri: str, parent_id: str, number: int, resume_id: str | None, ask=None,
              hooks: tuple[Hooks, ...] = ()) -> Outcome:
    """Train one trial as ``gradavg run`` would, its run a child of ``parent_id``."""
    from jobs.run import run_job

    started = time.perf_counter()
    tags = {runs.PARENT: parent_id, runs.TRIAL: str(number)}
    try:
        run_job(build_config(config), uri, quiet=True, resume=resume_id, tags=tags,
                hooks=((_Asked(ask),) if ask else ()) + hooks, source=runs.FROM_SWEEP)
    except KeyboardInterrupt:  # stopped: run_job ended the run KILLED
        return Outcome("KILLED", "stopped", time.perf_counter() - started)
    except Exception as e:  # a diverged trial, a failed worker, a lost store: the sweep goes on
        return Outcome("FAILED", one_line(e, 1000), time.perf_counter() - started)
    return Outcome("FINISHED", "", time.perf_counter() - started)


def _trial_process(config, uri, parent_id, number, resume_id, conn, scheduled) -> None:
    """A local trial's process: ends its run KILLED on SIGINT or a stop signal (a closed terminal's SIGHUP
    reaches it as well as the driver), and dies with the sweep's driver."""
    stop_once_on_signals()
    _die_with_parent()

    def ask(epoch, accuracy):
        conn.send(("report", epoch, accuracy))
        return conn.recv()

    outcome = run_trial(config, uri, parent_id, number, resume_id, ask if scheduled else None)
    try:
        conn.send(("done", outcome))
    except OSError:  # the driver is gone (killed): the run has ended all the same
        pass


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
        stop_once_on_signals((signal.SIGINT,), as_started=False)  # even where Ray was started with it ignored
    ask = (lambda epoch, accuracy: ray.get(rungs.report.remote(number, epoch, accuracy))) if rungs else None
    return run_trial(config, uri, parent_id, number, resume_id, ask)


class RayTrials:
    """Trials as Ray tasks on the cluster this process is connected to (a submitted sweep's), each
    holding ``threads`` CPUs and a worker process of its own."""

    where = "the Ray cluster"

    def __init__(self, uri: str, parent_id: str, scheduler: SuccessiveHalving | None):
        import ray

        from cluster.connect import keeping_sigterm_handler  # (which puts Ray's settings in the environment)

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
