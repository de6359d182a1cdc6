"""`gradavg cluster up|down` and `gradavg submit` where no real Ray or MLflow server is needed.

Stand-ins are small processes in process groups of their own, as the real servers are.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, ROOT, error_line
from jobs import local_cluster, submit
from jobs.cli import main
from jobs.config import load_config
from jobs.local_cluster import ClusterUpError, free_port
from jobs.submit import SubmitError, check_tracking_uri

# A process that notes each signal in LOG. On SIGTERM a leader stops its child in order (SIGUSR1), as
# `ray start --block` stops Ray's processes; with --abandon it exits without it, as MLflow's CLI leaves its worker.
MEMBER = """
import signal, subprocess, sys, time

log, role = sys.argv[1], sys.argv[2]


def note(what):
    with open(log, "a") as f:
        f.write(f"{role}: {what}\\n")


def on(signum, frame):
    note(signal.Signals(signum).name)
    if role == "leader" and "--abandon" not in sys.argv:
        child.send_signal(signal.SIGUSR1)
        child.wait()
    sys.exit(0)


signal.signal(signal.SIGTERM, on)
signal.signal(signal.SIGUSR1, on)
if role == "leader":
    child = subprocess.Popen([sys.executable, __file__, log, "child"])
note("ready")
while True:
    time.sleep(1)
"""


def start_group(tmp_path: Path, name: str, *flags: str) -> tuple[subprocess.Popen, Path]:
    script, log = tmp_path / "member.py", tmp_path / f"{name}.log"
    script.write_text(MEMBER)
    leader = subprocess.Popen([sys.executable, str(script), str(log), "leader", *flags], start_new_session=True)
    deadline = time.monotonic() + 30
    while "child: ready" not in (log.read_text() if log.exists() else ""):  # its handlers are in place
        assert time.monotonic() < deadline, "the stand-in group did not start"
        time.sleep(0.05)
    return leader, log


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def record(state: Path, ray_pgid: int, mlflow_pgid: int) -> None:
    state.mkdir(exist_ok=True)
    (state / "cluster.json").write_text(json.dumps({
        "state_dir": str(state), "ray_pgid": ray_pgid, "ray_port": free_port(), "dashboard": "http://127.0.0.1:9",
        "mlflow_pgid": mlflow_pgid, "tracking_uri": "http://127.0.0.1:9"}))


def test_down_signals_each_leader_first_and_waits_for_its_group(tmp_path):
    (ray, ray_log), (mlflow, mlflow_log) = start_group(tmp_path, "ray"), start_group(tmp_path, "mlflow", "--abandon")
    record(tmp_path / "state", ray.pid, mlflow.pid)

    assert local_cluster.down(tmp_path / "state") == ["Ray head", "MLflow server"]
    # a signal to the whole group would reach Ray's child before its leader could stop it in order
    assert ray_log.read_text().splitlines() == ["leader: ready", "child: ready", "leader: SIGTERM", "child: SIGUSR1"]
    # what a leader leaves behind is signalled next
    assert mlflow_log.read_text().splitlines() == ["leader: ready", "child: ready", "leader: SIGTERM",
                                                   "child: SIGTERM"]
    assert group_gone(ray.pid) and group_gone(mlflow.pid)
    assert not (tmp_path / "state" / "cluster.json").exists()


def test_down_kills_a_group_that_ignores_sigterm(tmp_path):
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)"],
                                stdout=subprocess.PIPE, start_new_session=True)
    assert stubborn.stdout.readline() == b"ready\n"
    assert local_cluster._stop_group(stubborn.pid, grace=1.0)
    assert stubborn.wait(timeout=10) == -9


@pytest.mark.parametrize("option", ["--dashboard-port", "--mlflow-port"])
def test_up_refuses_a_taken_port_and_starts_nothing(option, tmp_path, capsys, monkeypatch):
    def spawn(*args, **kwargs):
        raise AssertionError("a server was started")

    monkeypatch.setattr(local_cluster, "_spawn", spawn)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["cluster", "up", "--state-dir", str(tmp_path / "state")]
        for flag, value in {"--dashboard-port": free_port(), "--mlflow-port": free_port(), option: port}.items():
            argv += [flag, str(value)]
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1] == f"gradavg: error: port {port} is taken by another process; pass {option} PORT"
    assert not (tmp_path / "state").exists()


def test_up_prints_commands_that_work_pasted_in_any_folder(tmp_path, capsys, monkeypatch):
    """`cluster up --state-dir` given relative: the printed `cluster down` names the folder absolutely, and the
    printed `submit` a config that exists wherever it is pasted. A `down` pasted in the wrong folder (the old
    relative hint) stopped nothing and said only that a relative file was absent."""
    import shlex

    started = []

    def up(state_dir, *args):
        started.append(Path(state_dir).resolve())
        return local_cluster.Servers(str(state_dir), 1, 6379, "http://127.0.0.1:8265", 2, "http://127.0.0.1:5000")

    monkeypatch.setattr(local_cluster, "up", up)
    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "up", "--state-dir", "here state"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":   " in line)
    down = shlex.split(lines["stop both"])
    assert down[1:4] == ["cluster", "down", "--state-dir"] and Path(down[4]) == tmp_path / "here state" == started[0]
    job = shlex.split(lines["submit a job"])
    assert Path(job[2]) == CONFIGS / "digits.yaml" and job[1] == "submit"
    monkeypatch.chdir(ROOT)
    assert main(down[1:]) == 0  # nothing there to stop: says where it looked
    assert capsys.readouterr().out.strip() == (f"nothing to stop: {tmp_path / 'here state' / 'cluster.json'} is absent"
                                               " (pass the --state-dir that `cluster up` was given)")


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_up_tells_its_own_server_from_another_on_the_same_port(tmp_path):
    """The port was free when checked, then another process took it: its answer is not our server's."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    other = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    try:
        with pytest.raises(ClusterUpError, match=f"^port {port} is taken by another process; pass --mlflow-port"):
            local_cluster._wait_healthy(sleeper, f"http://127.0.0.1:{port}/health", tmp_path / "log", 30,
                                        "pass --mlflow-port PORT")
    finally:
        other.shutdown()
        sleeper.kill()
        sleeper.wait()

    port = free_port()
    ours = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        local_cluster._wait_healthy(ours, f"http://127.0.0.1:{port}/", tmp_path / "log", 30, "pass --mlflow-port PORT")
    finally:
        ours.kill()
        ours.wait()


def test_an_unreachable_tracking_server_gets_advice_that_submit_accepts(capsys):
    port = free_port()
    code = main(["submit", str(CONFIGS / "digits.yaml"), "--address", "http://127.0.0.1:9",
                 "--tracking-uri", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"gradavg: error: MLflow tracking server http://127.0.0.1:{port} cannot be reached")
    assert "sqlite" not in line
    assert f"`mlflow server --host 127.0.0.1 --port {port}`" in line and "pass its http URL" in line


def test_a_submitted_job_logs_its_epochs_and_knows_its_commit(monkeypatch):
    sent = {}

    class Jobs:
        def submit_job(self, **kwargs):
            sent.update(kwargs)
            return "raysubmit_x"

    monkeypatch.setattr(submit, "client", lambda address: Jobs())
    monkeypatch.setattr(submit, "check_tracking_uri", lambda uri, address: None)
    cfg = load_config(CONFIGS / "digits.yaml", [])
    assert submit.submit(cfg, "http://127.0.0.1:9", "http://127.0.0.1:9") == "raysubmit_x"
    assert "--quiet" not in sent["entrypoint"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the project is not a git checkout")
    assert sent["runtime_env"]["env_vars"]["GRADAVG_GIT_COMMIT"] == head.stdout.strip()
    assert ".git" in sent["runtime_env"]["excludes"]  # why the commit travels in the environment


def test_git_commit_comes_from_the_environment_first(monkeypatch):
    from jobs.store import git_commit

    monkeypatch.setenv("GRADAVG_GIT_COMMIT", "0123abcd")
    assert git_commit() == "0123abcd"


def test_a_tracking_uri_the_cluster_cannot_reach_is_refused_before_sending(capsys):
    code = main(["submit", str(CONFIGS / "digits.yaml"), "--address", "http://127.0.0.1:9",
                 "--tracking-uri", "sqlite:///mlflow.db"])
    assert code == 2 and "run an MLflow tracking server the cluster can reach" in error_line(capsys.readouterr().err)
    with pytest.raises(SubmitError, match="this machine's loopback"):
        check_tracking_uri("http://127.0.0.1:5000", "http://10.0.0.7:8265")
    with pytest.raises(SubmitError, match="a path on this machine"):
        check_tracking_uri("sqlite:////srv/mlflow.db", "http://ray-head:8265")
    check_tracking_uri("sqlite:////srv/mlflow.db", "http://127.0.0.1:8265")  # same machine: reachable


def test_config_mistakes_are_refused_before_sending(capsys):
    assert main(["submit", str(CONFIGS / "digits.yaml"), "eta=0", "--address", "http://127.0.0.1:9",
                 "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "eta=0.0: the learning rate" in error_line(capsys.readouterr().err)


def test_an_unreachable_cluster_is_one_line(capsys):
    assert main(["jobs", "list", "--address", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the Ray cluster at http://127.0.0.1:9" in error_line(capsys.readouterr().err)


def test_a_resume_that_cannot_work_is_refused_before_sending(tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=3", "--quiet"]) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    capsys.readouterr()
    # the cluster's address does not answer: a refusal that reached it would say so instead
    args = ["submit", str(CONFIGS / "digits.yaml"), "--resume", run.info.run_id, "--address", "http://127.0.0.1:9",
            "--tracking-uri", tracking_uri]
    assert main([*args, "epochs=2"]) == 2
    assert "the run has trained all its epochs=3 already, and epochs=2 is fewer" in error_line(capsys.readouterr().err)
    assert main([*args, "epochs=3", "eta=1.0"]) == 2
    assert "this config changes what the run computes (eta: 3.0 -> 1.0)" in error_line(capsys.readouterr().err)
    assert main([*args, "epochs=4", "eta=1.0", "--force"]) == 2  # accepted here; then the cluster is unreachable
    assert "cannot reach the Ray cluster at http://127.0.0.1:9" in error_line(capsys.readouterr().err)
    assert main([*args, "epochs=3"]) == 0  # the run is complete: said here, and nothing is sent (nowhere to send it)
    assert capsys.readouterr().out.startswith(f"run {run.info.run_id} is already complete: it FINISHED after 3 epochs")
