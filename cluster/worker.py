"""The worker: an actor that holds the training set and returns gradient sums with counts."""

from __future__ import annotations

import os
import time

import numpy as np

from core import Network, chunk_bounds
from core.chunks import ChunkEngine
from core.diagnostics import stats_size


def split_in_order(items: list, parts: int) -> list[list]:
    """``parts`` consecutive groups of nearly equal size, in order (the last ones empty when
    there are fewer items than parts)."""
    size, extra = divmod(len(items), parts)
    groups, start = [], 0
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        groups.append(items[start:stop])
        start = stop
    return groups


class ShardWorker:
    """Computes Σ_x ∂C_x/∂params for its share of a mini-batch's chunks, one sum per chunk.

    ``x`` and ``labels`` arrive from the object store, read-only and shared by every
    worker on the node. Each chunk's sum is returned separately (not added up here),
    so that the driver can add all chunk sums in chunk order whoever computed them.
    A worker holding ``threads`` CPUs computes that many chunks at once, each with
    one BLAS thread (its ``ChunkEngine`` holds BLAS to one), as the single-process backend does.
    """

    def __init__(self, x: np.ndarray, labels: np.ndarray, sizes: list[int], cost: str, activation: str,
                 threads: int = 1):
        self.sizes, self.cost, self.activation = list(sizes), cost, activation
        self.engine = ChunkEngine(x, labels, threads)

    def chunk_sums(self, work: tuple, share: int, shares: int) -> tuple[np.ndarray, list[int], np.ndarray | None,
                                                                      float]:
        """Share ``share`` of ``shares`` of the chunks of a mini-batch, ``work = (params, batch,
        chunk_size, with_stats)``: the sums stacked as rows, (chunks in the share, n_params), the
        count of each chunk, when asked each chunk's diagnostic sums, (chunks, stats_size), and
        the seconds the worker spent computing them.

        Every worker is sent the same ``work`` and cuts the mini-batch the same way
        (``chunk_bounds``, then ``split_in_order``): one message serves them all.
        """
        started = time.perf_counter()
        params, batch, chunk_size, with_stats = work
        bounds = split_in_order(chunk_bounds(batch.shape[0], chunk_size), shares)[share]
        network = Network(self.sizes, params, self.cost, self.activation)
        sums = np.empty((len(bounds), params.size), dtype=params.dtype)
        stats = np.zeros((len(bounds), stats_size(self.sizes))) if with_stats else None
        parts = self.engine.compute(network, [batch[lo:hi] for lo, hi in bounds], list(sums),
                                    None if stats is None else list(stats))
        return sums, [n for _, n in parts], stats, time.perf_counter() - started

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
