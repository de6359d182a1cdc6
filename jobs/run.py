"""One training job from a resolved config: data, backend, tracking, the loop, the results."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from cluster.errors import WorkerFailuresError
from jobs.backends import make_backend
from jobs.config import ConfigError, JobConfig, check_against_data, result_changes
from jobs.data import Dataset, load_dataset
from jobs.progress import HookChain, Progress
from jobs.train import TrainingState, initial_state, train, training_inputs


@dataclass
class JobResult:
    state: TrainingState
    data: Dataset
    run_id: str | None
    tracking_uri: str | None
    seconds: float


def prepare_data(cfg: JobConfig) -> Dataset:
    """Load the data and check the config against it: every mistake surfaces before training."""
    data = load_dataset(cfg.data, cfg.validation_size, cfg.test_size, cfg.allow_pickle)
    max_label = int(max(data.y_train.max(initial=0), data.y_test.max(initial=0)))
    check_against_data(cfg, data.n_inputs, data.n_classes, max_label)
    return data


def run_job(cfg: JobConfig, tracking_uri: str | None = None, stream: TextIO | None = None, quiet: bool = False,
            resume: str | None = None, force: bool = False) -> JobResult:
    """Train and track one job. Every check that can fail runs before the MLflow run is opened
    (or reopened): the config, the data, the tracking server, the checkpoint, the cluster."""
    stream = stream or sys.stderr
    started = time.perf_counter()
    data = prepare_data(cfg)
    state, tracker, previous = initial_state(cfg), None, None
    if cfg.track or resume:
        from jobs.tracking import RunTracker, check_reachable, fetch_checkpoint, resolve_uri

        tracking_uri = resolve_uri(tracking_uri)
        check_reachable(tracking_uri)
        if resume:
            previous, state, saved_cfg = fetch_checkpoint(tracking_uri, resume)
            _check_resumable(resume, previous, saved_cfg, cfg, data, force)
    progress = Progress(cfg.epochs, stream, quiet)
    hooks = HookChain(progress)
    backend = make_backend(cfg, on_failure=lambda text: hooks.on_worker_failure(backend.failures, text))
    backend.start(state.network, training_inputs(data, state.network), data.y_train)
    status = "FAILED"
    try:
        if cfg.track or resume:
            tracker = RunTracker(cfg, tracking_uri, backend.tags)
            if resume:
                tracker.resume(resume, int(previous.data.tags.get("resumed", "0")) + 1)
            else:
                tracker.start(data)
            hooks.hooks.append(tracker)
        state = train(cfg, data, backend, state=state, hooks=hooks, backend_started=True)
        if tracker:
            tracker.tag_backend(backend.tags)
            tracker.log_results(state, data)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM from a stopped job
        status = "KILLED"
        raise
    except WorkerFailuresError as e:
        if tracker and tracker.run_id:
            raise WorkerFailuresError(f"{e}; the last checkpoint is saved: continue with `gradavg run CONFIG "
                                      f"--resume {tracker.run_id}`") from None
        raise
    finally:
        backend.close()
        if tracker:
            tracker.end(status)
    return JobResult(state, data, tracker.run_id if tracker else None, tracking_uri, time.perf_counter() - started)


def _check_resumable(run_id: str, run, saved: JobConfig, cfg: JobConfig, data: Dataset, force: bool) -> None:
    changes = result_changes(saved, cfg)
    digest = run.data.tags.get("dataset_digest")
    if digest and digest != data.digest:
        changes.append(f"the contents of data={cfg.data} (sha256 {digest[:12]}… -> {data.digest[:12]}…)")
    if changes and not force:
        raise ConfigError(f"--resume {run_id}: this config changes what the run computes ({'; '.join(changes)}); "
                          "use the run's own values, or pass --force to continue anyway")
