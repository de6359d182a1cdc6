"""Tracking a running job in MLflow: its one run, opened (``RunTracker.start``), reopened
(``resume``, which claims it: ``jobs.claims.take``) and closed (``end``) through ``jobs.runs``,
and what the training loop reports, sent to the store in order.

While training, metrics and checkpoints go to the store on one background thread, in order,
at most every ``SEND_EVERY_SECONDS``, so the loop never waits on it; the first call that fails
marks the store lost, nothing more is sent, and training goes on. What the run ends with (its
plots, weights and model; with the store lost, the final weights and checkpoint kept on local
disk, with one line that says where and how to resume) is ``jobs.artifacts``'s. Which store is
``jobs.store``'s.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from jobs import claims, runs
from jobs.config import JobConfig, input_params, renamed
from jobs.data import Dataset
from jobs.errors import JobFailed, reason
from jobs.store import TrackingError, open_store, retry_locked
from jobs.text import accuracies, plural
from jobs.train import EpochResult, Hooks, TrainingState

# While training, metrics and checkpoints go to the store at most this often, and at the end: each send
# costs milliseconds of a core that training would otherwise use (an epoch can take less than 0.1 s).
SEND_EVERY_SECONDS = 2.0
SYSTEM_METRICS_SECONDS = 2  # CPU, memory, disk and network of the driver's machine, sampled this often


class TrackingLostError(JobFailed, RuntimeError):
    """The store stopped answering during a job whose training then finished; the message says
    where its results are kept and how to complete the run."""


class RunTracker(Hooks):
    """Opens the run (or reopens it), sends what the loop reports, and closes it with the right status.

    Every call to the store goes through ``call``: the first one that fails sets ``lost`` (why),
    and no later call is tried. Files are staged in a temporary folder (``staging``), removed as
    the run is closed.
    """

    def __init__(self, cfg: JobConfig, uri: str, stream: TextIO | None = None, tags: dict[str, str] | None = None,
                 source: str = runs.FROM_RUN):
        import mlflow

        self.cfg, self.uri = cfg, uri
        self._tags = dict(tags or {})  # a sweep's trial: its parent run and its number
        self.source = source  # what started the job: `gradavg run`, or a sweep (jobs.runs.FROM_*)
        self._mlflow = mlflow
        self.client = open_store(uri)
        self.stream = stream or sys.stderr
        self.backend_tags: dict[str, str] = {}  # backend, workers or threads and, on Ray, the transport
        self._buffered: list = []  # batch costs and step diagnostics, sent with the epoch's metrics
        self._logged: dict[str, set[int]] = {}  # steps already in the store, when resuming
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="gradavg-tracking")  # in order, one at a time
        self._sent: list = []  # what the sender has been handed: metric batches, checkpoint uploads
        self._unsent: list = []  # metrics held back until the next send (SEND_EVERY_SECONDS)
        self._unsent_epochs: list[int] = []
        self._checkpoint = None  # the newest checkpoint not yet sent: (arrays, epoch)
        self._last_sent = time.monotonic()
        self.staging = Path(tempfile.mkdtemp(prefix="gradavg-run-"))
        self._monitor = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.lost: str | None = None  # why the store stopped answering
        self._warned = False
        self.stored_epoch = 0  # the last epoch whose checkpoint the store holds
        self.forced = ""  # what a --force resume changed (runs.FORCED)
        # test, validation, the kept epoch (keep=best): of the weights a resume that trained none logs
        self.accuracies: tuple[float, float | None, int | None] | None = None
        self._ended = threading.Event()  # stops the heartbeat
        self.data_name = cfg.data  # the dataset's name, for the run's description
        self.last: tuple[EpochResult, TrainingState] | None = None  # the latest epoch, for the description
        self.curves_logged = False  # plots/curves.png is in the store (jobs.artifacts.log_plots)

    # -- calls to the store
    def call(self, what: str, fn, *args, **kwargs):
        """One call to the store, unless it is lost; the first failure loses it."""
        if self.lost:
            return None
        try:
            return retry_locked(fn, *args, **kwargs)  # a sqlite store locked a while is waited for
        except MemoryError:  # this process's trouble, not the store's: named as such (jobs.cli)
            raise
        except Exception as e:
            self.lost = f"{what} failed ({reason(e)})"
            return None

    def _in_background(self, what: str, fn, *args) -> None:
        self._sent.append(self._sender.submit(self.call, what, fn, *args))

    # -- opening and closing
    def start(self, data: Dataset, backend_tags: dict[str, str]) -> str:
        """Create the run with its params, tags, config and dataset. Any failure here is a
        TrackingError: nothing has been trained yet."""
        self.backend_tags, self.data_name = dict(backend_tags), data.name
        try:
            self._create(data)
        except TrackingError:
            raise
        except Exception as e:
            raise TrackingError(f"tracking store {self.uri} failed while opening the run ({reason(e)}); check "
                                "the store, or pass track=false to train without tracking") from None
        self._start_monitor(resume=False)
        self._start_heartbeat()
        return self.run_id

    def _create(self, data: Dataset) -> None:
        from mlflow.entities import DatasetInput, InputTag

        tags = {**self.backend_tags, runs.DATASET: data.name, runs.DATASET_DIGEST: data.digest,
                runs.EPOCHS: str(self.cfg.epochs),
                **runs.run_tags(self.source, claims.driver_tags()), **self._tags}
        params = input_params(self.cfg)  # the inputs only; epochs, how long, is a tag
        self.run_id, self.experiment_id = runs.open_run(self.client, self.cfg.experiment, self.cfg.run_name, tags,
                                                        params)
        self.client.log_text(self.run_id, self.cfg.to_yaml(), "config.yaml")
        dataset = self._describe(data)._to_mlflow_entity()
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag(runs.DATA_CONTEXT, "training")])])

    def _describe(self, data: Dataset):
        from mlflow.exceptions import MlflowException

        if data.shards is not None:  # a sharded folder: described by its manifest (the driver may hold no rows)
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(str(data.shards.folder))
            return MetaDataset(source, name=data.name, digest=data.digest[:16])

        described = {"targets": data.y_train, "name": data.name, "digest": data.digest[:16]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a dataset name is not a path; MLflow guesses
            try:
                return self._mlflow.data.from_numpy(data.x_train, source=self.cfg.data, **described)
            except MlflowException:  # a spec such as synthetic:N:INPUTS:CLASSES is no source MLflow knows,
                return self._mlflow.data.from_numpy(data.x_train, **described)  # so the code stands as the source

    def resume(self, run_id: str, times_resumed: int, stored_epoch: int, backend_tags: dict[str, str],
               saved: JobConfig, changes: list[str] = ()) -> None:
        """Continue an existing run: the same run id, no metric logged twice at one step; its name states the
        values of this config (``saved``: the config it ran with); ``changes``: what --force let this config
        change in what the run computes, which the run says (``runs.FORCED``)."""

        self.backend_tags = dict(backend_tags)
        try:
            run = self.client.get_run(run_id)  # its experiment, data and jobs: none of which the claim changes
            jobs = runs.job_tag(run.data.tags.get(runs.RAY_JOBS, ""))
            name = renamed(run.info.run_name or "", saved, self.cfg)
            self.forced = run.data.tags.get(runs.FORCED, "")  # an earlier --force's, kept in the description
            if changes:  # --force: said where a person reads the run
                now = f"from epoch {stored_epoch}: {', '.join(changes)}"
                self.forced = "; ".join(filter(None, [self.forced, now]))[-5000:]
            claims.take(self.client, run_id, f"--resume {run_id}", {runs.RESUMED: str(times_resumed),
                                                                    runs.EPOCHS: str(self.cfg.epochs),
                                                                    **self.backend_tags, **jobs,
                                                                    **({runs.NAME: name} if name else {}),
                                                                    **({runs.FORCED: self.forced} if changes else {})})
            if changes:  # the config it now runs with (params cannot change: they keep the values it started with)
                self.client.log_text(run_id, self.cfg.to_yaml(), "config.yaml")
            for key in self.client.get_run(run_id).data.metrics:
                self._logged[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        except claims.DriverConflict:
            raise
        except Exception as e:
            raise TrackingError(f"tracking store {self.uri} failed while reopening run {run_id} ({reason(e)})") \
                from None
        self.run_id, self.stored_epoch = run_id, stored_epoch
        self.experiment_id, self.data_name = run.info.experiment_id, run.data.tags.get(runs.DATASET, self.cfg.data)
        self._start_monitor(resume=True)
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        """Renew the driver's claim of the run (``jobs.claims``) while the job lives, from a thread of its own:
        an epoch can take longer than the claim's bound."""
        def beat():
            while not self._ended.wait(claims.HEARTBEAT_SECONDS):
                self.call("renewing the driver's claim", runs.renew_claim, self.client, self.run_id)

        threading.Thread(target=beat, daemon=True, name="gradavg-heartbeat").start()

    def _stop_monitor(self) -> None:
        """Stop sampling, and log one last sample: a run shorter than the interval gets one too."""
        monitor = self._monitor
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()

    def _start_monitor(self, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_SECONDS,
                                             resume_logging=resume, tracking_uri=self.uri)
        self._monitor.start()

    def end(self, status: str) -> None:
        """Close the run with ``status``; always stops the background thread and removes staged files."""
        self._ended.set()
        try:
            if self.run_id is not None and not self.lost:
                self.flush()
                if self._monitor is not None:
                    self.call("logging system metrics", self._stop_monitor)
                self.call("describing the run", runs.set_tag, self.client, self.run_id, runs.DESCRIPTION,
                          self.description(status))
                self.call("closing the run", runs.close, self.client, self.run_id, status)
            if self.run_id is not None and self.lost:  # lost before or while closing: one bounded try (a store
                # that lost only its artifacts still answers), so that the run is not left RUNNING
                runs.try_close(self.client, self.run_id, "FAILED" if status == "FINISHED" else status)
        finally:
            self._sender.shutdown(wait=not self.lost)
            shutil.rmtree(self.staging, ignore_errors=True)

    def description(self, status: str) -> str:
        """The run's description, the first thing its Overview shows: how it ended, its accuracies, where it
        stopped and why, where it ran; for a run that did not finish, how to continue it."""
        backend = self.backend_tags.get("backend", self.cfg.backend)
        where = f"{self.data_name}, {backend} backend" + (f", {self.backend_tags['workers']} workers"
                                                           if "workers" in self.backend_tags else "")
        if self.last is None and self.accuracies:  # a resume that had only the results to log: what they are
            text = f"{status}: {accuracies(*self.accuracies)} after epoch {self.stored_epoch} of {self.cfg.epochs} " \
                f"({where})."
        elif self.last is None:  # none trained by this driver: a resumed run's, where its checkpoint was
            text = f"{status} after epoch {self.stored_epoch} of {self.cfg.epochs} ({where})." if self.stored_epoch \
                else f"{status} before its first epoch ({where})."
        else:
            last, state = self.last
            result = state.kept_result(self.cfg) or last  # keep=best: the accuracies of the weights it keeps
            kept = accuracies(result.test_accuracy, result.validation_accuracy,
                              result.epoch if result is not last else None)
            text = f"{status}: {kept} after {plural(last.epoch, 'epoch')} of {self.cfg.epochs} ({where})."
            if state.stopped:
                text += f" Stopped by {state.stopped}."
            elif status != "FINISHED" and (parent := self._tags.get(runs.PARENT)):  # a trial: its sweep goes on
                text += f" Continue its sweep: `{runs.continue_command(parent, self.uri, sweep=True)}`"
            elif status != "FINISHED" and self.stored_epoch:
                text += (f" Continue it from its checkpoint of epoch {self.stored_epoch}: "
                         f"`{runs.continue_command(self.run_id, self.uri)}`")
        if self.forced:
            text += f" Resumed with --force {self.forced} (its params are the values it started with)."
        if status == "FINISHED" and self.curves_logged:  # the curves, drawn together, atop the Overview
            text += "\n\n" + runs.artifact_image(self.run_id, "plots/curves.png", "train, validation and test curves")
        return text

    # -- hooks from the training loop
    def on_batch_cost(self, step: int, cost: float) -> None:
        from mlflow.entities import Metric

        self._buffered.append(Metric("batch_cost", cost, int(time.time() * 1000), step))

    def on_epoch_end(self, result: EpochResult, state: TrainingState) -> None:
        from mlflow.entities import Metric

        from jobs import checkpoint

        self.last = (result, state)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, result.epoch) for k, v in result.metrics().items()] + self._buffered
        self._buffered = []
        self._unsent.extend(m for m in metrics if m.step not in self._logged.get(m.key, ()))
        self._unsent_epochs.append(result.epoch)
        if self.cfg.checkpoint_every and result.epoch % self.cfg.checkpoint_every == 0:
            self._checkpoint = (checkpoint.snapshot(state, self.cfg), state.epoch)  # the newest replaces older
        if time.monotonic() - self._last_sent >= SEND_EVERY_SECONDS:
            self._send()
        self._check_lost()

    def _send(self) -> None:
        """Hand the metrics so far, then the newest checkpoint, to the sender thread. In that order: a
        checkpoint never gets ahead of its metrics, so a run resumed from it has every metric up to it."""
        from jobs import checkpoint

        if not self._unsent_epochs:  # nothing since the last send (a checkpoint comes with its epoch)
            return
        epochs = self._unsent_epochs
        what = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}–{epochs[-1]}"
        metrics, self._unsent, self._unsent_epochs = self._unsent, [], []
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
            self._in_background(f"logging {what}'s metrics", self.client.log_batch, self.run_id,
                                metrics[start : start + 1000])
        if self._checkpoint is not None:
            (arrays, epoch), self._checkpoint = self._checkpoint, None

            def upload():
                path = checkpoint.write(arrays, self.staging / "checkpoint.npz")
                self.client.log_artifact(self.run_id, str(path), "checkpoints")
                self.stored_epoch = epoch

            self._in_background(f"uploading epoch {epoch}'s checkpoint", upload)
        self._last_sent = time.monotonic()

    def _check_lost(self) -> None:
        if self.lost and not self._warned:
            self._warned = True
            self.stream.write(f"gradavg: warning: the tracking store stopped answering ({self.lost}); training "
                              "goes on, and its results will be kept on this disk\n")
            self.stream.flush()

    def on_step_diagnostics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffered.extend(Metric(f"steps/{k}", v, now, step) for k, v in metrics.items())

    def on_worker_failure(self, failures: int, text: str) -> None:
        tags = {runs.WORKER_FAILURES: str(failures), runs.LAST_WORKER_FAILURE: text[:4000]}
        self._in_background("tagging a worker failure", runs.set_tags, self.client, self.run_id, tags)

    def flush(self) -> None:
        """Send what is held back, and wait for every metric batch and checkpoint still on its way."""
        self._send()
        for sent in self._sent:
            sent.result()
        self._sent = []
