"""One training job from a resolved config: data, backend, tracking, the loop, the results."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from jobs.backends import make_backend
from jobs.config import JobConfig, check_against_data
from jobs.data import Dataset, load_dataset
from jobs.progress import HookChain, Progress
from jobs.train import TrainingState, train


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


def run_job(cfg: JobConfig, tracking_uri: str | None = None, stream: TextIO | None = None,
            quiet: bool = False) -> JobResult:
    stream = stream or sys.stderr
    started = time.perf_counter()
    data = prepare_data(cfg)
    backend = make_backend(cfg)
    tracker = None
    if cfg.track:
        from jobs.tracking import RunTracker, check_reachable, resolve_uri

        tracking_uri = resolve_uri(tracking_uri)
        check_reachable(tracking_uri)
        tracker = RunTracker(cfg, tracking_uri, backend.name, backend.workers)
    progress = Progress(cfg.epochs, stream, quiet)
    status = "FAILED"
    try:
        if tracker:
            tracker.start(data)
        state = train(cfg, data, backend, hooks=HookChain(progress, tracker))
        if tracker:
            tracker.log_results(state, data)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM from a stopped job
        status = "KILLED"
        raise
    finally:
        if tracker:
            tracker.end(status)
    return JobResult(state, data, tracker.run_id if tracker else None, tracking_uri,
                     time.perf_counter() - started)
