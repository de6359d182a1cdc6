"""Submit jobs to a real Ray head and track them on a real MLflow server, both on 127.0.0.1.

The servers come from `gradavg cluster up` (free ports, a temporary state folder), are shared
by the module, and `gradavg cluster down` stops exactly them at the end. Another Ray head runs
beside them, on Ray's default ports, as a user's own might.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cluster.auth import ensure_token
from conftest import CONFIGS, ROOT
from core import Network
from jobs import local_cluster
from jobs.cli import main
from jobs.data import load_dataset, save_npz, synthetic
from jobs.store import program

pytestmark = [pytest.mark.ray, pytest.mark.server]


RAY_AGENT_PORT = 52365
GRADAVG = program("gradavg")  # as the commands gradavg prints name it  # Ray's default for the job agent of every head


@contextlib.contextmanager
def plain_head(folder: Path):
    """A plain `ray start --head`, as another user of the machine would run it, in a process group of
    its own; yields its GCS port and dashboard port."""
    ensure_token()
    port, dashboard = local_cluster.free_port(), local_cluster.free_port()
    with open(folder / "ray.log", "wb") as log:
        head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                                 "--port", str(port), "--dashboard-port", str(dashboard),
                                 "--ray-client-server-port", str(local_cluster.free_port()), "--num-cpus", "1",
                                 "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        yield head, port, dashboard
    finally:
        local_cluster._stop_group(head.pid, grace=40)
        with contextlib.suppress(OSError):  # `ray start` names itself the machine's current head
            if current.read_text().strip().endswith(f":{port}"):
                current.unlink()


@pytest.fixture(scope="module")
def neighbour(tmp_path_factory):
    """Another Ray head on the machine before ours, holding Ray's default ports (its job agent's 52365)."""
    with plain_head(tmp_path_factory.mktemp("neighbour")) as (head, port, dashboard):
        deadline, taken_since = time.monotonic() + 120, None
        while not local_cluster._listens(head.pid, RAY_AGENT_PORT):
            assert head.poll() is None and time.monotonic() < deadline, "the neighbouring Ray head did not start"
            # another Ray of this machine holding the port does as well, once it has outlasted the agent's retries
            taken_since = (taken_since or time.monotonic()) if local_cluster._accepts(RAY_AGENT_PORT) else None
            if taken_since and time.monotonic() - taken_since > 10:
                break
            time.sleep(0.5)
        yield dashboard


@pytest.fixture(scope="module")
def late_neighbour(servers, tmp_path_factory):
    """Another Ray head started after ours: `ray start` names it the machine's current head in /tmp/ray,
    where Ray Jobs looks for the head to run a job on unless the head has a temporary folder of its own."""
    with plain_head(tmp_path_factory.mktemp("late-neighbour")) as (head, port, dashboard):
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not (current.exists() and current.read_text().strip().endswith(f":{port}")):
            assert head.poll() is None and time.monotonic() < deadline, "the late Ray head did not start"
            time.sleep(0.5)
        yield port


@pytest.fixture(scope="module")
def servers(neighbour, tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    up = local_cluster.up(state, num_cpus=3, dashboard_port=local_cluster.free_port(),
                          mlflow_port=local_cluster.free_port())
    yield up
    if (state / "cluster.json").exists():  # the last test stops them itself, with a job running
        stopped = local_cluster.down(state)
        assert stopped == ["Ray head", "MLflow server"]
    for pgid in (up.ray_pgid, up.mlflow_pgid):
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)


def submit(servers, capsys, *args, command: str = "submit") -> tuple[int, str, str]:
    code = main([command, *args, "--address", servers.dashboard, "--tracking-uri", servers.tracking_uri])
    captured = capsys.readouterr()
    job_ids = [line for line in captured.out.splitlines() if line.startswith("raysubmit_")]
    assert job_ids, captured.err
    return code, job_ids[0], captured.err


def job_logs(servers, job_id: str) -> str:
    """The end of a job's log, for a failed test's message (the cluster and its logs go with the test)."""
    from jobs import submit as jobs_submit

    return jobs_submit.logs(servers.dashboard, job_id)[-4000:]


def fields(text: str) -> dict[str, str]:
    """`gradavg jobs status`'s lines as {name: value} (a name, two spaces or more, its value)."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())


def runs_of(servers, experiment: str):
    client = MlflowClient(servers.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])


def wait_for_runs(servers, experiment: str, ready, timeout: float, what: str) -> list:
    """The experiment's runs once ``ready(runs)`` holds; fails the test with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = runs_of(servers, experiment)[1]
        if ready(runs):
            return runs
        time.sleep(0.5)
    pytest.fail(what)


def test_submitted_job_is_tracked_on_the_server(servers, late_neighbour, capsys):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    code, job_id, err = submit(servers, capsys, str(CONFIGS / "digits.yaml"), "workers=2", "epochs=3",
                          "experiment=e2e-digits", "--follow")
    assert code == 0
    client, runs = runs_of(servers, "e2e-digits")
    (run,) = runs
    url = (f"{servers.tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
           "?workflowType=machine_learning")
    assert err.splitlines()[-2:] == [f"job {job_id} SUCCEEDED", f"look at it: {url}"]
    assert main(["jobs", "status", job_id, "--address", servers.dashboard]) == 0
    status = fields(capsys.readouterr().out)
    assert {k: status[k] for k in ("job", "status", "command", "mlflow run", "in the UI", "epoch")} == {
        "job": job_id, "status": "SUCCEEDED", "command": f"run {CONFIGS / 'digits.yaml'} workers=2 epochs=3 "
        "experiment=e2e-digits", "mlflow run": f"{run.info.run_id} (FINISHED)", "in the UI": url,
        "epoch": f"3 of 3, validation accuracy {run.data.metrics['accuracy/validation']:.2f}%, test accuracy "
                 f"{run.data.metrics['accuracy/test']:.2f}%"}
    assert run.info.status == "FINISHED" and run.data.tags["ray_jobs"] == job_id
    assert "workers" not in run.data.params and "backend" not in run.data.params  # where it ran: tags
    assert run.data.tags["workers"] == "2" and run.data.tags["backend"] == "ray"
    if head.returncode == 0:  # the job's copy of the project has no .git: the commit travels with it
        assert run.data.tags["git_commit"] == head.stdout.strip()
    assert main(["jobs", "logs", job_id, "--address", servers.dashboard]) == 0
    logs = capsys.readouterr().out
    assert [line.split(":")[0] for line in logs.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for key in ("cost/train", "accuracy/validation", "accuracy/test", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    plots = {"curves", "confusion_matrix", "gradient_norms", "saturated_fraction", "misclassified",
             "first_layer_weights"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {f"plots/{p}.png" for p in plots}
    weights = Network.load(client.download_artifacts(run.info.run_id, "weights.npz"))
    mlflow.set_tracking_uri(servers.tracking_uri)
    try:
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
        model = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    finally:
        mlflow.set_tracking_uri(None)  # later tests take theirs from MLFLOW_TRACKING_URI
    data = load_dataset("digits", validation_size=200)
    assert np.array_equal(model.predict(data.x_test), weights.predict(data.x_test))
    # resumed by its id alone through the cluster: its own config (from its checkpoint), one epoch more
    code, again, err = submit(servers, capsys, "--resume", run.info.run_id, "epochs=4", "--follow")
    assert code == 0, job_logs(servers, again)
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cost/train")] == [1, 2, 3, 4]
    assert resumed.data.tags["ray_jobs"] == f"{job_id}, {again}"
    assert resumed.data.tags["epochs"] == "4"  # how long it trains now
    # once more: the run is complete, which is said here, and no job is sent
    assert main(["submit", "--resume", run.info.run_id, "--address", servers.dashboard, "--tracking-uri",
                 servers.tracking_uri]) == 0
    assert capsys.readouterr().out.startswith(f"run {run.info.run_id} is already complete: it FINISHED after 4 epochs")
    assert main(["jobs", "list", "--address", servers.dashboard]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["SUBMITTED", "STATUS", "JOB", "COMMAND", "MLFLOW", "RUN"]
    rows = {line.split()[3]: line for line in table[1:]}  # by job id, newest first
    assert list(rows).index(again) < list(rows).index(job_id)
    assert re.split(r"\s{2,}", rows[job_id])[1:] == ["SUCCEEDED", job_id, f"run {CONFIGS / 'digits.yaml'} workers=2 "
                                                   "epochs=3 experiment=e2e-digits", run.info.run_id]
    assert re.split(r"\s{2,}", rows[again])[3:] == [f"run --resume {run.info.run_id} epochs=4", run.info.run_id]


def test_rays_status_command_as_printed_works(servers):
    """`cluster up` prints a `ray status` command for its head; pasted into a shell, it answers."""
    command = local_cluster.status_command(servers)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Resources" in done.stdout and "CPU" in done.stdout, done.stderr[-2000:]


def test_a_second_cluster_beside_this_one_is_refused_and_leaves_nothing(servers, neighbour, tmp_path, capsys):
    import psutil

    second = tmp_path / "second"
    for option, port in (("--mlflow-port", servers.tracking_uri.rsplit(":", 1)[1]), ("--dashboard-port", neighbour)):
        ports = {"--dashboard-port": local_cluster.free_port(), "--mlflow-port": local_cluster.free_port(),
                 option: port}
        argv = ["cluster", "up", "--state-dir", str(second)]
        for flag, value in ports.items():
            argv += [flag, str(value)]
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err == f"gradavg: error: port {port} is taken by another process; pass {option} PORT"
        assert not (second / "cluster.json").exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(second) in " ".join(p.info["cmdline"] or [])]


def test_a_path_only_this_machine_has_fails_on_the_cluster(servers, capsys, tmp_path, monkeypatch):
    x, y = synthetic(100, 64, 10)
    save_npz(tmp_path / "mine.npz", x, y)
    monkeypatch.chdir(tmp_path)  # the job runs in the project's copy, where mine.npz is not
    code, job_id, err = submit(servers, capsys, str(CONFIGS / "digits.yaml"), "data=mine.npz", "experiment=e2e-fail",
                               "--follow")
    assert code == 1
    assert main(["jobs", "status", job_id, "--address", servers.dashboard]) == 0
    status = fields(capsys.readouterr().out)
    assert status["status"] == "FAILED" and "mlflow run" not in status  # none was opened
    assert main(["jobs", "logs", job_id, "--address", servers.dashboard]) == 0
    logs = capsys.readouterr().out
    assert "gradavg: error: data='mine.npz': no such file or folder" in logs
    assert "Traceback" not in logs
    assert runs_of(servers, "e2e-fail")[1] == []  # refused before any run was opened


def long_job(servers, capsys, experiment: str) -> str:
    """A submitted job that trains for minutes, once its MLflow run is open (it is, past the job's set-up)."""
    code, job_id, err = submit(servers, capsys, str(CONFIGS / "nielsen-ch1.yaml"), "workers=2", "epochs=500",
                          f"experiment={experiment}")
    assert code == 0
    assert err.splitlines()[-1] == f"follow it: {GRADAVG} jobs logs {job_id} --follow --address {servers.dashboard}"
    wait_for_runs(servers, experiment, lambda runs: runs and runs[0].info.status == "RUNNING", 90,
                  "the job never opened its MLflow run")
    return job_id


def test_stopping_a_job_ends_its_run_killed(servers, capsys):
    job_id = long_job(servers, capsys, "e2e-stop")
    client = MlflowClient(servers.tracking_uri)
    wait_for_runs(servers, "e2e-stop", lambda runs: client.list_artifacts(runs[0].info.run_id, "checkpoints"), 120,
                  "the job never sent a checkpoint")  # so that there is something to continue from
    assert main(["jobs", "stop", job_id, "--address", servers.dashboard]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"job {job_id} STOPPED"
    (run,) = runs_of(servers, "e2e-stop")[1]
    assert err.splitlines()[-1] == (f"gradavg: its run {run.info.run_id} ended KILLED; continue it: {GRADAVG} submit "
                                    f"--resume {run.info.run_id} --address {servers.dashboard} --tracking-uri "
                                    f"{servers.tracking_uri}")
    deadline = time.monotonic() + 120
    while runs_of(servers, "e2e-stop")[1][0].info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runs_of(servers, "e2e-stop")[1][0].info.status == "KILLED"


def test_an_unknown_job_is_one_line(servers, capsys):
    assert main(["jobs", "status", "raysubmit_nope", "--address", servers.dashboard]) == 2
    assert "no job 'raysubmit_nope'" in capsys.readouterr().err


def test_a_submitted_sweep_runs_its_trials_side_by_side_on_the_cluster(servers, capsys):
    from jobs.config import replace
    from jobs.run import run_job
    from jobs.sweep import plan_from
    from jobs.sweep_run import latest_children

    keys = [str(CONFIGS / "digits.yaml"), "epochs=4", "eta=0.5,3.0,1.0", "experiment=e2e-sweep"]
    code, job_id, err = submit(servers, capsys, *keys, "--follow", command="sweep")
    assert code == 0, job_logs(servers, job_id)
    client, runs = runs_of(servers, "e2e-sweep")
    (parent,) = [r for r in runs if "sweep_keys" in r.data.tags]
    assert parent.info.status == "FINISHED" and len(runs) == 4
    children = latest_children(client, parent.info.run_id)
    spans = sorted((c.info.start_time, c.info.end_time) for c in children.values())
    assert spans[1][0] < spans[0][1]  # the second trial started before the first had ended: side by side
    for trial in plan_from(keys[0], keys[1:], None).trials:
        child = children[trial.number]
        assert child.info.status == "FINISHED" and child.data.tags["threads"] == "1"
        alone = run_job(replace(trial.config, track=False, threads=0, run_name=None), quiet=True).state.network
        weights = Network.load(client.download_artifacts(child.info.run_id, "weights.npz"))
        assert np.array_equal(weights.params, alone.params)  # the same bits as the trial run alone, here
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children.values()}
    assert main(["jobs", "logs", job_id, "--address", servers.dashboard]) == 0
    logs = capsys.readouterr().out
    assert "3 at a time on the Ray cluster" in logs and "best: trial" in logs


def test_stopping_a_submitted_sweep_leaves_no_run_running(servers, capsys):
    code, job_id, err = submit(servers, capsys, str(CONFIGS / "nielsen-ch1.yaml"), "validation_size=500", "epochs=500",
                          "eta=0.5,3.0", "experiment=e2e-sweep-stop", command="sweep")
    assert code == 0
    # both trials under way
    wait_for_runs(servers, "e2e-sweep-stop", lambda runs: len(runs) == 3 and
                  all(r.info.status == "RUNNING" for r in runs), 120, "the sweep's trials never started")
    assert main(["jobs", "stop", job_id, "--address", servers.dashboard]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id} STOPPED"
    runs = runs_of(servers, "e2e-sweep-stop")[1]
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}


def test_cluster_down_stops_the_jobs_first_and_their_runs_end_killed(servers, capsys):
    """Last in this module: it stops the module's servers."""
    long_job(servers, capsys, "e2e-down")
    assert main(["cluster", "down", "--state-dir", servers.state_dir]) == 0
    assert capsys.readouterr().out.strip() == ("stopped: 1 running job (each ends its run KILLED), Ray head, "
                                               "MLflow server")
    store = MlflowClient(f"sqlite:///{Path(servers.state_dir) / 'mlflow.db'}")  # the server is gone: its file
    (run,) = store.search_runs([store.get_experiment_by_name("e2e-down").experiment_id])
    assert run.info.status == "KILLED"
