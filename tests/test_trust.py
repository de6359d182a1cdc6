"""What a store, a checkpoint or a plan says never widens what a command does; files that hold secrets
are not readable by others; a run has one driver at a time."""

from __future__ import annotations

import gzip
import pickle
import stat
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import error_line
from core import Network
from jobs.cli import main


class _Planted:
    """Unpickling this writes a file: the proof that a pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("ran",))


def _planted_pickle(folder: Path) -> tuple[Path, Path]:
    marker, data = folder / "pickle-ran", folder / "mnist.pkl.gz"
    with gzip.open(data, "wb") as f:
        pickle.dump(_Planted(str(marker)), f)
    return data, marker


def test_evaluate_never_takes_allow_pickle_from_the_run(tracking_uri, tmp_path, capsys):
    data, marker = _planted_pickle(tmp_path)
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("planted"))
    for key, value in {"data": str(data), "allow_pickle": "True", "validation_size": "0"}.items():
        client.log_param(run.info.run_id, key, value)
    Network.create([64, 30, 10]).save(tmp_path / "weights.npz")
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.npz"))
    client.set_terminated(run.info.run_id)

    assert main(["evaluate", f"runs:/{run.info.run_id}"]) == 2
    assert "unpickling a file can run any code" in error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_a_resumed_sweep_never_takes_allow_pickle_from_its_plan(tracking_uri, tmp_path):
    from jobs import sweep_run
    from jobs.sweep import plan_from

    plan = plan_from(None, ["validation_size=300", "allow_pickle=true", "eta=0.5,3.0"], None)
    assert all(t.config.allow_pickle for t in plan.trials)
    parent = sweep_run.start(plan, tracking_uri)

    resumed = sweep_run.load_plan(tracking_uri, parent)
    assert not resumed.base.allow_pickle and not any(t.config.allow_pickle for t in resumed.trials)
    assert [t.config.eta for t in resumed.trials] == [0.5, 3.0]  # the rest of the plan as it was
    trusted = sweep_run.load_plan(tracking_uri, parent, allow_pickle=True)  # --allow-pickle, typed by its user
    assert trusted.base.allow_pickle and all(t.config.allow_pickle for t in trusted.trials)


def test_a_submitted_sweep_passes_allow_pickle_only_from_its_command_line():
    from jobs.submit import sweep_entrypoint

    assert "--allow-pickle" not in sweep_entrypoint("abc", "http://127.0.0.1:5000", None, None)
    assert "--allow-pickle" in sweep_entrypoint("abc", "http://127.0.0.1:5000", None, None, allow_pickle=True)


def test_the_ray_token_is_written_for_its_owner_only(tmp_path, monkeypatch):
    from cluster.auth import ensure_token, read_token, token_warning

    path = tmp_path / "new-folder" / "token"  # neither the file nor its folder exists yet
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    ensure_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = read_token()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 random bits in hex, as Ray's own generator writes
    assert token_warning() is None
    ensure_token()
    assert read_token() == token  # an existing token is kept

    path.chmod(0o644)
    warning = token_warning()
    assert "can be read by other users (mode 0644)" in warning and f"chmod 600 {path}" in warning


def test_cluster_up_with_a_token_path_not_yet_there_creates_it(tmp_path, monkeypatch, capsys):
    """`cluster up` writes the token first; its failure to start Ray later is not this test's concern."""
    from jobs import local_cluster

    path = tmp_path / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setattr(local_cluster, "_spawn", lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    state = tmp_path / "state"
    try:
        local_cluster.up(state, dashboard_port=local_cluster.free_port(), mlflow_port=local_cluster.free_port())
    except RuntimeError as e:
        assert str(e) == "stop here"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "mlflow.db").stat().st_mode) == 0o600


def test_a_new_sqlite_store_is_its_owners_alone(tmp_path):
    from jobs.store import open_store

    db = tmp_path / "new.db"
    open_store(f"sqlite:///{db}")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert MlflowClient(f"sqlite:///{db}").search_experiments()  # a working store (its default experiment)
