"""What a store, a checkpoint or a plan says never widens what a command does; files that hold secrets
are not readable by others; a run has one driver at a time."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, ROOT, error_line, holding_at
from core import Network
from jobs.cli import main
from jobs.store import program


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


# -- one driver a run

def _tags(**tags) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items()}


def _run(status: str, tags: dict[str, str]):
    from types import SimpleNamespace

    return SimpleNamespace(info=SimpleNamespace(status=status), data=SimpleNamespace(tags=tags))


def test_a_claim_is_live_while_its_process_is():

    from jobs import claims

    here = socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = claims._process_started(sleeper.pid)
        live = _tags(driver_host=here, driver_pid=sleeper.pid, driver_started=started, driver_claim="a")
        assert "pid" in claims.live_driver(_run("RUNNING", live)) and str(sleeper.pid) in claims.live_driver(
            _run("RUNNING", live))
        assert claims.live_driver(_run("KILLED", live)) is None  # an ended run has no driver
        reused = {**live, "driver_started": str(started - 1000)}  # the pid now belongs to another process
        assert claims.live_driver(_run("RUNNING", reused)) is None
        unclaimed = {k: v for k, v in live.items() if k != "driver_claim"}  # a submitted sweep's parent, not driven
        assert claims.live_driver(_run("RUNNING", unclaimed)) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert claims.live_driver(_run("RUNNING", live)) is None  # its process is gone
    now = int(time.time())
    elsewhere = _tags(driver_host="another-host", driver_pid=1, driver_claim="b", driver_seen=now - 30)
    assert "another-host, seen 30 s ago" in claims.live_driver(_run("RUNNING", elsewhere))
    stale = {**elsewhere, "driver_seen": str(now - int(claims.STALE_SECONDS) - 1)}
    assert claims.live_driver(_run("RUNNING", stale)) is None


def _wait_for_checkpoint(client, deadline_s: float = 60):

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and client.list_artifacts(runs[0].info.run_id, "checkpoints"):
            return runs[0].info.run_id
        time.sleep(0.05)
    raise AssertionError("no checkpoint reached the store")


def _gradavg(*args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or {**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_run_has_one_driver_at_a_time(tracking_uri, tmp_path, capsys):
    """A resume while the first driver lives is refused naming it; of two resumes started together, one
    drives and the other is refused; the run then holds every metric once and one model."""

    from jobs.store import logged_models

    args = [str(CONFIGS / "digits.yaml"), "epochs=6", "log_every=10"]
    first = _gradavg("run", *args, cwd=tmp_path, env=holding_at(2))  # holds after epoch 2 until killed
    client = MlflowClient(tracking_uri)
    run_id = _wait_for_checkpoint(client)
    try:
        assert main(["run", *args, "--resume", run_id, "--quiet"]) == 2
        line = error_line(capsys.readouterr().err)
        assert f"--resume {run_id}: its driver (pid {first.pid} on " in line and "is still running" in line
    finally:
        first.send_signal(signal.SIGKILL)  # no handler runs: the run is left RUNNING, its claim dead
        first.communicate(timeout=30)

    both = [_gradavg("run", *args, "--resume", run_id, "--quiet", cwd=tmp_path) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.communicate()[1]) for p in both)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert f"--resume {run_id}: " in outcomes[1][1] and "driver" in outcomes[1][1]
    assert "Traceback" not in outcomes[1][1]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("cost/train", "accuracy/test"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, 7)), key
    assert len(logged_models(tracking_uri, run.info.experiment_id, run_id)) == 1


def test_a_sweep_has_one_driver_at_a_time(tracking_uri, tmp_path):
    from jobs import sweep_run
    from jobs.sweep import plan_from

    plan = plan_from(None, ["validation_size=300", "epochs=3", "eta=0.5,3.0"], None)
    parent = sweep_run.start(plan, tracking_uri, driven_here=False)
    client = MlflowClient(tracking_uri)
    client.set_terminated(parent, "KILLED")  # a sweep stopped before its trials began

    both = [_gradavg("sweep", "--resume", parent, cwd=tmp_path) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.communicate()[1]) for p in both)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert f"sweep --resume {parent}: " in outcomes[1][1] and "driver" in outcomes[1][1]
    children = sweep_run.latest_children(client, parent)
    assert sorted(children) == [1, 2]
    assert len(sweep_run._children(client, parent)) == 2  # one run a trial
    for child in children.values():
        assert child.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "cost/train")) == [1, 2, 3]
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_closed_terminal_ends_the_run_killed(tracking_uri, tmp_path, backend):
    """SIGHUP (a closed terminal, a dropped ssh session) stops a job as SIGTERM does. On Ray, with the output
    going to a file: an interrupt inside a compiled graph's read once crashed the process as it exited."""
    args = [str(CONFIGS / "digits.yaml"), "data=mnist-5k", "sizes=[784,30,10]", "epochs=120"]
    args += ["backend=ray", "workers=2"] if backend == "ray" else []
    with open(tmp_path / "out.log", "w") as out:
        job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *args], cwd=tmp_path, stdout=out,
                               stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               start_new_session=True)
        client = MlflowClient(tracking_uri)
        run_id = _wait_for_checkpoint(client)
        os.killpg(job.pid, signal.SIGHUP)
        job.wait(timeout=60)
    err = (tmp_path / "out.log").read_text()
    assert job.returncode == 128 + signal.SIGHUP, err[-3000:]
    epoch = checkpoint_epoch(client, run_id)
    assert err.splitlines()[-1] == (f"gradavg: interrupted: run {run_id} ended KILLED; continue it from its "
                                    f"checkpoint of epoch {epoch}: {program('gradavg')} run --resume {run_id} "
                                    f"--tracking-uri {tracking_uri}") and "Traceback" not in err
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_run_started_with_nohup_outlives_its_terminal(tracking_uri, tmp_path):
    """`nohup` starts a job with SIGHUP ignored, so that it outlives its terminal: the job keeps it ignored (it
    once installed its own handler, and a closed terminal stopped the run). SIGTERM still stops it: its exit
    status, 128 + the first signal that stopped it, says which did."""
    args = [str(CONFIGS / "digits.yaml"), "epochs=2"]
    job = subprocess.Popen(["nohup", sys.executable, "-m", "jobs.cli", "run", *args], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=holding_at(1),
                           start_new_session=True)
    client = MlflowClient(tracking_uri)
    run_id = _wait_for_checkpoint(client, 120)  # held after epoch 1
    os.killpg(job.pid, signal.SIGHUP)  # the terminal closes: nothing happens
    os.killpg(job.pid, signal.SIGTERM)
    err = job.communicate(timeout=60)[1]
    assert job.returncode == 128 + signal.SIGTERM, err
    assert client.get_run(run_id).info.status == "KILLED"


@pytest.fixture
def stop_signals():
    """SIGTERM stops this process as it stops a job (``jobs.stopping.stop_on_signals``), for one test."""
    from jobs.stopping import STOP_SIGNALS, stop_on_signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, *STOP_SIGNALS)}
    stop_on_signals()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _stopped_in(monkeypatch, owner, name: str) -> None:
    """The first call of ``owner.name`` is stopped as it begins: SIGTERM arrives, as a Ctrl-C or a `jobs stop`
    can at any moment. The call itself runs only if the stop waits for it."""
    real, calls = getattr(owner, name), []

    def stopped(*args, **kwargs):
        if not calls:
            calls.append(name)
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, at Python's next instruction
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, stopped)


def test_a_stop_while_a_run_is_opened_ends_it_killed_and_written_whole(tracking_uri, monkeypatch, stop_signals,
                                                                       capsys):
    """Once a sweep's trial was stopped between creating its run and writing its params: the run was left
    RUNNING, unknown to the driver that had opened it. Its last line gives the command that starts it over."""
    from jobs.config import input_params, load_job

    args = ["run", str(CONFIGS / "digits.yaml"), "epochs=2"]
    _stopped_in(monkeypatch, MlflowClient, "log_batch")
    assert main(args) == 128 + signal.SIGTERM
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    assert run.data.params == input_params(load_job(*args[1:2], args[2:]))  # the write it came in was not cut short
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"gradavg: interrupted: run {run.info.run_id} ended KILLED before its first checkpoint; run the job again "
        f"to start over: cd {os.getcwd()} && {program('gradavg')} run {CONFIGS / 'digits.yaml'} epochs=2")


def test_a_stop_before_a_run_is_opened_says_nothing_was_recorded(tracking_uri, monkeypatch, capsys):
    from jobs import run

    def stopped(cfg):
        raise KeyboardInterrupt  # Ctrl-C while the data loads

    monkeypatch.setattr(run, "prepare_data", stopped)
    assert main(["run", str(CONFIGS / "digits.yaml")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "gradavg: interrupted before a run was opened: nothing was " \
                                                       "recorded"
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_stop_that_a_finalizer_swallows_still_stops_the_run(tracking_uri, monkeypatch, stop_signals, capsys):
    """Python only prints an interrupt raised inside a finalizer (a weakref's callback, a __del__): a Ctrl-C that
    landed there as the run logged its results printed a traceback and was lost, the run ending FINISHED."""
    from jobs import artifacts

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next instruction: inside this finalizer
            sum(range(100))

    logged = artifacts.log_model

    def log_model(*args):
        Finalized()
        return logged(*args)

    monkeypatch.setattr(artifacts, "log_model", log_model)
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=2", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    assert err.splitlines()[-1].endswith(f"ended KILLED; continue it from its checkpoint of epoch 2: "
                                         f"{program('gradavg')} run --resume {run.info.run_id} --tracking-uri "
                                         f"{tracking_uri}")


def test_a_stop_after_the_command_is_done_leaves_its_exit_status(tmp_path):
    """A Ctrl-C while the interpreter exits (its threads joined, its exit handlers run) once made a finished
    job's exit status 130, with nothing printed."""
    code = ("import atexit, os, signal, sys\n"
            "from jobs import cli, stopping\n"
            "def done(argv=None):\n"
            "    stopping.stop_on_signals()\n"
            "    return 0\n"
            "cli.main = done\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), sum(range(100))))\n"
            "cli.entry()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (done.returncode, done.stderr) == (0, "")


def test_a_stop_while_a_run_is_claimed_for_a_resume_ends_it_killed(tracking_uri, monkeypatch, stop_signals):
    from jobs import runs
    from jobs.config import load_config
    from jobs.run import run_job

    run_id = run_job(load_config(CONFIGS / "digits.yaml", ["epochs=1"]), tracking_uri, quiet=True).run_id
    _stopped_in(monkeypatch, runs, "reopen")
    with pytest.raises(KeyboardInterrupt, match=f"continue it from its checkpoint of epoch 1: .* --resume {run_id}"):
        run_job(load_config(CONFIGS / "digits.yaml", ["epochs=2"]), tracking_uri, quiet=True, resume=run_id)
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[runs.DRIVER_PID] == str(os.getpid()) and run.data.tags[runs.RESUMED] == "1"  # claimed whole


def test_a_stop_while_a_sweep_is_opened_or_claimed_ends_it_killed(tracking_uri, monkeypatch, stop_signals):
    from jobs import runs, sweep_run
    from jobs.stopping import Interrupted
    from jobs.sweep import plan_from

    plan = plan_from(None, ["validation_size=300", "epochs=2", "eta=0.5,3.0"], None)
    _stopped_in(monkeypatch, MlflowClient, "log_batch")
    with pytest.raises(Interrupted, match=r"ended KILLED before its first trial; continue it: .* sweep --resume"):
        sweep_run.start(plan, tracking_uri)
    client = MlflowClient(tracking_uri)
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert parent.info.status == "KILLED" and parent.data.params["eta"] == "0.5,3.0"
    assert client.list_artifacts(parent.info.run_id, "sweep")  # its plan: a resume can run it

    _stopped_in(monkeypatch, runs, "reopen")  # the resume is stopped as it claims the parent
    with pytest.raises(Interrupted, match=f"sweep {parent.info.run_id} ended KILLED; continue it"):
        sweep_run.run_sweep(plan, tracking_uri, parent.info.run_id, stream=io.StringIO())
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "KILLED" and parent.data.tags[runs.DRIVER_PID] == str(os.getpid())
    assert not sweep_run._children(client, parent.info.run_id)  # no trial began


def checkpoint_epoch(client, run_id: str) -> int:
    from jobs import checkpoint

    return checkpoint.load(client.download_artifacts(run_id, "checkpoints/checkpoint.npz"))[0].epoch


def test_a_store_failing_once_during_a_sweep_resume_deletes_nothing(tracking_uri, tmp_path, monkeypatch):
    import pytest

    from jobs import sweep_run
    from jobs.store import TrackingError
    from jobs.sweep import plan_from

    plan = plan_from(None, ["validation_size=300", "epochs=2", "eta=0.5,3.0"], None)
    parent = sweep_run.start(plan, tracking_uri)
    client = MlflowClient(tracking_uri)
    child = client.create_run(client.get_run(parent).info.experiment_id,
                              tags={"mlflow.parentRunId": parent, "sweep_trial": "1"})
    (tmp_path / "checkpoint.npz").write_bytes(b"a checkpoint")
    client.log_artifact(child.info.run_id, str(tmp_path / "checkpoint.npz"), "checkpoints")
    client.set_terminated(child.info.run_id, "KILLED")
    client.set_terminated(parent, "KILLED")

    calls = []
    listing = MlflowClient.list_artifacts

    def fails_once(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("the store did not answer")
        return listing(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "list_artifacts", fails_once)
    with pytest.raises(TrackingError, match="nothing was changed: run `.*gradavg sweep --resume"):
        sweep_run.run_sweep(plan, tracking_uri, parent)
    assert client.get_run(child.info.run_id).info.lifecycle_stage == "active"  # not deleted
    assert client.get_run(parent).info.status == "KILLED"  # as it was
    assert sweep_run._has_checkpoint(client, child.info.run_id)  # the store answers again: it was there all along


# -- faults that are named, not tracebacks

def test_a_process_without_the_memory_it_needs_says_so_at_once(tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (400_000 * 1024, resource.RLIM_INFINITY))  # `ulimit -v 400000`

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(CONFIGS / "digits.yaml"), "track=false"],
                          cwd=tmp_path, capture_output=True, text=True, preexec_fn=limit, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 60
    line = error_line(done.stderr)
    assert "may use at most 391 MiB of address space (ulimit -v 400000)" in line and "ulimit -v unlimited" in line


def test_running_out_of_memory_is_named_as_such(tracking_uri, monkeypatch, capsys):
    from jobs import artifacts

    def no_memory(self, *args):
        raise MemoryError

    monkeypatch.setattr(artifacts, "log_plots", no_memory)
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=1", "--quiet"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "ran out of memory (MemoryError)" in line and "tracking store" not in line
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"


def test_a_store_locked_for_a_while_is_waited_for_in_silence(tracking_uri, capsys):
    """Another process holds the sqlite store locked for 8 s (longer than sqlite's and MLflow's own waits):
    the job's calls are tried again until it is free, and MLflow's tracebacks never reach the terminal."""
    import sqlite3
    import threading

    from jobs.store import retry_locked

    db = tracking_uri.removeprefix("sqlite:///")
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(8.0, lambda: holder.execute("COMMIT")).start()
    started = time.monotonic()
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=1", "--quiet"]) == 0
    assert time.monotonic() - started > 7  # it waited for the lock
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ERROR mlflow" not in err
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    calls = []
    assert retry_locked(lambda: calls.append(1) or len(calls)) == 1  # a store that answers: one call


def test_a_process_that_may_open_too_few_files_says_so_at_once(tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (12, 12))  # `ulimit -n 12`

    done = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(CONFIGS / "digits.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, preexec_fn=limit, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert "may open at most 12 files at once (ulimit -n 12)" in error_line(done.stderr)


def test_resuming_a_sweep_as_a_run_names_sweep_resume(tracking_uri, capsys):
    from jobs import sweep_run
    from jobs.sweep import plan_from

    parent = sweep_run.start(plan_from(None, ["validation_size=300", "eta=0.5,3.0"], None), tracking_uri)
    assert main(["run", str(CONFIGS / "digits.yaml"), "--resume", parent]) == 2
    expected = f"that run is a sweep's; continue it with `{program('gradavg')} sweep --resume {parent} --tracking-uri"
    assert expected in error_line(capsys.readouterr().err)
