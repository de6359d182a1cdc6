"""MLflow tracking: one run per job, opened and closed here and nowhere else.

The tracking URI is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own
default (``sqlite:///mlflow.db`` in the working directory). Metrics go in batches:
one ``log_batch`` per epoch carries that epoch's metrics and the buffered mini-batch
costs, sent asynchronously so the training loop does not wait on the store.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jobs import __version__
from jobs.config import JobConfig
from jobs.data import Dataset
from jobs.train import EpochResult, Hooks, TrainingState

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says how to fix it."""


def resolve_uri(cli_uri: str | None) -> str:
    import mlflow

    if cli_uri:
        return cli_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before training, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            if reply.status == 200:
                return
            problem = f"answered HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        problem = f"answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        problem = f"cannot be reached ({getattr(e, 'reason', e)})"
    raise TrackingError(f"MLflow tracking server {uri} {problem}; start one with `mlflow server --host 127.0.0.1 "
                        f"--port 5000` or pass --tracking-uri sqlite:///mlflow.db")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _driver_tags() -> dict[str, str]:
    """Where the driver runs, so that `gradavg runs repair` can tell a dead one."""
    return {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid())}


def open_client(uri: str):
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    return MlflowClient(uri)


def fetch_checkpoint(uri: str, run_id: str):
    """The run and its last checkpoint: (run, TrainingState, JobConfig)."""
    import mlflow

    from jobs import checkpoint

    client = open_client(uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"--resume {run_id}: no such run in {uri}; check the id (`gradavg run` prints it) "
                            "and the tracking URI") from None
    try:
        path = client.download_artifacts(run_id, "checkpoints/checkpoint.npz")
    except (mlflow.exceptions.MlflowException, OSError):
        raise TrackingError(f"--resume {run_id}: the run has no checkpoint to resume from (was it run with "
                            "checkpoint_every=0, or stopped before its first epoch ended?)") from None
    try:
        state, cfg = checkpoint.load(path)
    except Exception as e:  # a damaged file, or one that is not a checkpoint: never taken for a good one
        raise TrackingError(f"--resume {run_id}: its checkpoint cannot be read ({type(e).__name__}: {e}); "
                            "start a new run instead") from None
    return run, state, cfg


def repair(uri: str, run_ids: list[str] | None = None) -> list[tuple[str, str]]:
    """End RUNNING runs whose driver is gone as KILLED; return (run id, what was done)."""
    client = open_client(uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'") if ids else []
    done = []
    for run in runs:
        if run.info.status != "RUNNING":
            done.append((run.info.run_id, f"left as {run.info.status}"))
            continue
        host, pid = run.data.tags.get("driver_host"), run.data.tags.get("driver_pid")
        alive = host == socket.gethostname() and pid and _pid_alive(int(pid))
        if alive:
            done.append((run.info.run_id, f"left RUNNING: its driver (pid {pid}) is still running"))
        elif host != socket.gethostname() and not run_ids:
            done.append((run.info.run_id, f"left RUNNING: its driver ran on {host}; name the run to end it"))
        else:
            client.set_terminated(run.info.run_id, "KILLED")
            done.append((run.info.run_id, "ended KILLED (its driver is gone)"))
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunTracker(Hooks):
    """Opens the run, logs what the loop reports, and closes it with the right status."""

    def __init__(self, cfg: JobConfig, uri: str, backend_tags: dict[str, str]):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.cfg, self.uri = cfg, uri
        self._mlflow = mlflow
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # our own progress lines say enough
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        self._backend_tags = dict(backend_tags)  # backend, workers and, on Ray, the transport
        self._buffered: list = []  # batch costs and step diagnostics, sent with the epoch's metrics
        self._pending: list = []
        self._logged: dict[str, set[int]] = {}  # steps already in the store, when resuming
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="gradavg-upload")  # in order, one at a time
        self._uploads: list = []
        self._artifacts = Path(tempfile.mkdtemp(prefix="gradavg-run-"))
        self.run_id: str | None = None

    # -- opening and closing
    def start(self, data: Dataset) -> str:
        mlflow = self._mlflow
        experiment = mlflow.set_experiment(self.cfg.experiment)
        run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=self.cfg.run_name)
        self.run_id = run.info.run_id
        self.experiment_id = experiment.experiment_id
        params = {k: str(v) for k, v in self.cfg.to_dict().items()}
        tags = {**self._backend_tags, "dataset": data.name,
                "dataset_digest": data.digest, "gradavg_version": __version__, **_driver_tags()}
        if commit := git_commit():
            tags["git_commit"] = commit
        from mlflow.entities import Param, RunTag

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        mlflow.log_text(self.cfg.to_yaml(), "config.yaml")
        from mlflow.exceptions import MlflowException

        described = {"targets": data.y_train, "name": data.name, "digest": data.digest[:16]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a dataset name is not a path; MLflow guesses
            try:
                dataset = mlflow.data.from_numpy(data.x_train, source=self.cfg.data, **described)
            except MlflowException:  # a spec such as synthetic:N:INPUTS:CLASSES is no source MLflow knows,
                dataset = mlflow.data.from_numpy(data.x_train, **described)  # so the code stands as the source
        mlflow.log_input(dataset, context="training")
        return self.run_id

    def resume(self, run_id: str, times_resumed: int) -> None:
        """Continue an existing run: the same run id, no metric logged twice at one step."""
        from mlflow.entities import RunTag

        run = self._mlflow.start_run(run_id=run_id)
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        for key in self.client.get_run(run_id).data.metrics:
            self._logged[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        tags = {**_driver_tags(), "resumed": str(times_resumed), **self._backend_tags}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def tag_backend(self, backend_tags: dict[str, str]) -> None:
        """Tags of the backend that changed during the run (a transport that fell back)."""
        from mlflow.entities import RunTag

        changed = {k: v for k, v in backend_tags.items() if self._backend_tags.get(k) != v}
        if changed:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in changed.items()])
            self._backend_tags.update(changed)

    def end(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            self._uploader.shutdown(wait=True)
            self._mlflow.end_run(status=status)

    # -- hooks from the training loop
    def on_batch_cost(self, step: int, cost: float) -> None:
        from mlflow.entities import Metric

        self._buffered.append(Metric("batch_cost", cost, int(time.time() * 1000), step))

    def on_epoch_end(self, result: EpochResult, state: TrainingState) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, result.epoch) for k, v in result.metrics().items()] + self._buffered
        metrics = [m for m in metrics if m.step not in self._logged.get(m.key, ())]
        self._buffered = []
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
            self._pending.append(self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000],
                                                       synchronous=False))
        if self.cfg.checkpoint_every and result.epoch % self.cfg.checkpoint_every == 0:
            self.log_checkpoint(state)

    def on_step_diagnostics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffered.extend(Metric(f"steps/{k}", v, now, step) for k, v in metrics.items())

    def on_worker_failure(self, failures: int, text: str) -> None:
        self.client.set_tag(self.run_id, "worker_failures", str(failures))
        self.client.set_tag(self.run_id, "last_worker_failure", text[:4000])

    def flush(self) -> None:
        """Wait for every metric batch and checkpoint upload still on its way."""
        for operation in self._pending:
            operation.wait()
        self._pending = []
        for upload in self._uploads:
            upload.result()
        self._uploads = []

    # -- artifacts
    def log_checkpoint(self, state: TrainingState) -> None:
        """Snapshot now, write and upload in the background: the next epoch need not wait.

        The upload first waits for the metrics logged so far: a checkpoint never gets ahead
        of its metrics, so a run resumed from it has every metric up to its step.
        """
        from jobs import checkpoint

        arrays = checkpoint.snapshot(state, self.cfg)
        metrics_so_far = list(self._pending)

        def upload():
            for operation in metrics_so_far:
                operation.wait()
            path = checkpoint.write(arrays, self._artifacts / "checkpoint.npz")
            self.client.log_artifact(self.run_id, str(path), "checkpoints")

        self._uploads.append(self._uploader.submit(upload))

    def log_results(self, state: TrainingState, data: Dataset) -> None:
        network = state.network
        out = self._artifacts
        self.flush()
        self.log_plots(network, data)
        network.save(out / "weights.npz")
        self.client.log_artifact(self.run_id, str(out / "weights.npz"))
        self.log_model(out / "weights.npz", data)

    def log_plots(self, network, data: Dataset) -> None:
        """Every plot, drawn from the run's whole metric history (so a resumed run's too)."""
        from jobs import plots

        out = self._artifacts / "plots"
        out.mkdir(exist_ok=True)
        history = self.epoch_history()
        if history:
            plots.curves(history, out / "curves.png")
        layers = range(2, len(network.sizes) + 1)
        if f"layer{layers[0]}/grad_w_norm" in self.client.get_run(self.run_id).data.metrics:
            for name, title, ylabel, log in (
                    ("grad_w_norm", "‖∂C/∂w^l‖ per layer", "gradient norm (log scale)", True),
                    ("saturated_fraction", "saturated neurons per layer (σ'(z) < 0.01)", "fraction", False)):
                series = {f"layer {l}": [(m.step, m.value) for m in
                                         self.client.get_metric_history(self.run_id, f"layer{l}/{name}")]
                          for l in layers}
                plots.per_layer(series, out / f"{name.replace('grad_w_norm', 'gradient_norms')}.png", title,
                                ylabel, log)
        predicted = network.predict(np.asarray(data.x_test, dtype=network.dtype))
        plots.confusion(data.y_test, predicted, network.sizes[-1], out / "confusion_matrix.png")
        if data.image_shape:
            plots.misclassified(data.x_test, data.y_test, predicted, data.image_shape, out / "misclassified.png")
            plots.first_layer_weights(network.weights[0], data.image_shape, out / "first_layer_weights.png")
        self.client.log_artifacts(self.run_id, str(out), "plots")

    def epoch_history(self) -> list:
        """The per-epoch results logged so far, rebuilt from the run's metric history."""
        from types import SimpleNamespace

        from jobs.train import EPOCH_METRICS

        by_epoch: dict[int, dict[str, float]] = {}
        for key in EPOCH_METRICS:
            for m in self.client.get_metric_history(self.run_id, key):
                by_epoch.setdefault(m.step, {})[key] = m.value
        return [SimpleNamespace(epoch=epoch, **{k: values.get(k) for k in EPOCH_METRICS})
                for epoch, values in sorted(by_epoch.items())]

    def log_model(self, weights_path: Path, data: Dataset) -> None:
        from mlflow.models import infer_signature

        from core import Network

        example = np.asarray(data.x_test[:5], dtype=np.float64)
        signature = infer_signature(example, Network.load(weights_path).predict(example))
        self._log_model(weights_path, signature, example)

    def _log_model(self, weights_path: Path, signature, example: np.ndarray) -> None:
        import mlflow.pyfunc

        mlflow.pyfunc.log_model(
            name="model", python_model=str(PROJECT_ROOT / "jobs" / "pyfunc.py"),
            artifacts={"weights": str(weights_path)}, signature=signature, input_example=example,
            code_paths=[str(PROJECT_ROOT / "core")],
            pip_requirements=[f"numpy=={np.__version__}", f"mlflow=={self._mlflow.__version__}"],
        )
