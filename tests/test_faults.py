"""Ray workers that fail change nothing: a killed worker, two dying in one step, a failed compiled graph, a
hung worker, bit for bit; workers that keep dying stop the job resumable; too many to place are refused."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import jobs.run
from cluster.driver import RayBackend
from cluster.errors import WorkerFailuresError
from conftest import CONFIGS, ROOT
from core import Network
from jobs import checkpoint
from jobs.backends import LocalBackend, make_backend
from jobs.cli import main
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.train import train

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]  # one cluster for the module
DIGITS = str(CONFIGS / "digits.yaml")


class KillingRayBackend(RayBackend):
    """A real RayBackend whose first worker's process is killed outright after ``after`` steps
    (its pid as the backend knows it: a worker running a compiled graph answers no other call)."""

    def __init__(self, *args, after: int, times: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.after, self.times, self.steps = after, times, 0

    def chunk_sums(self, network, batch):
        self.steps += 1
        if self.steps >= self.after and self.times > 0:
            self.times -= 1
            os.kill(self.pids[0], signal.SIGKILL)
        return super().chunk_sums(network, batch)


def digits_cfg(*overrides):
    values = dict(text.split("=", 1) for text in ["epochs=3", "batch_size=100", "chunk_size=30", *overrides])
    return load_config(CONFIGS / "digits.yaml", [f"{k}={v}" for k, v in values.items()])  # later ones win


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_a_killed_worker_changes_no_bit(transport):
    cfg = digits_cfg()
    data = load_dataset("digits", cfg.validation_size)
    heard = []
    backend = KillingRayBackend(2, cfg.chunk_size, after=5, on_failure=heard.append, transport=transport)
    state = train(cfg, data, backend)
    local = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1))
    assert np.array_equal(state.network.params, local.network.params)
    assert backend.failures == 1 and state.history[-1].worker_failures == 1
    assert "worker 1 died" in heard[-1] and "computes its chunks again" in heard[-1]
    # a compiled graph does not outlive a worker: the tasks transport carries the job on
    assert backend.transport == "tasks"
    if transport == "compiled":
        assert len(heard) == 2 and "compiled graph stopped" in heard[0] and "goes on with transport=tasks" in heard[0]
    else:
        assert len(heard) == 1


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_two_workers_dying_in_one_step_with_no_room_for_new_ones_change_no_bit(transport):
    """Two of three workers die before the same step and no new worker can be placed: the survivor
    computes all three shares, and each death counts once."""
    cfg = digits_cfg("epochs=2")
    data = load_dataset("digits", cfg.validation_size)
    heard = []

    class LosingTwo(RayBackend):
        steps = 0

        def chunk_sums(self, network, batch):
            self.steps += 1
            if self.steps == 5:
                for pid in self.pids[1:]:
                    os.kill(pid, signal.SIGKILL)
                self.num_cpus = 1000  # every new worker asks for more CPUs than the cluster has
            return super().chunk_sums(network, batch)

    backend = LosingTwo(3, cfg.chunk_size, on_failure=heard.append, replace_timeout=2, transport=transport)
    state = train(cfg, data, backend)
    local = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1))
    assert np.array_equal(state.network.params, local.network.params)
    assert backend.failures == 2 and len(backend.pids) == 1  # the survivor (close() lets the actors go)
    deaths = [m for m in heard if "no new worker could be placed" in m]
    assert len(deaths) == 2 and "failure 2 of at most 3" in deaths[1]


KILLED_WORKER_DRIVER = """
import os, signal, sys
import numpy as np
from cluster.connect import end_process
from cluster.driver import RayBackend
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.train import train

class Killing(RayBackend):
    steps = 0
    def chunk_sums(self, network, batch):
        self.steps += 1
        if self.steps == 5:
            os.kill(self.pids[0], signal.SIGKILL)
        return super().chunk_sums(network, batch)

cfg = load_config(sys.argv[1], ["epochs=2", "batch_size=100", "chunk_size=30", "track=false"])
backend = Killing(2, cfg.chunk_size, transport="compiled")
np.save(sys.argv[2], train(cfg, load_dataset("digits", cfg.validation_size), backend).network.params)
assert backend.failures == 1 and backend.transport == "tasks"
end_process(0)
"""


def test_a_driver_that_survived_a_killed_compiled_graph_worker_exits_0(tmp_path):
    """Its own embedded cluster, a worker killed under the compiled transport: the process ends
    with status 0, not a crash at exit, and its weights are the single process's."""
    out = tmp_path / "weights.npy"
    proc = subprocess.run([sys.executable, "-c", KILLED_WORKER_DRIVER, DIGITS, str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = digits_cfg("epochs=2")
    local = train(cfg, load_dataset("digits", cfg.validation_size), LocalBackend(cfg.chunk_size, threads=1))
    assert np.array_equal(np.load(out), local.network.params)


class FailingGraph:
    """A compiled graph whose ``fails``-th execution fails as a channel that timed out does."""

    def __init__(self, graph, fails: int):
        self.graph, self.fails = graph, fails

    def execute(self, work):
        self.fails -= 1
        if self.fails == 0:
            from ray.exceptions import RayChannelTimeoutError

            raise RayChannelTimeoutError("Timed out acquiring the read lock")
        return self.graph.execute(work)

    def teardown(self):
        self.graph.teardown()


def test_a_failed_compiled_graph_hands_the_job_to_tasks_with_the_same_bits():
    cfg = digits_cfg()
    data = load_dataset("digits", cfg.validation_size)
    heard = []

    class Failing(RayBackend):
        def start(self, network, x, labels):
            super().start(network, x, labels)
            self._graph = FailingGraph(self._graph, fails=7)

    backend = Failing(2, cfg.chunk_size, on_failure=heard.append, transport="compiled")
    state = train(cfg, data, backend)
    local = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1))
    assert np.array_equal(state.network.params, local.network.params)
    assert backend.transport == "tasks" and backend.failures == 0
    (message,) = heard
    assert re.match(r"the compiled graph stopped: a step took longer than \d+ s;", message)  # 100× the slowest, >= 60
    assert message.endswith("the job goes on with transport=tasks, with the same results")


def test_workers_that_keep_dying_stop_the_job_with_a_checkpoint_to_resume(tracking_uri, capsys, monkeypatch):
    made = []

    def dying_backend(cfg, on_failure=None):
        made.append(KillingRayBackend(cfg.workers, cfg.chunk_size, max_worker_failures=cfg.max_worker_failures,
                                      on_failure=on_failure, after=20, times=3))
        return made[-1]

    monkeypatch.setattr(jobs.run, "make_backend", dying_backend)
    args = ["run", DIGITS, "backend=ray", "workers=2", "batch_size=100", "chunk_size=30", "epochs=3",
            "max_worker_failures=1", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Ray workers failed 2 times, more than max_worker_failures=1" in err
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and f"--resume {run.info.run_id}" in err
    assert run.data.tags["worker_failures"] == "1"
    saved, _ = checkpoint.load(client.download_artifacts(run.info.run_id, "checkpoints/checkpoint.npz"))
    assert saved.epoch == 1  # 13 steps an epoch: the second failure came in epoch 2

    monkeypatch.setattr(jobs.run, "make_backend", make_backend)
    assert main(["run", DIGITS, "backend=ray", "workers=2", "batch_size=100", "chunk_size=30", "epochs=3",
                 "--resume", run.info.run_id, "--quiet"]) == 0
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    weights = Network.load(client.download_artifacts(run.info.run_id, "weights.npz")).params
    cfg = digits_cfg()
    local = train(cfg, load_dataset("digits", cfg.validation_size), LocalBackend(cfg.chunk_size, threads=2))
    assert np.array_equal(weights, local.network.params)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy/test")] == [1, 2, 3]


def test_more_workers_than_can_be_placed_refused_before_any_run(tracking_uri, capsys):
    started = time.perf_counter()
    assert main(["run", DIGITS, "backend=ray", "workers=40"]) == 2
    assert time.perf_counter() - started < 15
    assert "workers=40 with num_cpus=1 need 40 CPUs but the Ray cluster has 3" in capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_worker_failures_surface_even_without_tracking():
    with pytest.raises(WorkerFailuresError, match="more than max_worker_failures=0"):
        cfg = digits_cfg()
        train(cfg, load_dataset("digits", cfg.validation_size),
              KillingRayBackend(2, cfg.chunk_size, max_worker_failures=0, after=3))



class StoppingRayBackend(RayBackend):
    """A real RayBackend whose first worker's process is stopped (SIGSTOP: alive, answering nothing) before
    step ``after``: a hung worker, not a dead one."""

    def __init__(self, *args, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.after, self.steps, self.stopped = after, 0, None

    def chunk_sums(self, network, batch):
        self.steps += 1
        if self.steps == self.after:
            self.stopped = self.pids[0]
            self.bound = self._step_timeout()  # how long the hung step is waited for: 100 × the slowest step, >= 2 s
            os.kill(self.stopped, signal.SIGSTOP)
        return super().chunk_sums(network, batch)

    def _step_timeout(self):  # at most 3 s: on a loaded machine 100 × the slowest step can be a minute
        return min(super()._step_timeout(), 3.0)


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_a_hung_worker_is_given_up_after_a_bound_and_changes_no_bit(transport):
    cfg = digits_cfg()
    data = load_dataset("digits", cfg.validation_size)
    heard = []
    backend = StoppingRayBackend(2, cfg.chunk_size, after=5, on_failure=heard.append, transport=transport,
                                 step_floor=2.0)
    try:
        started = time.monotonic()
        state = train(cfg, data, backend)
        assert time.monotonic() - started < backend.bound + 60  # the bound (and the rest of training), not forever
    finally:
        if backend.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(backend.stopped, signal.SIGCONT)
    local = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1))
    assert np.array_equal(state.network.params, local.network.params)
    assert backend.failures == 1 and state.history[-1].worker_failures == 1
    assert "worker 1 died (it did not answer within" in heard[-1] and "was given up" in heard[-1]
    assert backend.transport == "tasks"
