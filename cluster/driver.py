"""The driver's side: start the workers, broadcast weights once a step, add chunk sums in order.

``ray.init()`` is called without an address, so ``RAY_ADDRESS`` (set by ``ray job submit``)
decides the cluster; with none, an embedded local cluster starts on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading

import numpy as np

from cluster.errors import ClusterError
from core import Network, add_in_order, chunk_bounds


def connect(cpus_needed: float) -> bool:
    """Join the cluster that RAY_ADDRESS names, or start a local one. True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    with _keeping_sigterm_handler():
        _init(cpus_needed)
    return True


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """``ray.init`` replaces the SIGTERM handler with ``sys.exit``; keep the caller's own."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _init(cpus_needed: float) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot connect to the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']} "
                               f"({str(e).splitlines()[0]}); check that it runs (`ray status`) or unset "
                               "RAY_ADDRESS to start a local one") from None
    else:
        ray.init(num_cpus=max(1, math.ceil(cpus_needed)), include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)


def split_in_order(items: list, parts: int) -> list[list]:
    """Consecutive groups of nearly equal size, in order; empty groups dropped."""
    size, extra = divmod(len(items), parts)
    groups, start = [], 0
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        if stop > start:
            groups.append(items[start:stop])
        start = stop
    return groups


class RayBackend:
    """Gradient sums computed by ``workers`` ShardWorker actors."""

    name = "ray"

    def __init__(self, workers: int, chunk_size: int, num_cpus: float = 1.0):
        self.workers, self.chunk_size, self.num_cpus = workers, chunk_size, num_cpus
        self.actors: list = []
        self._started_ray = False

    def start(self, network: Network, x: np.ndarray, labels: np.ndarray) -> None:
        import ray

        from cluster.worker import ShardWorker

        self._started_ray = connect(self.workers * self.num_cpus)
        available = ray.cluster_resources().get("CPU", 0)
        if self.workers * self.num_cpus > available:
            self.close()
            raise ClusterError(f"workers={self.workers} with num_cpus={self.num_cpus} need "
                               f"{self.workers * self.num_cpus:g} CPUs but the Ray cluster has {available:g}; "
                               "lower workers or num_cpus, or add nodes")
        remote = ray.remote(ShardWorker)
        x_ref, labels_ref = ray.put(x), ray.put(labels)  # once: workers on a node share one copy
        threads = max(1, int(self.num_cpus))
        self.actors = [remote.options(num_cpus=self.num_cpus).remote(x_ref, labels_ref, network.sizes,
                                                                     network.cost, network.activation, threads)
                       for _ in range(self.workers)]
        ray.get([actor.pid.remote() for actor in self.actors])
        self._total = np.empty_like(network.params)

    def gradient_sum(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int]:
        import ray

        bounds = chunk_bounds(batch.shape[0], self.chunk_size)
        chunks = [batch[lo:hi] for lo, hi in bounds]
        params_ref = ray.put(network.params)  # one broadcast a step, the same reference to every worker
        groups = split_in_order(chunks, len(self.actors))
        futures = [actor.gradient_sums.remote(params_ref, group) for actor, group in zip(self.actors, groups)]
        parts = []
        for sums, counts in ray.get(futures):  # futures are in chunk order, so the parts are too
            parts.extend(zip(sums, counts))
        if len(parts) == 1:
            return parts[0]
        return add_in_order(parts, out=self._total)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
