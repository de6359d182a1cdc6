"""Sharded datasets on Ray: workers hold only their blocks, and the bits are the single process's,
for any worker count, transport, dead worker or resumed driver."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import jobs.run
import jobs.shards
from cluster.driver import RayBackend
from conftest import CONFIGS, error_line
from core import Network
from jobs import shards
from jobs.backends import LocalBackend, make_backend
from jobs.cli import main
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.data import shard as data_shard
from jobs.train import train

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]  # one cluster for the module
DIGITS = str(CONFIGS / "digits.yaml")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "digits"
    data_shard("digits", out, rows_per_block=100, validation_size=200)
    return out


def cfg_for(folder, *overrides):
    values = dict(text.split("=", 1) for text in [f"data={folder}", "shuffle=blocks", "mix_blocks=3", "epochs=2",
                                                  "batch_size=50", "chunk_size=12", "log_every=7",
                                                  "diagnostics_every=20", *overrides])
    return load_config(CONFIGS / "digits.yaml", [f"{k}={v}" for k, v in values.items()])


def driver_view(folder):
    return load_dataset(str(folder), 200, rows=False)


@pytest.fixture(scope="module")
def single_process(folder):
    cfg = cfg_for(folder)
    return train(cfg, load_dataset(str(folder), 200), LocalBackend(cfg.chunk_size, threads=2))


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_blocks_on_1_to_4_workers_are_the_single_process_bits(folder, single_process, transport):
    cfg = cfg_for(folder)
    for workers, num_cpus in ((1, 1), (2, 1), (3, 1), (4, 0.75)):
        backend = RayBackend(workers, cfg.chunk_size, num_cpus=num_cpus, transport=transport)
        state = train(cfg, driver_view(folder), backend)
        assert backend.transport == transport
        assert np.array_equal(state.network.params, single_process.network.params), f"{workers} workers"
        for a, b in zip(state.history, single_process.history):  # every figure, added in block order
            assert (a.train_cost, a.test_cost, a.validation_accuracy, a.diagnostics) == \
                (b.train_cost, b.test_cost, b.validation_accuracy, b.diagnostics)
        # each worker held only its blocks: disjoint, together every block, evenly (within a block)
        train_blocks = [[s.block for s in held["train"]] for held in backend.placement]
        assert sorted(sum(train_blocks, [])) == list(shards.read_manifest(folder).splits["train"])
        sizes = [len(b) for b in train_blocks]
        assert max(sizes) - min(sizes) <= 1


def test_global_shuffle_on_ray_from_the_folder_is_the_bits_of_the_source_in_memory(folder):
    cfg = cfg_for(folder, "shuffle=global")
    original = load_config(DIGITS, ["epochs=2", "batch_size=50", "chunk_size=12", "log_every=7",
                                    "diagnostics_every=20"])
    local = train(original, load_dataset("digits", 200), LocalBackend(12, threads=2))
    backend = RayBackend(2, 12)
    state = train(cfg, driver_view(folder), backend)
    assert np.array_equal(state.network.params, local.network.params)
    assert state.history[-1].diagnostics == local.history[-1].diagnostics


class KillingRayBackend(RayBackend):
    def __init__(self, *args, after: int, kill: int = 0, starve: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.after, self.kill, self.starve, self.steps = after, kill, starve, 0

    def chunk_sums(self, network, batch):
        self.steps += 1
        if self.steps == self.after:
            os.kill(self.pids[self.kill], signal.SIGKILL)
            if self.starve:
                self.num_cpus = 1000  # no new worker can be placed: the survivors take the blocks over
        return super().chunk_sums(network, batch)


@pytest.mark.parametrize("starve", [False, True], ids=["replaced", "taken-over"])
@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_a_killed_worker_s_blocks_are_loaded_again_and_change_no_bit(folder, single_process, transport, starve):
    cfg = cfg_for(folder)
    heard = []
    backend = KillingRayBackend(3, cfg.chunk_size, after=9, kill=1, starve=starve, transport=transport,
                                on_failure=heard.append, replace_timeout=3)
    state = train(cfg, driver_view(folder), backend)
    assert np.array_equal(state.network.params, single_process.network.params)
    assert backend.failures == 1
    train_blocks = [[s.block for s in held["train"]] for held in backend.placement]
    if starve:
        assert len(train_blocks) == 2 and "no new worker could be placed" in heard[-1]
        assert sorted(sum(train_blocks, [])) == list(shards.read_manifest(folder).splits["train"])
    else:
        assert len(train_blocks) == 3 and "a new worker computes its chunks again" in heard[-1]


def test_the_driver_reads_no_training_row(folder, tracking_uri, monkeypatch, capsys):
    """A Ray driver of a sharded dataset reads the manifest and one test block (a sample for the plots and
    the model's input example), never a training, validation or other test block."""
    read = []
    real = jobs.shards.load_blocks

    def recording(specs, dtype):
        read.extend(spec.block for spec in specs)
        return real(specs, dtype)

    monkeypatch.setattr(jobs.shards, "load_blocks", recording)
    assert main(["run", DIGITS, f"data={folder}", "shuffle=blocks", "backend=ray", "workers=2", "epochs=2",
                 "--quiet"]) == 0
    manifest = shards.read_manifest(folder)
    assert read == [manifest.splits["test"][0]]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["dataset_digest"] == manifest.digest
    names = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/confusion_matrix.png" in names and "plots/misclassified.png" in names
    local = train(load_config(DIGITS, [f"data={folder}", "shuffle=blocks", "epochs=2"]),
                  load_dataset(str(folder), 200), LocalBackend(500))
    weights = Network.load(client.download_artifacts(run.info.run_id, "weights.npz")).params
    assert np.array_equal(weights, local.network.params)
    assert f"{100 * local.history[-1].test_accuracy:.2f}%" in capsys.readouterr().out


def test_a_block_unreadable_when_a_worker_is_replaced_stops_the_job_resumable(folder, tmp_path, tracking_uri,
                                                                              monkeypatch, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = shards.read_manifest(copy)
    made = []

    class Damaging(KillingRayBackend):
        def chunk_sums(self, network, batch):
            if self.steps + 1 == self.after:  # the killed worker's first training block goes bad
                victim = self.placement[self.kill]["train"][0]
                os.rename(victim.x_path, victim.x_path + ".away")
                made.append(victim)
            return super().chunk_sums(network, batch)

    def backend(cfg, on_failure=None):
        # in epoch 2 (124 steps an epoch): epoch 1's checkpoint is saved
        return Damaging(cfg.workers, cfg.chunk_size, on_failure=on_failure, after=150, kill=1)

    monkeypatch.setattr(jobs.run, "make_backend", backend)
    args = ["run", DIGITS, f"data={copy}", "shuffle=blocks", "backend=ray", "workers=2", "epochs=3", "--quiet"]
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    (victim,) = made
    assert f"block {victim.block} on " in line and victim.x_path in line and "is missing" in line
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and f"--resume {run.info.run_id}" in line

    os.rename(victim.x_path + ".away", victim.x_path)  # the file restored: the run resumes to the same bits
    monkeypatch.setattr(jobs.run, "make_backend", make_backend)
    assert main([*args, "--resume", run.info.run_id]) == 0
    weights = Network.load(client.download_artifacts(run.info.run_id, "weights.npz")).params
    local = train(load_config(DIGITS, [f"data={copy}", "shuffle=blocks", "epochs=3"]),
                  load_dataset(str(copy), 200), LocalBackend(500))
    assert np.array_equal(weights, local.network.params)
    assert manifest.digest == shards.read_manifest(copy).digest


def test_a_block_missing_everywhere_is_named_with_its_file(folder, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "block-00003.y.npy").unlink()
    assert main(["run", DIGITS, f"data={copy}", "shuffle=blocks", "backend=ray", "workers=2", "track=false"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "block 3: " in line and str(copy / "block-00003.x.npy") in line and "missing on every node" in line
    assert main(["run", DIGITS, f"data={copy}", "backend=ray", "workers=2", "track=false"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "block 3 on " in line and "every worker reads every training block" in line


def test_a_killed_driver_resumes_blocks_to_the_same_bits(folder, tracking_uri, tmp_path, capsys):
    import subprocess
    import sys
    import time

    from conftest import holding_at

    args = [DIGITS, f"data={folder}", "shuffle=blocks", "backend=ray", "workers=2", "epochs=6", "log_every=50"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", *args], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=holding_at(3))
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # killed once its checkpoint has landed, mid-training (held after epoch 3)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and client.list_artifacts(runs[0].info.run_id, "checkpoints"):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started: nothing runs a handler
    proc.wait(timeout=30)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "RUNNING"
    assert len(client.get_metric_history(run.info.run_id, "cost/train")) < 6

    assert main(["run", *args, "--resume", run.info.run_id, "--quiet"]) == 0  # its driver is gone: taken over
    capsys.readouterr()
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "cost/train")) == list(range(1, 7))
    weights = Network.load(client.download_artifacts(run.info.run_id, "weights.npz")).params
    local = train(load_config(DIGITS, args[1:3] + ["epochs=6", "log_every=50"]), load_dataset(str(folder), 200),
                  LocalBackend(500))
    assert np.array_equal(weights, local.network.params)


def test_a_manifest_changed_after_a_run_started_is_named_on_resume(folder, tmp_path, tracking_uri, capsys):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    args = ["run", DIGITS, f"data={copy}", "shuffle=blocks", "epochs=1", "--quiet"]
    assert main(args) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"] = manifest["splits"]["train"][::-1]  # the same blocks, another order
    (copy / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*args[:-2], "epochs=2", "--resume", run.info.run_id]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"this config changes what the run computes (the contents of data={copy} (sha256" in line
