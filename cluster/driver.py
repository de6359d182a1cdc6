"""The driver's side: start the workers, broadcast weights once a step, add chunk sums in order.

``ray.init()`` is called without an address, so ``RAY_ADDRESS`` (set by ``ray job submit``)
decides the cluster; with none, an embedded local cluster starts on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import threading
from collections.abc import Callable

import numpy as np

from cluster.errors import ClusterError, WorkerFailuresError
from core import Network, add_in_order, chunk_bounds, descend
from core.diagnostics import add_with_stats


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
        _check_reachable(os.environ["RAY_ADDRESS"])
        try:
            ray.init(logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot connect to the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']} "
                               f"({str(e).splitlines()[0]}); check that it runs (`ray status`) or unset "
                               "RAY_ADDRESS to start a local one") from None
    else:
        # "local": a new embedded cluster, never one a `ray start` elsewhere on this machine left behind
        ray.init(address="local", num_cpus=max(1, math.ceil(cpus_needed)), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray waits a long time for an address that does not answer; a plain connect fails fast."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"RAY_ADDRESS={address}: write HOST:PORT (the head's GCS port, 6379 by default)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e.strerror or e}); check "
                           "that it runs (`ray status`) or unset RAY_ADDRESS to start a local one") from None


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
    """Gradient sums computed by ``workers`` ShardWorker actors.

    A worker that dies during a step (its process killed, its node lost, out of memory)
    is noticed when its result is awaited; its chunks are computed again by a new worker,
    or by the surviving ones when no new worker can be placed. The chunk sums, and so the
    weights, are the same bits as without the failure. More than ``max_failures``
    failures in one job stop it with ``WorkerFailuresError``.
    """

    name = "ray"

    def __init__(self, workers: int, chunk_size: int, num_cpus: float = 1.0, max_failures: int = 3,
                 on_failure: Callable[[str], None] | None = None, replace_timeout: float = 20.0):
        self.workers, self.chunk_size, self.num_cpus = workers, chunk_size, num_cpus
        self.max_failures, self.on_failure, self.replace_timeout = max_failures, on_failure, replace_timeout
        self.failures = 0
        self.actors: list = []
        self._started_ray = False

    def start(self, network: Network, x: np.ndarray, labels: np.ndarray) -> None:
        import ray

        self._started_ray = connect(self.workers * self.num_cpus)
        available = ray.cluster_resources().get("CPU", 0)
        if self.workers * self.num_cpus > available:
            self.close()
            raise ClusterError(f"workers={self.workers} with num_cpus={self.num_cpus:g} need "
                               f"{self.workers * self.num_cpus:g} CPUs but the Ray cluster has {available:g}; "
                               "lower workers or num_cpus, or add nodes")
        self._x_ref, self._labels_ref = ray.put(x), ray.put(labels)  # once: workers on a node share one copy
        self._network_spec = (network.sizes, network.cost, network.activation)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        ray.get([actor.pid.remote() for actor in self.actors])
        self._total = np.empty_like(network.params)

    def _new_actor(self):
        import ray

        from cluster.worker import ShardWorker

        threads = max(1, int(self.num_cpus))
        return ray.remote(ShardWorker).options(num_cpus=self.num_cpus).remote(
            self._x_ref, self._labels_ref, *self._network_spec, threads)

    def gradient_sum(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int]:
        parts, _ = self._gather(network, batch, with_stats=False)
        if len(parts) == 1:
            return parts[0]
        return add_in_order(parts, out=self._total)

    def train_steps(self, network: Network, order: np.ndarray, first: int, last: int, batch_size: int,
                    eta: float, lmbda: float) -> None:
        descend(self.gradient_sum, network, order, first, last, batch_size, eta, lmbda)

    def gradient_stats(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        return add_with_stats(*self._gather(network, batch, with_stats=True))

    def _gather(self, network: Network, batch: np.ndarray, with_stats: bool):
        """Every chunk's (sum, count), and its diagnostic sums when asked, in chunk order."""
        import ray
        from ray.exceptions import RayActorError

        bounds = chunk_bounds(batch.shape[0], self.chunk_size)
        chunks = [batch[lo:hi] for lo, hi in bounds]
        params_ref = ray.put(network.params)  # one broadcast a step, the same reference to every worker
        groups = split_in_order(chunks, len(self.actors))
        pending = {actor.gradient_sums.remote(params_ref, group, with_stats): k
                   for k, (actor, group) in enumerate(zip(self.actors, groups))}
        results: list = [None] * len(groups)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(ready[0])
            try:
                results[k] = ray.get(ready[0])
            except RayActorError as error:
                actor = self._recover(k, error)
                pending[actor.gradient_sums.remote(params_ref, groups[k], with_stats)] = k
        parts, stats = [], []
        for sums, counts, chunk_stats in results:  # in group order, which is chunk order
            parts.extend(zip(sums, counts))
            if chunk_stats is not None:
                stats.extend(chunk_stats)
        return parts, stats

    def _recover(self, k: int, error: Exception):
        """A worker died: count it, then hand its chunks to a new worker or a surviving one."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        self.failures += 1
        cause = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        if self.failures > self.max_failures:
            raise WorkerFailuresError(f"Ray workers failed {self.failures} times, more than max_worker_failures="
                                      f"{self.max_failures} (last: {cause})")
        dead = self.actors[k] if k < len(self.actors) else None
        replacement = self._new_actor()
        try:
            ray.get(replacement.pid.remote(), timeout=self.replace_timeout)
        except (GetTimeoutError, RayActorError):
            ray.kill(replacement)
            self.actors = [a for a in self.actors if a is not dead]
            if not self.actors:
                raise WorkerFailuresError(f"every Ray worker died and none could be placed again ({cause})") from None
            self._tell(f"worker {k + 1} died ({cause}); no new worker could be placed, so the other "
                       f"{len(self.actors)} compute its chunks (failure {self.failures} of at most "
                       f"{self.max_failures})")
            return self.actors[k % len(self.actors)]
        self.actors[k] = replacement
        self._tell(f"worker {k + 1} died ({cause}); a new worker computes its chunks again "
                   f"(failure {self.failures} of at most {self.max_failures})")
        return replacement

    def _tell(self, message: str) -> None:
        if self.on_failure is not None:
            self.on_failure(message)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
