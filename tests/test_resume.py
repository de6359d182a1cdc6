"""Faults without a Ray cluster: a killed and resumed driver to the same bits, refused resumes,
divergence, whole-or-absent and damaged checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, ROOT, error_line, holding_at
from core import Network
from jobs import checkpoint
from jobs.backends import LocalBackend
from jobs.cli import main
from jobs.config import load_config, load_job
from jobs.data import load_dataset
from jobs.store import program
from jobs.train import train

DIGITS = str(CONFIGS / "digits.yaml")


def test_a_killed_driver_resumes_to_the_same_bits(tracking_uri, tmp_path, capsys):
    args = [DIGITS, "epochs=6", "log_every=10"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=holding_at(3))
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once its checkpoint has landed, mid-training (held after epoch 3)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and client.list_artifacts(runs[0].info.run_id, "checkpoints"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the run is left RUNNING
    proc.wait(timeout=30)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"
    assert len(client.get_metric_history(run_id, "cost/train")) < 6

    assert main(["runs", "repair"]) == 0
    assert f"{run_id}: ended KILLED (its driver is gone)" in capsys.readouterr().out
    assert client.get_run(run_id).info.status == "KILLED"

    assert main(["run", *args, "--resume", run_id, "--quiet"]) == 0
    capsys.readouterr()
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["resumed"] == "1"
    for key in ("cost/train", "accuracy/test", "epoch_seconds", "layer3/grad_w_norm"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, 7)), key
    cfg = load_config(CONFIGS / "digits.yaml", args[1:])
    data = load_dataset(cfg.data, cfg.validation_size)
    steps = [m.step for m in client.get_metric_history(run_id, "batch_cost")]
    assert sorted(steps) == list(range(10, 6 * data.y_train.size // 10 + 1, 10))  # none twice
    weights = Network.load(client.download_artifacts(run_id, "weights.npz")).params
    uninterrupted = train(cfg, data, LocalBackend(cfg.chunk_size))
    assert np.array_equal(weights, uninterrupted.network.params)


def test_a_resume_that_would_change_the_result_is_refused(tracking_uri, capsys):
    assert main(["run", DIGITS, "epochs=1", "--quiet"]) == 0
    run_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    assert main(["run", DIGITS, "epochs=2", "eta=0.5", "seed=3", "--resume", run_id]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"gradavg: error: --resume {run_id}: this config changes what the run computes")
    assert "eta: 3.0 -> 0.5" in err and "seed: 0 -> 3" in err and "--force" in err
    assert len(err.splitlines()) == 1
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"
    assert main(["run", DIGITS, "epochs=2", "eta=0.5", "--resume", run_id, "--force", "--quiet"]) == 0
    # forced: the run says so where a person reads it (once nothing did, and its config.yaml still said 3.0)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["forced"] == "from epoch 1: eta: 3.0 -> 0.5"
    assert run.info.run_name == "digits epochs=2" and run.data.params["eta"] == "3.0"  # a param cannot change
    assert "Resumed with --force from epoch 1: eta: 3.0 -> 0.5 (its params are the values it started with)." in \
        run.data.tags["mlflow.note.content"]
    assert load_job(client.download_artifacts(run_id, "config.yaml"), []).eta == 0.5
    assert main(["run", "--resume", run_id, "epochs=3", "--quiet"]) == 0  # its own config now: nothing forced
    assert "Resumed with --force from epoch 1: eta: 3.0 -> 0.5" in \
        client.get_run(run_id).data.tags["mlflow.note.content"]  # the earlier --force is still said


def test_resume_of_a_run_that_does_not_exist(tracking_uri, capsys):
    assert main(["run", DIGITS, "--resume", "0123456789abcdef0123456789abcdef"]) == 2
    assert "no such run" in capsys.readouterr().err


def test_divergence_fails_the_run_and_keeps_the_last_good_checkpoint(tracking_uri, capsys):
    # L2 decay this strong multiplies the weights by about -51 a step: they overflow in epoch 2
    assert main(["run", DIGITS, "lmbda=21459", "epochs=3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "lmbda=21459.0" in err
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    saved, _ = checkpoint.load(client.download_artifacts(run.info.run_id, "checkpoints/checkpoint.npz"))
    assert saved.epoch == 1 and np.all(np.isfinite(saved.network.params))


def test_an_unreachable_ray_address_fails_fast(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", DIGITS, "backend=ray", "track=false"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "127.0.0.1:1"})
    assert time.perf_counter() - started < 30
    assert proc.returncode == 2
    assert error_line(proc.stderr).startswith("gradavg: error: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:1")


def test_a_checkpoint_is_whole_or_absent(tmp_path, monkeypatch):
    cfg = load_config(DIGITS, ["epochs=1"])
    state = train(cfg, load_dataset("digits", cfg.validation_size), LocalBackend(cfg.chunk_size, threads=1))
    path = checkpoint.save(state, cfg, tmp_path / "checkpoint.npz")
    loaded, loaded_cfg = checkpoint.load(path)
    assert np.array_equal(loaded.network.params, state.network.params) and loaded_cfg == cfg
    assert loaded.shuffle.bit_generator.state == state.shuffle.bit_generator.state
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary file left

    class Boom(Exception):
        pass

    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise Boom

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(Boom):
        checkpoint.save(state, cfg, tmp_path / "checkpoint.npz")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]
    assert np.array_equal(checkpoint.load(path)[0].network.params, state.network.params)


def test_a_damaged_checkpoint_is_not_taken_for_a_good_one(tracking_uri, tmp_path, capsys):
    assert main(["run", DIGITS, "epochs=1", "--quiet"]) == 0
    run_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    (tmp_path / "checkpoint.npz").write_bytes(b"PK\x03\x04 cut short")
    MlflowClient(tracking_uri).log_artifact(run_id, str(tmp_path / "checkpoint.npz"), "checkpoints")
    assert main(["run", DIGITS, "epochs=2", "--resume", run_id]) == 2
    assert f"--resume {run_id}: its checkpoint cannot be used" in error_line(capsys.readouterr().err)
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("stop_after", [0, 1, 2])  # the checkpoint taken 2, 1 or 0 epochs before the stop
def test_early_stopping_resumed_from_a_checkpoint_stops_where_it_would_have(tmp_path, stop_after):
    cfg = load_config(DIGITS, ["early_stopping=2", "epochs=40"])
    data = load_dataset("digits", cfg.validation_size)
    whole = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1))
    assert whole.stopped and whole.epoch < 40
    part_cfg = load_config(DIGITS, ["early_stopping=2", f"epochs={whole.epoch - 2 + stop_after}"])
    part = train(part_cfg, data, LocalBackend(cfg.chunk_size, threads=1))
    assert (part.stopped is not None) == (stop_after == 2)
    loaded, _ = checkpoint.load(checkpoint.save(part, part_cfg, tmp_path / "checkpoint.npz"))
    assert (loaded.best_epoch, loaded.best_accuracy, loaded.stopped) == (part.best_epoch, part.best_accuracy,
                                                                         part.stopped)
    resumed = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1), state=loaded)
    assert (resumed.epoch, resumed.stopped) == (whole.epoch, whole.stopped)
    assert np.array_equal(resumed.network.params, whole.network.params)


def test_an_interrupted_run_says_how_to_continue_it_and_that_command_resumes_it_by_id_alone(tracking_uri, tmp_path,
                                                                                             capsys):
    """The last line of an interrupted run is a command to paste; it takes the run's config (chunk_size=5, which
    a restated config would have to repeat) from the checkpoint, and ends where an uninterrupted run does."""
    args = [DIGITS, "epochs=4", "chunk_size=5"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=holding_at(2))
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # held after epoch 2, its checkpoint sent
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and client.list_artifacts(runs[0].info.run_id, "checkpoints"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = run.info.run_id
    assert err.splitlines()[-1] == (f"gradavg: interrupted: run {run_id} ended KILLED; continue it from its "
                                    f"checkpoint of epoch 2: {program('gradavg')} run --resume {run_id} --tracking-uri "
                                    f"{tracking_uri}")
    assert run.info.status == "KILLED" and run.info.run_name == "digits epochs=4 chunk_size=5"
    assert f"Continue it from its checkpoint of epoch 2: `{program('gradavg')} run --resume {run_id}" in \
        run.data.tags["mlflow.note.content"]
    assert main(["run", "--resume", run_id, "eta=1.0"]) == 2  # overrides on the run's own config, checked as ever
    assert "eta: 3.0 -> 1.0" in error_line(capsys.readouterr().err)
    command = err.splitlines()[-1].split(f": {program('gradavg')} ")[1].split()
    assert main(command) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test accuracy ") and "after 4 epochs (digits, local backend)" in out[0]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["resumed"] == "1"
    weights = Network.load(client.download_artifacts(run_id, "weights.npz")).params
    cfg = load_config(CONFIGS / "digits.yaml", args[1:])
    uninterrupted = train(cfg, load_dataset(cfg.data, cfg.validation_size), LocalBackend(cfg.chunk_size))
    assert np.array_equal(weights, uninterrupted.network.params)
