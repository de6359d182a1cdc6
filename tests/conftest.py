"""Shared fixtures: a template MLflow sqlite store made once per session and copied per test.

Creating a fresh store runs MLflow's migrations (seconds); copying one takes a fraction.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# Every Ray process that tests start listens on loopback and reports nothing outside.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="module")
def local_ray():
    """A Ray cluster of 3 CPUs on 127.0.0.1 for one test module (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, object_store_memory=300 * 1024**2,
             logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def template_store(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the schema
    return db


@pytest.fixture
def tracking_uri(template_store, tmp_path, monkeypatch) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(template_store, db)
    monkeypatch.chdir(tmp_path)  # artifacts land under tmp_path/mlruns
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def error_line(stderr: str) -> str:
    """The one error line a failed command printed (progress lines may come before it)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert all(line.startswith(("gradavg: ", "epoch ")) for line in lines), stderr  # no message runs on
    errors = [line for line in lines if line.startswith("gradavg: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]
