"""Training across two real Ray nodes: each node in a network namespace of its own, with its own
address, their traffic over TCP between them (``bench.two_nodes``). Needs root and iproute2."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from bench import two_nodes
from conftest import ROOT
from jobs.backends import LocalBackend
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.train import train

pytestmark = [pytest.mark.ray, pytest.mark.skipif(two_nodes.available() is not None,
                                                  reason=str(two_nodes.available()))]
DRIVER = str(ROOT / "tests" / "two_node_driver.py")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    with two_nodes.two_nodes(tmp_path_factory.mktemp("two-nodes")) as made:
        yield made


def local_run() -> np.ndarray:
    sys.path.insert(0, str(ROOT / "tests"))
    from two_node_driver import OVERRIDES

    cfg = load_config(None, OVERRIDES)
    return train(cfg, load_dataset("digits"), LocalBackend(cfg.chunk_size, threads=1)).network.params


def drive(nodes, tmp_path, transport: str, *extra: str) -> dict:
    out = tmp_path / "weights.npy"
    proc = nodes.run([sys.executable, DRIVER, str(out), transport, *extra], capture_output=True, text=True,
                     timeout=300, env_extra={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]  # the driver exits cleanly, whatever happened to a worker
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["weights"] = np.load(out)
    return report


@pytest.mark.parametrize("transport", ["auto", "compiled"])
def test_training_across_two_real_nodes_matches_one_process(nodes, tmp_path, transport):
    """auto takes actor calls between nodes (they measured faster there); a compiled graph works too."""
    report = drive(nodes, tmp_path, transport)
    assert sorted(report["addresses"]) == [two_nodes.HEAD_IP, two_nodes.WORKER_IP], "one worker on each node"
    assert report["transport"] == ("tasks" if transport == "auto" else "compiled")
    assert report["failures"] == 0
    assert np.array_equal(report["weights"], local_run())


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_losing_a_real_node_mid_training_changes_no_bit(nodes, tmp_path, transport):
    """The second node is killed outright in the fourth step: its worker dies with it, no CPU is left
    for a new one, so the worker on the head covers its chunks; the weights are the same bits. A
    compiled graph hands the job to tasks first. The driver exits 0 (checked in ``drive``)."""
    if transport == "tasks":  # the node the previous test killed comes back first
        nodes.start_worker_node()
    report = drive(nodes, tmp_path, transport, nodes.worker_ns)
    assert report["transport"] == "tasks" and report["failures"] == 1
    assert "no new worker could be placed, so the other 1 compute its chunks" in report["heard"][-1]
    assert np.array_equal(report["weights"], local_run())


@pytest.mark.skipif(__import__("bench.capped").capped.cgroups_available() is not None, reason="no memory cgroups")
def test_a_dataset_no_capped_worker_could_hold_trains_across_two_nodes_to_the_same_bits(nodes, tmp_path):
    """One worker a node, each capped (a memory cgroup) at its share of the training set and 256 MiB, below
    the whole set: shuffle=blocks trains, to the single process's bits without a cap; shuffle=global,
    where each worker would hold the whole set, is killed at the cap while it loads, and says so."""
    from bench import data_bench

    nodes.start_worker_node()  # the test before lost it
    folder = data_bench.synthetic_folder(tmp_path / "data", 0.6 * 2**30)
    whole = sum(f.stat().st_size for f in folder.glob("block-*.x.npy"))
    limit = int(0.6 * 2**30 / 2 + data_bench.MARGIN)
    assert limit < 0.6 * 2**30 < whole
    report = data_bench.run_capped(nodes, folder, limit, "blocks", tmp_path / "weights.npy")
    assert report["outcome"] == "trained" and report["nodes"] == 2, report
    assert all(0 < peak <= limit for peak in report["peaks"])
    assert np.array_equal(np.load(tmp_path / "weights.npy"), data_bench.single_process(folder))
    report = data_bench.run_capped(nodes, folder, limit, "global", tmp_path / "global.npy")
    assert report["outcome"].startswith("ClusterError: a worker died while it loaded its blocks"), report
