"""The model a command evaluates: a weights file, a run's (``runs:/RUN_ID``) or a logged or registered
model (``models:/...``), with the params of the run that trained it."""

from __future__ import annotations

from pathlib import Path

from jobs.errors import UsageError


def load_model(model: str, tracking_uri: str | None) -> tuple:
    """The network a weights file, ``runs:/RUN_ID`` or ``models:/MODEL_ID`` holds, and its run's params."""
    from core import Network

    if model.startswith(("runs:/", "models:/")):
        return _load_tracked(model, tracking_uri)
    if not Path(model).is_file():
        raise UsageError(f"{model}: no such file; pass a weights.npz, runs:/RUN_ID, models:/m-ID or "
                         "models:/NAME/VERSION")
    try:
        return Network.load(model), {}
    except (ValueError, OSError) as e:
        raise UsageError(f"{model}: cannot be loaded as weights ({e})") from None


def _load_tracked(model: str, tracking_uri: str | None) -> tuple:
    import mlflow

    from core import Network
    from jobs.store import open_store, process_uri, resolve_uri

    uri = resolve_uri(tracking_uri)
    client = open_store(uri, create=False)
    try:
        if model.startswith("runs:/"):
            run_id = model.removeprefix("runs:/").strip("/").split("/")[0]
            path = client.download_artifacts(run_id, "weights.npz")
        else:  # a logged model (models:/m-...) or a registered one (models:/NAME/VERSION)
            with process_uri(uri):  # models:/ URIs are resolved in the process's store
                run_id = mlflow.models.get_model_info(model).run_id
                folder = mlflow.artifacts.download_artifacts(artifact_uri=model, tracking_uri=uri)
            path = Path(folder) / "artifacts" / "weights.npz"
        params = client.get_run(run_id).data.params if run_id else {}
    except (mlflow.exceptions.MlflowException, OSError):
        what = "run with weights.npz" if model.startswith("runs:/") else "gradavg model"
        where = ("`gradavg run` prints the run's" if model.startswith("runs:/") else
                 "a run's page lists its logged model, the Model registry its versions")
        raise UsageError(f"{model}: no such {what} in {uri}; check the id ({where}) and --tracking-uri") from None
    return Network.load(path), params


def run_split(params: dict[str, str]) -> dict:
    """How a run split its data, from its logged params (``str`` of each value). Never ``allow_pickle``:
    what a store says may not widen what a command does (only the person typing it can)."""
    import yaml

    keys = ("validation_size", "test_size")
    return {k: None if params[k] == "None" else yaml.safe_load(params[k]) for k in keys if k in params}
