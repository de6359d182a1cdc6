"""One training job from a resolved config: data, backend, tracking, the loop, the results."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from cluster.errors import WorkerFailuresError
from core.kernels import cached as kernels_cached
from core.network import parameter_count
from core.step import batch_count, piece_count
from jobs import runs
from jobs.backends import make_backend
from jobs.claims import refuse_if_driven
from jobs.config import ConfigError, JobConfig, check_against_data, result_changes
from jobs.data import Dataset, load_dataset
from jobs.progress import HookChain, Progress
from jobs.shards import is_sharded
from jobs.stopping import STOPPING, Interrupted, interrupts_deferred, no_interrupts, raise_if_stopping
from jobs.store import TrackingError
from jobs.text import accuracies, plural
from jobs.train import Hooks, TrainingState, initial_state, start_backend, train


@dataclass
class JobResult:
    state: TrainingState
    data: Dataset
    run_id: str | None
    tracking_uri: str | None
    seconds: float
    already_complete: bool = False  # --resume of a run that had finished: nothing was done
    experiment_id: str | None = None


def prepare_data(cfg: JobConfig, rows: bool | None = None) -> Dataset:
    """Load the data and check the config against it: every mistake surfaces before training. ``rows``:
    whether a sharded dataset's rows are read (default: not by a Ray driver, which reads its manifest, never
    its rows: the workers read their blocks)."""
    check_memory(cfg)
    check_shuffle(cfg)
    data = load_dataset(cfg.data, cfg.validation_size, cfg.test_size, cfg.allow_pickle,
                        rows=cfg.backend != "ray" if rows is None else rows)
    check_against_data(cfg, data.n_inputs, data.n_classes, data.max_label)
    return data


def check_shuffle(cfg: JobConfig) -> None:
    """shuffle=blocks needs a sharded dataset: refused before a large source is read whole (sharding it
    here would put every row in this process, which the blocks exist to avoid)."""
    from jobs.data import BUNDLED

    named = cfg.data in BUNDLED or cfg.data.startswith("synthetic:")
    if cfg.shuffle == "blocks" and (named or os.path.exists(cfg.data)) and not is_sharded(cfg.data):
        raise ConfigError(f"shuffle=blocks orders an epoch by the blocks of a sharded dataset, and data={cfg.data} "
                          f"is none; shard it first (`gradavg data shard {cfg.data} FOLDER`, then data=FOLDER), or "
                          "use shuffle=global")


def memory_needed(cfg: JobConfig) -> int:
    """Bytes a job's network takes, roughly: the weights drawn in float64 and kept in the job's dtype,
    a chunk sum per mini-batch chunk and per thread, and each thread's activations."""
    params = parameter_count(cfg.sizes)
    itemsize = np.dtype(cfg.dtype).itemsize
    threads = max(cfg.threads or os.cpu_count() or 1, cfg.workers)
    chunks = piece_count(cfg.batch_size, cfg.chunk_size)
    rows = min(cfg.chunk_size, cfg.batch_size)
    return 3 * params * 8 + (chunks + threads + 2) * params * itemsize + 3 * threads * rows * sum(cfg.sizes) * itemsize


def check_memory(cfg: JobConfig) -> None:
    """Refuse a network this machine cannot hold, before anything is allocated."""
    needed, available = memory_needed(cfg), available_memory()
    if available is not None and needed > available:
        raise ConfigError(f"sizes={list(cfg.sizes)}: a network of {parameter_count(cfg.sizes):,} parameters needs "
                          f"about {_gib(needed)} of memory for its weights and buffers, but this machine has "
                          f"{_gib(available)} available; use smaller layers")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def run_job(cfg: JobConfig, tracking_uri: str | None = None, stream: TextIO | None = None, quiet: bool = False,
            resume: str | None = None, force: bool = False, tags: dict[str, str] | None = None,
            hooks: tuple[Hooks, ...] = (), source: str = runs.FROM_RUN) -> JobResult:
    """Train and track one job. Every check that can fail runs before the MLflow run is opened
    (or reopened): the config, the data, the tracking store, the checkpoint, the cluster. A sweep's
    trial adds ``tags`` to its new run (its parent and number), ``hooks`` to the loop (its scheduler's),
    and names itself as the run's ``source`` (``jobs.runs.FROM_SWEEP``)."""
    stream = stream or sys.stderr
    progress = Progress(cfg.epochs, stream, quiet)
    started = time.perf_counter()
    progress.stage(f"loading {cfg.data}")
    data = prepare_data(cfg)
    state, tracker, previous = initial_state(cfg), None, None
    if cfg.track or resume:
        from jobs import artifacts
        from jobs.store import resolve_uri
        from jobs.tracking import RunTracker

        tracking_uri = resolve_uri(tracking_uri)
        progress.stage(f"opening the MLflow store {tracking_uri}")
        if resume:
            previous, state, saved_cfg = runs.fetch_checkpoint(tracking_uri, resume)
            refuse_if_driven(previous, f"--resume {resume}")  # at once; RunTracker.resume claims it for good
            forced = _check_resumable(resume, previous, state, saved_cfg, cfg, data, force)
            if previous.info.status == "FINISHED" and (state.epoch >= cfg.epochs or state.stopped):
                return JobResult(state, data, resume, tracking_uri, time.perf_counter() - started, True,
                                 previous.info.experiment_id)
            progress.stage(f"resuming run {resume} ({previous.info.status}) from its checkpoint of epoch "
                           f"{state.epoch}, step {state.step}")
        tracker = RunTracker(cfg, tracking_uri, stream, tags, source)
    _note_idle_workers(cfg, progress)
    first_epoch = state.epoch
    hooks = HookChain(progress, _StoppedQuietly(), *hooks)
    status, interrupted = "FAILED", False
    try:
        backend = make_backend(cfg, on_failure=lambda text: hooks.on_worker_failure(backend.failures, text))
        progress.stage("starting the backend" + ("" if kernels_cached() else "; compiling the training kernels "
                                                 "(the first run only, they are cached after)"))
        start_backend(backend, cfg, data, state.network)
        confusion = None
        try:
            with interrupts_deferred():  # the run is opened whole, so that the tracker can close it
                if tracker and resume:
                    tracker.resume(resume, int(previous.data.tags.get(runs.RESUMED, "0")) + 1, state.epoch,
                                   backend.tags, saved_cfg, forced)
                elif tracker:
                    tracker.start(data, backend.tags)
            hooks.hooks.extend([tracker] if tracker else [])
            state = train(cfg, data, backend, state=state, hooks=hooks, backend_started=True)
            if tracker and data.shards is not None:  # the test set's confusion counts, from where its blocks are
                confusion = backend.evaluate(state.kept(cfg), "test")[2]
        finally:
            backend.close()
        if tracker:
            progress.stage("logging the plots, the weights and the model")
            artifacts.finish(tracker, state, data, backend.tags, trained=state.epoch > first_epoch, confusion=confusion)
            raise_if_stopping()
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM from a stopped job
        status = "KILLED"
        interrupted = isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted)
        raise
    except WorkerFailuresError as e:
        if tracker and tracker.run_id:
            raise WorkerFailuresError(f"{e}; the last checkpoint is saved: continue with "
                                      f"`{runs.continue_command(tracker.run_id, tracker.uri)}`") from None
        raise
    finally:
        if tracker:
            with no_interrupts():
                tracker.end("KILLED" if status == "FAILED" and STOPPING.is_set() else status)
            if interrupted and tracker.run_id:  # the interrupt goes on, saying how to continue the run
                raise _interrupted(tracker) from None
    return JobResult(state, data, tracker.run_id if tracker else None, tracking_uri, time.perf_counter() - started,
                     experiment_id=tracker.experiment_id if tracker else None)


def _interrupted(tracker) -> Interrupted:
    """What an interrupted run's last line says: it ended KILLED, and how to continue it."""
    if not tracker.stored_epoch:
        return Interrupted(f"run {tracker.run_id} ended KILLED before its first checkpoint; run the job again to "
                           "start over", start_over=True)
    return Interrupted(f"run {tracker.run_id} ended KILLED; continue it from its checkpoint of epoch "
                       f"{tracker.stored_epoch}: {runs.continue_command(tracker.run_id, tracker.uri)}")


class _StoppedQuietly(Hooks):
    """A stop whose interrupt something swallowed stops the job at the next epoch's end."""

    def on_epoch_end(self, result, state):
        raise_if_stopping()


def _note_idle_workers(cfg: JobConfig, progress: Progress) -> None:
    """Ray workers share a step by its chunks: fewer chunks than workers leaves some idle; under
    shuffle=blocks a chunk is computed where its block is, and a step's chunks lie in about mix_blocks blocks."""
    if cfg.backend != "ray":
        return
    chunks = piece_count(cfg.batch_size, cfg.chunk_size)
    if cfg.shuffle == "blocks" and cfg.mix_blocks < cfg.workers:
        progress.note(f"each mini-batch draws from about mix_blocks={cfg.mix_blocks} blocks, and a block's chunks are "
                      f"computed by the worker that holds it, so at most {cfg.mix_blocks} of the {cfg.workers} "
                      f"workers compute in a step; mix_blocks={cfg.workers} or more spreads the steps over all of "
                      "them (the results then differ: they are the same for a given mix_blocks)")
    elif cfg.shuffle == "global" and chunks < cfg.workers:  # (under blocks a mini-batch is cut at its blocks too)
        share = piece_count(cfg.batch_size, cfg.workers)  # the chunk size that makes one chunk a worker
        progress.note(f"a mini-batch of {cfg.batch_size} is {chunks} chunk{'s' if chunks > 1 else ''} of up to "
                      f"chunk_size={cfg.chunk_size} examples, so only {chunks} of the {cfg.workers} workers compute "
                      f"in each step; chunk_size={share} shares it among all {cfg.workers} (the results then differ "
                      "in the last bits: they are the same for a given chunk_size)")


def summary(result: JobResult, cfg: JobConfig) -> str:
    """The job's last line: test (and validation) accuracy after its epochs, and its time."""
    state, data = result.state, result.data
    figures = accuracies(*state.kept_accuracies(cfg, data),  # keep=best: those of the weights the run keeps
                         state.best_epoch if state.keeps_best(cfg) else None)
    stopped = f"; {state.stopped}" if state.stopped else ""
    return (f"{figures} after {plural(state.epoch, 'epoch')} ({data.name}, {cfg.backend} backend) in "
            f"{result.seconds:.1f} s{stopped}")


def complete(run_id: str, state: TrainingState) -> str:
    """What a resume of a run that FINISHED says: nothing is left to do, and how to train it longer."""
    if state.stopped:
        return (f"run {run_id} is already complete: it FINISHED after {plural(state.epoch, 'epoch')} "
                f"({state.stopped}); nothing is left to do")
    return (f"run {run_id} is already complete: it FINISHED after {plural(state.epoch, 'epoch')}, and nothing is "
            f"left to do; to train it longer, pass epochs=N (more than {state.epoch})")


def _check_resumable(run_id: str, run, state: TrainingState, saved: JobConfig, cfg: JobConfig, data: Dataset,
                     force: bool) -> list[str]:
    """A resume continues the run it names: the same computation (or --force), to at least its own end. Returns
    what --force let change in what it computes, for the run to say."""
    digest = run.data.tags.get(runs.DATASET_DIGEST)
    changed_data = [f"the contents of data={cfg.data} (sha256 {digest[:12]}… -> {data.digest[:12]}…)"] \
        if digest and digest != data.digest else []
    changes = check_resume_config(run_id, state, saved, cfg, force, changed_data, run.info.status == "FINISHED")
    n_batches = batch_count(data.n_train, saved.batch_size)
    if not changes and state.step != state.epoch * n_batches:  # the same data split: the counts must agree
        raise TrackingError(f"--resume {run_id}: its checkpoint says epoch {state.epoch} at step {state.step}, but "
                            f"an epoch of {data.n_train} examples in mini-batches of {saved.batch_size} is "
                            f"{n_batches} steps; the checkpoint is damaged: start a new run instead")
    return changes


def check_resume_config(run_id: str, state: TrainingState, saved: JobConfig, cfg: JobConfig, force: bool,
                        more_changes: list[str] = (), finished: bool = False) -> list[str]:
    """The checks of a resume that need only the configs (``gradavg submit`` makes them before sending):
    what the new config changes in the computation, and whether it reaches the run's own end (``finished``:
    the run FINISHED)."""
    changes = result_changes(saved, cfg) + list(more_changes)
    if changes and not force:
        raise ConfigError(f"--resume {run_id}: this config changes what the run computes ({'; '.join(changes)}); "
                          "use the run's own values, or pass --force to continue anyway")
    if cfg.epochs < state.epoch and state.epoch >= saved.epochs:  # it has trained all its epochs already
        further = f"pass epochs={state.epoch + 1} or more to train it further" if finished else \
            f"pass epochs={state.epoch} to finish it (it was stopped as it logged its results), or more to train it " \
            "further"
        raise ConfigError(f"--resume {run_id}: the run has trained all its epochs={saved.epochs} already, and "
                          f"epochs={cfg.epochs} is fewer; {further}")
    if cfg.epochs < state.epoch or (cfg.epochs < saved.epochs and not force):
        raise ConfigError(f"--resume {run_id}: the run is at epoch {state.epoch} of its epochs={saved.epochs}, but "
                          f"this config says epochs={cfg.epochs}; pass epochs={saved.epochs} (or more) to finish it"
                          + (", or --force to end it sooner" if cfg.epochs >= state.epoch else ""))
    return changes
