"""The worker: an actor that holds the training set and returns gradient sums with counts."""

from __future__ import annotations

import os

import numpy as np
from threadpoolctl import threadpool_limits

from core import Network
from core.chunks import ChunkEngine
from core.diagnostics import stats_size


class ShardWorker:
    """Computes Σ_x ∂C_x/∂params for the chunks of examples it is given, one sum per chunk.

    ``x`` and ``labels`` arrive from the object store, read-only and shared by every
    worker on the node. Each chunk's sum is returned separately (not added up here),
    so that the driver can add all chunk sums in chunk order whoever computed them.
    A worker holding ``threads`` CPUs computes that many chunks at once, each with
    one BLAS thread, as the single-process backend does.
    """

    def __init__(self, x: np.ndarray, labels: np.ndarray, sizes: list[int], cost: str, activation: str,
                 threads: int = 1):
        self._blas = threadpool_limits(limits=1, user_api="blas")  # set once for the actor's life
        self.sizes, self.cost, self.activation = list(sizes), cost, activation
        self.engine = ChunkEngine(x, labels, threads)

    def gradient_sums(self, params: np.ndarray, chunks: list[np.ndarray],
                      with_stats: bool = False) -> tuple[np.ndarray, list[int], np.ndarray | None]:
        """Sums stacked as rows, (len(chunks), n_params), the count of each chunk and, when asked,
        each chunk's diagnostic sums, (len(chunks), stats_size)."""
        network = Network(self.sizes, params, self.cost, self.activation)
        sums = np.empty((len(chunks), params.size), dtype=params.dtype)
        stats = np.zeros((len(chunks), stats_size(self.sizes))) if with_stats else None
        parts = self.engine.compute(network, chunks, list(sums), None if stats is None else list(stats))
        return sums, [n for _, n in parts], stats

    def echo(self, array: np.ndarray) -> np.ndarray:
        """A bare round trip carrying an array each way: the benchmark's baseline."""
        return np.empty_like(array)

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
