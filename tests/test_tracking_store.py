"""A tracking store that fails, at the start or mid-run, loses no work and ends the process in bounded time.

The outage test runs a real MLflow server, kills it mid-run, and starts it again to complete the run.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, ROOT, error_line
from core import Network
from jobs import checkpoint
from jobs.cli import main
from jobs.config import load_config
from jobs.local_cluster import free_port
from jobs.run import run_job
from jobs.store import program
from jobs.tracking import RunTracker

DIGITS = str(CONFIGS / "digits.yaml")


def untracked_params(overrides: list[str]) -> np.ndarray:
    return run_job(load_config(DIGITS, [*overrides, "track=false"]), quiet=True).state.network.params


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """A real MLflow tracking server on 127.0.0.1 in a process group of its own."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the MLflow server exited while starting"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the MLflow server did not answer /health")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.server
def test_a_server_killed_mid_run_loses_nothing(tmp_path, monkeypatch, capsys):
    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    monkeypatch.chdir(tmp_path)
    server = start_server(store, port)
    uri = f"http://127.0.0.1:{port}"
    killed = []
    epoch_end = RunTracker.on_epoch_end

    def kill_at_epoch_3(self, result, state):  # the server dies once it holds epoch 2, before epoch 3 is sent
        if result.epoch == 3 and not killed:
            self.flush()
            stop_server(server)
            killed.append(result.epoch)
        epoch_end(self, result, state)

    monkeypatch.setattr(RunTracker, "on_epoch_end", kill_at_epoch_3)
    args = ["run", DIGITS, "epochs=6", "--tracking-uri", uri]
    started = time.perf_counter()
    try:
        assert main(args) == 1
        seconds = time.perf_counter() - started
        err = error_line(capsys.readouterr().err)
        assert seconds < 90, seconds  # MLflow's own retries took 791 s
        client = MlflowClient(uri)
        assert killed == [3]
        kept = tmp_path / "gradavg-unsaved"
        (run_dir,) = kept.iterdir()
        run_id = run_dir.name
        assert "logging epochs 3–6's metrics failed" in err and str(run_dir) in err  # sent at most every 2 s
        resume = (f"`{program('gradavg')} run --resume {run_id} --tracking-uri {uri}` completes the run from its "
                  "last stored checkpoint (epoch 2)")
        assert resume in err
        monkeypatch.setattr(RunTracker, "on_epoch_end", epoch_end)
        untracked = untracked_params(["epochs=6"])
        assert np.array_equal(Network.load(run_dir / "weights.npz").params, untracked)
        state, _ = checkpoint.load(run_dir / "checkpoint.npz")
        assert state.epoch == 6 and np.array_equal(state.network.params, untracked)

        server = start_server(store, port)  # the store is back: the run completes from epoch 2, to the same bits
        client = MlflowClient(uri)
        assert client.get_run(run_id).info.status == "RUNNING"  # the server was gone when the job ended
        assert main([*args, "--resume", run_id, "--quiet"]) == 0
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "cost/train")] == [1, 2, 3, 4, 5, 6]
        final = Network.load(client.download_artifacts(run_id, "weights.npz"))
        assert np.array_equal(final.params, untracked)
    finally:
        stop_server(server)


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    """Answers /health and nothing else: every other request waits until the test ends."""

    release = threading.Event()

    def do_GET(self):
        if self.path == "/health":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
        else:
            self.release.wait(60)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_server_that_answers_only_health_is_refused_in_seconds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.perf_counter()
        assert main(["run", DIGITS, "--tracking-uri", f"http://127.0.0.1:{server.server_port}"]) == 2
        assert time.perf_counter() - started < 30
        assert "cannot be reached (timed out)" in error_line(capsys.readouterr().err)
    finally:
        _HealthOnly.release.set()
        server.shutdown()


def test_store_problems_are_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"this is not a database" * 100)
    cases = [
        (["--tracking-uri", "bogus://x"], "bogus://x: MLflow has no tracking store for the scheme 'bogus'"),
        (["--tracking-uri", f"sqlite:///{damaged}"], "is not an SQLite database"),
        (["--tracking-uri", f"sqlite:///{tmp_path}/no-such-folder/mlflow.db"], "is not a writable folder"),
    ]
    for extra, message in cases:
        assert main(["run", DIGITS, "epochs=1", *extra]) == 2
        assert message in error_line(capsys.readouterr().err), extra
    assert damaged.read_bytes() == b"this is not a database" * 100
    assert not (tmp_path / "mlruns").exists()


def test_reading_commands_create_no_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args in (["evaluate", "runs:/deadbeefdeadbeef"], ["runs", "repair", "deadbeefdeadbeef"],
                 ["run", DIGITS, "--resume", "deadbeefdeadbeef"]):
        assert main(args) == 2
        assert f"no tracking store at {tmp_path / 'mlflow.db'};" in error_line(capsys.readouterr().err), args
        assert not (tmp_path / "mlflow.db").exists()


def test_an_unknown_run_is_one_line(tracking_uri, capsys):
    assert main(["runs", "repair", "deadbeefdeadbeef"]) == 2
    assert "gradavg runs repair deadbeefdeadbeef: no such run" in error_line(capsys.readouterr().err)


def test_two_runs_started_at_once_on_a_new_store_both_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    command = [sys.executable, "-m", "jobs.cli", "run", DIGITS, "epochs=1", "--quiet", "--tracking-uri", uri]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_artifacts_on_a_full_disk_keep_the_weights(tracking_uri, tmp_path, monkeypatch, capsys):
    log_artifact = MlflowClient.log_artifact

    def full_disk(self, run_id, local_path, artifact_path=None):  # the disk fills after the run opened
        if Path(local_path).name == "config.yaml":
            return log_artifact(self, run_id, local_path, artifact_path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MlflowClient, "log_artifact", full_disk)
    assert main(["run", DIGITS, "epochs=2"]) == 1
    err = error_line(capsys.readouterr().err)
    assert "No space left on device" in err and "the store holds no checkpoint of this run" in err
    (run_dir,) = (tmp_path / "gradavg-unsaved").iterdir()
    untracked = untracked_params(["epochs=2"])
    assert np.array_equal(Network.load(run_dir / "weights.npz").params, untracked)
    state, _ = checkpoint.load(run_dir / "checkpoint.npz")
    assert state.epoch == 2 and np.array_equal(state.network.params, untracked)
    assert MlflowClient(tracking_uri).get_run(run_dir.name).info.status == "FAILED"  # the store itself answered


@pytest.fixture
def read_only_mount(tmp_path, template_store):
    """A folder on a tmpfs holding a store, then remounted read-only (needs root: skipped elsewhere)."""
    folder = tmp_path / "mount"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.copy(template_store, folder / "existing.db")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_store_on_a_read_only_mount_is_refused_at_once(read_only_mount, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for db, message in (("existing.db", "is read-only; make it and its folder writable"),
                        ("new.db", "cannot be created: " + str(read_only_mount) + " is not a writable folder")):
        started = time.perf_counter()
        assert main(["run", DIGITS, "epochs=1", "--tracking-uri", f"sqlite:///{read_only_mount / db}"]) == 2
        assert time.perf_counter() - started < 30  # MLflow alone spent 105 s before its traceback
        assert message in error_line(capsys.readouterr().err)


def test_the_process_uri_is_set_only_around_the_calls_that_need_it(monkeypatch):
    import mlflow

    from jobs.store import process_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///the-users.db")
    with process_uri("sqlite:///the-runs.db"):
        assert mlflow.get_tracking_uri() == "sqlite:///the-runs.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///the-users.db"  # MLflow unsets it with its own
    assert mlflow.get_tracking_uri() == "sqlite:///the-users.db"
