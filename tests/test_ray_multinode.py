"""Training across two Ray nodes on this machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.auth import ensure_token
from cluster.driver import RayBackend
from jobs.backends import LocalBackend
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.train import train

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes():
    ensure_token()  # Cluster starts its head without ray.init, which would write the token
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                           "object_store_memory": 200 * 1024**2})
    cluster.add_node(num_cpus=1, object_store_memory=200 * 1024**2)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_training_across_two_nodes_matches_one_process(two_nodes):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = load_config(None, ["data=digits", "sizes=[64,30,10]", "batch_size=100", "chunk_size=30", "epochs=2"])
    data = load_dataset("digits")
    backend = RayBackend(2, cfg.chunk_size)
    nodes = []

    original_start = backend.start

    def start_and_look(network, x, labels):
        original_start(network, x, labels)
        nodes.extend(ray.get([a.node_id.remote() for a in backend.actors]))

    backend.start = start_and_look
    weights = train(cfg, data, backend).network.params
    assert len(set(nodes)) == 2, "each worker should sit on its own node"
    assert backend.transport == "tasks"  # auto: simulated nodes share one address, where compiled graphs hang
    local = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1)).network.params
    assert np.array_equal(weights, local)


def test_losing_a_node_mid_training_changes_no_bit(two_nodes):
    """The worker on the removed node dies; no CPU is left for a new one, so the other covers its chunks."""
    cfg = load_config(None, ["data=digits", "sizes=[64,30,10]", "batch_size=100", "chunk_size=30", "epochs=2"])
    data = load_dataset("digits")
    worker_node = [n for n in two_nodes.worker_nodes][0]
    heard = []

    class LosingANode(RayBackend):
        steps = 0

        def chunk_sums(self, network, batch):
            self.steps += 1
            if self.steps == 4:
                two_nodes.remove_node(worker_node)
            return super().chunk_sums(network, batch)

    backend = LosingANode(2, cfg.chunk_size, on_failure=heard.append, replace_timeout=3)
    weights = train(cfg, data, backend).network.params
    local = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1)).network.params
    assert np.array_equal(weights, local)
    assert backend.failures == 1 and "no new worker could be placed, so the other 1 compute its chunks" in heard[0]
