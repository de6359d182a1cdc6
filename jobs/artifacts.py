"""What a job's run ends with, logged after training by ``finish``: the backend's last tags and where
training stopped, the plots (drawn from the run's whole metric history), the final weights and the
model. Every call goes through the job's tracker (``jobs.tracking``), so that none is tried once the
store is lost; the final weights and checkpoint are then kept on local disk (``keep``), with one line
that says where and how to complete the run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from jobs import runs
from jobs.data import Dataset
from jobs.store import PROJECT_ROOT, logged_models
from jobs.tracking import RunTracker, TrackingLostError
from jobs.train import TrainingState


def finish(tracker: RunTracker, state: TrainingState, data: Dataset, backend_tags: dict[str, str],
           trained: bool = True, confusion: np.ndarray | None = None) -> None:
    """After training: the backend's final tags, plots, weights and model. A job that trained
    nothing (it resumed a run whose driver died while finishing) logs the model only if it is missing.
    Raises TrackingLostError, after keeping the results on local disk, if the store was lost."""
    tracker.flush()
    changed = {k: v for k, v in backend_tags.items() if tracker.backend_tags.get(k) != v}
    if state.stopped:  # early stopping, or a sweep's scheduler
        changed.update({runs.STOPPED_EPOCH: str(state.epoch), runs.STOPPED_REASON: state.stopped[:4000]})
    network = state.kept(tracker.cfg)  # keep=best: the best epoch's weights are the run's model
    if not trained and data.shards is None:  # its description's figures, as the job's last line gives them
        tracker.accuracies = (*state.kept_accuracies(tracker.cfg, data),
                              state.best_epoch if state.keeps_best(tracker.cfg) else None)
    changed[runs.KEPT_EPOCH] = str(state.kept_epoch(tracker.cfg))
    if changed:  # a transport that fell back during the run; where training stopped early
        tracker.call("tagging the run", runs.set_tags, tracker.client, tracker.run_id, changed)
    # plots and weights are files by name: logged again, they replace what an earlier attempt left
    tracker.call("logging the plots", log_plots, tracker, network, data, confusion)
    weights = tracker.staging / "weights.npz"
    tracker.call("saving the weights", network.save, weights)
    tracker.call("logging the weights", tracker.client.log_artifact, tracker.run_id, str(weights))
    if trained or not _has_model(tracker):  # a model is a new entity each time: log it once
        tracker.call("logging the model", log_model, tracker, weights, data)
    if tracker.lost:
        keep(tracker, state)


def _has_model(tracker: RunTracker) -> bool:
    """Whether an earlier attempt to finish this run (a resumed run's) logged its model. A model the
    attempt began but did not finish (still PENDING, without its files) is removed, to log it again."""
    from mlflow.entities import LoggedModelStatus

    models = tracker.call("listing the run's models", logged_models, tracker.uri, tracker.experiment_id,
                          tracker.run_id) or []
    for model in models:
        if model.status != LoggedModelStatus.READY:
            tracker.call("removing an unfinished model", tracker.client.delete_logged_model, model.model_id)
    return any(model.status == LoggedModelStatus.READY for model in models)


def keep(tracker: RunTracker, state: TrainingState) -> None:
    """The store is lost: keep the final weights and checkpoint on local disk, and say so."""
    from jobs import checkpoint

    kept, why = None, ""
    for folder in (Path.cwd() / "gradavg-unsaved", Path(tempfile.gettempdir()) / "gradavg-unsaved"):
        try:
            path = folder / (tracker.run_id or "run")
            path.mkdir(parents=True, exist_ok=True)
            state.network.save(path / "weights.npz")
            checkpoint.save(state, tracker.cfg, path / "checkpoint.npz")
            kept = path
            break
        except OSError as e:
            why = e.strerror or type(e).__name__
            continue
    where = (f"the final weights and checkpoint are kept in {kept} (`gradavg evaluate "
             f"{kept / 'weights.npz'}` reads them)" if kept else
             f"no local folder could be written to keep the final weights in ({why}), so the weights of epoch "
             f"{state.epoch} are lost")
    if tracker.stored_epoch:
        complete = (f"when the store answers again, `{runs.continue_command(tracker.run_id, tracker.uri)}` "
                    f"completes the run from its last stored checkpoint (epoch {tracker.stored_epoch}), to the same "
                    "bits")
    else:
        complete = (f"the store holds no checkpoint of this run, so a new run starts over (once the store "
                    f"answers, `gradavg runs repair {tracker.run_id}` ends this one)")
    raise TrackingLostError(f"the tracking store {tracker.uri} stopped answering: {tracker.lost}; training "
                            f"finished; {where}; {complete}")


def log_plots(tracker: RunTracker, network, data: Dataset, confusion: np.ndarray | None = None) -> None:
    """Every plot, drawn from the run's whole metric history (so a resumed run's too). ``confusion``: the
    test set's counts where the driver does not hold the test set (a sharded dataset on Ray), whose
    misclassified examples are then drawn from the sample it holds."""
    from jobs import plots

    client, run_id = tracker.client, tracker.run_id
    out = tracker.staging / "plots"
    out.mkdir(exist_ok=True)
    history = epoch_history(client, run_id)
    if history:
        plots.curves(history, out / "curves.png")
    layers = range(2, len(network.sizes) + 1)
    if f"layer{layers[0]}/grad_w_norm" in client.get_run(run_id).data.metrics:
        for name, title, ylabel, log in (
                ("grad_w_norm", plots.GRADIENT_NORMS_TITLE, "gradient norm (log scale)", True),
                ("saturated_fraction", "saturated neurons per layer (σ'(z) < 0.01)", "fraction", False)):
            series = {f"layer {l}": [(m.step, m.value) for m in client.get_metric_history(run_id, f"layer{l}/{name}")]
                      for l in layers}
            plots.per_layer(series, out / f"{name.replace('grad_w_norm', 'gradient_norms')}.png", title, ylabel,
                            log)
    predicted = network.predict(np.asarray(data.x_test, dtype=network.dtype))
    plots.confusion(data.y_test, predicted, network.sizes[-1], out / "confusion_matrix.png", counts=confusion)
    if data.image_shape:
        plots.misclassified(data.x_test, data.y_test, predicted, data.image_shape, out / "misclassified.png")
        plots.first_layer_weights(network.weights[0], data.image_shape, out / "first_layer_weights.png")
    client.log_artifacts(run_id, str(out), "plots")
    tracker.curves_logged = bool(history)  # the run's description shows them (RunTracker.description)


def epoch_history(client, run_id: str) -> list:
    """The per-epoch results logged so far, rebuilt from the run's metric history."""
    from types import SimpleNamespace

    from jobs.train import EPOCH_METRICS

    by_epoch: dict[int, dict[str, float]] = {}
    for key in EPOCH_METRICS:
        for m in client.get_metric_history(run_id, EPOCH_METRICS[key]):
            by_epoch.setdefault(m.step, {})[key] = m.value
    return [SimpleNamespace(epoch=epoch, **{k: values.get(k) for k in EPOCH_METRICS})
            for epoch, values in sorted(by_epoch.items())]


def log_model(tracker: RunTracker, weights_path: Path, data: Dataset) -> None:
    """The final weights as an MLflow pyfunc model of the run (``jobs.pyfunc``), with its signature (a row of
    floats per example, in any float dtype or as lists; the ``output`` param) and an input example from the
    test set."""
    inputs = tracker.staging / "inputs.json"  # a file of the model's, not its run's params (as model_config is)
    inputs.write_text(json.dumps({"in_unit_range": in_unit_range(data)}))
    _log_model(tracker.uri, tracker.run_id, weights_path, inputs, model_signature(data.n_inputs),
               np.asarray(data.x_test[:5], dtype=np.float64))


def model_signature(n_inputs: int):
    """One float column a network input (a DataFrame's, a list's or an array's, float32 or float64; integers are
    refused), the labels out, and ``params={"output": "labels" | "probabilities" | "activations"}``."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec(DataType.double) for _ in range(n_inputs)]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
                          params=ParamSchema([ParamSpec("output", DataType.string, "labels")]))


def in_unit_range(data: Dataset) -> bool:
    """Whether the examples the driver holds (the test set, or a sharded dataset's sample of it) lie in
    [0, 1], pixels scaled: the model then refuses inputs above 1 (pixels in [0, 255])."""
    x = np.asarray(data.x_test)
    return bool(x.size) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def _log_model(uri: str, run_id: str, weights_path: Path, inputs_path: Path, signature, example: np.ndarray) -> None:
    import mlflow.pyfunc

    with runs.active(uri, run_id):  # the model is linked to the active run
        mlflow.pyfunc.log_model(
            name="model", python_model=str(PROJECT_ROOT / "jobs" / "pyfunc.py"),
            artifacts={"weights": str(weights_path), "inputs": str(inputs_path)}, signature=signature,
            input_example=example, code_paths=[str(PROJECT_ROOT / "core")],
            pip_requirements=[f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"],
        )
