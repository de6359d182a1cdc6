"""The Ray backend against the single-process run: the same bits, whatever the worker count."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cluster.driver import RayBackend
from cluster.errors import ClusterError
from cluster.worker import split_in_order
from conftest import CONFIGS
from core import Network, add_in_order, gradient_sum
from jobs.backends import LocalBackend
from jobs.cli import main
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.train import train

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]  # one cluster for the module


@pytest.fixture(scope="module")
def mnist_shaped():
    # 540 training examples: mini-batches 250, 250, 40; chunks of 60 split 5 ways, unevenly over workers
    return load_dataset("synthetic:600:784:10", test_size=60)


def final_weights(backend, data, overrides):
    cfg = load_config(None, ["data=synthetic:600:784:10", "sizes=[784,30,10]", *overrides])
    return train(cfg, data, backend).network.params


@pytest.mark.parametrize("dtype, transport", [("float64", "compiled"), ("float32", "tasks")])
def test_local_and_ray_1_to_4_workers_are_bit_identical(mnist_shaped, dtype, transport):
    """Each dtype on one transport here; the other pairs in the test below (2 workers, with L2 decay)."""
    overrides = ["batch_size=250", "chunk_size=60", "epochs=2", "eta=0.5", f"dtype={dtype}"]
    local = final_weights(LocalBackend(60, threads=2), mnist_shaped, overrides)
    assert local.dtype == np.dtype(dtype)
    untrained = Network.create([784, 30, 10], seed=0, dtype=dtype).params
    assert not np.array_equal(local, untrained)
    for workers, num_cpus in ((1, 1), (2, 1), (3, 1), (4, 0.75)):  # 4 workers share the 3 CPUs
        backend = RayBackend(workers, chunk_size=60, num_cpus=num_cpus, transport=transport)
        weights = final_weights(backend, mnist_shaped, overrides)
        assert backend.transport == transport
        assert np.array_equal(weights, local), f"{workers} workers"


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_compiled_local_steps_and_ray_steps_are_bit_identical(mnist_shaped, dtype, transport):
    """Mini-batches within one chunk: the local backend runs whole stretches of steps compiled,
    Ray sums each mini-batch on a worker and the driver adds and updates; with L2 decay and a
    short last mini-batch (540 = 13 × 40 + 20), batch costs logged every 5 steps."""
    overrides = ["batch_size=40", "chunk_size=60", "epochs=2", "eta=0.5", "lmbda=3.0", "log_every=5",
                 f"dtype={dtype}"]
    local = final_weights(LocalBackend(60, threads=2), mnist_shaped, overrides)
    ray_run = final_weights(RayBackend(2, chunk_size=60, transport=transport), mnist_shaped, overrides)
    assert not np.array_equal(local, Network.create([784, 30, 10], seed=0, dtype=dtype).params)
    assert np.array_equal(ray_run, local)


def test_auto_takes_the_compiled_graph_on_one_node(mnist_shaped):
    backend = RayBackend(2, chunk_size=60)
    backend.start(Network.create([784, 30, 10]), mnist_shaped.x_train, mnist_shaped.y_train)
    try:
        assert backend.transport == "compiled" and backend.tags["transport"] == "compiled"
    finally:
        backend.close()


def test_single_threaded_local_run_gives_the_same_bits(mnist_shaped):
    overrides = ["batch_size=250", "chunk_size=60", "epochs=1"]
    one = final_weights(LocalBackend(60, threads=1), mnist_shaped, overrides)
    two = final_weights(LocalBackend(60, threads=2), mnist_shaped, overrides)
    assert np.array_equal(one, two)


def test_driver_average_equals_the_whole_batch_gradient_for_unequal_shards(mnist_shaped):
    data = mnist_shaped
    network = Network.create([784, 30, 10], seed=3)
    batch = np.arange(5, 22)  # 17 examples, chunks 5 5 5 2, shards of 2, 1 and 1 chunks
    backend = RayBackend(3, chunk_size=5)
    backend.start(network, data.x_train, data.y_train)
    try:
        sums, count = backend.chunk_sums(network, batch)
        assert sums.shape[0] == 4 + 1  # a row per chunk and one spare, for their total
        nabla, _ = add_in_order((row, 0) for row in sums[:4])
    finally:
        backend.close()
    whole, n = gradient_sum(network, data.x_train[batch], data.y_train[batch])
    assert count == n == 17
    np.testing.assert_allclose(nabla / count, whole / n, rtol=1e-12, atol=1e-15)
    local = LocalBackend(5, threads=1)
    local.start(network, data.x_train, data.y_train)
    local_sums, local_count = local.chunk_sums(network, batch)
    assert local_count == 17 and np.array_equal(local_sums[:4], sums[:4])
    local.close()


def test_split_in_order():
    assert split_in_order([1, 2, 3, 4, 5], 3) == [[1, 2], [3, 4], [5]]
    assert split_in_order([1], 3) == [[1], [], []]


def test_more_workers_than_the_cluster_can_place_is_an_error(mnist_shaped):
    backend = RayBackend(10, chunk_size=60)
    with pytest.raises(ClusterError, match="workers=10 with num_cpus=1 need 10 CPUs but the Ray cluster has 3"):
        backend.start(Network.create([784, 30, 10]), mnist_shaped.x_train, mnist_shaped.y_train)


def test_gradavg_run_digits_on_two_ray_workers(tracking_uri, capsys):
    code = main(["run", str(CONFIGS / "digits.yaml"), "backend=ray", "workers=2", "chunk_size=4", "epochs=2",
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["backend"] == "ray" and run.data.tags["workers"] == "2"
    assert run.data.tags["transport"] == "compiled"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy/test")] == [1, 2]
    weights = Network.load(client.download_artifacts(run.info.run_id, "weights.npz")).params
    cfg = load_config(CONFIGS / "digits.yaml", ["chunk_size=4", "epochs=2"])
    local = train(cfg, load_dataset("digits", cfg.validation_size), LocalBackend(4, threads=2))
    assert np.array_equal(weights, local.network.params)


def test_diagnostics_are_the_same_bits_on_ray(mnist_shaped):
    network = Network.create([784, 30, 10], seed=5, init_scale=2.0)
    rows = np.arange(0, 300, 2)
    local = LocalBackend(60, threads=2)
    local.start(network, mnist_shaped.x_train, mnist_shaped.y_train)
    want = local.gradient_stats(network, rows)
    local.close()
    ray_backend = RayBackend(3, chunk_size=60)
    ray_backend.start(network, mnist_shaped.x_train, mnist_shaped.y_train)
    got = ray_backend.gradient_stats(network, rows)
    ray_backend.close()
    assert got[1] == want[1] == 150
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[2], want[2])
    assert got[2][1] > 0  # some neurons saturated, so the counts are tested
