"""Where chunk sums are computed: one interface, two implementations.

A backend is given the training set once (rows, or a sharded dataset's blocks: ``cluster.blocks``);
then the training loop hands it stretches of
mini-batch steps (``train_steps``: the epoch's shuffle, the first and last step), and the
diagnostics a set of rows (``gradient_stats``). Every step is ``core.step.descend``: the
mini-batch cut into chunks of ``chunk_size`` (``core.step.chunk_bounds``), each chunk's sum
Σ_x ∂C_x/∂params computed with one BLAS thread, the sums added in chunk order and the update
applied by one compiled function (``core.kernels``), so every backend and every worker count
gives the same bits. The backends differ only in where the chunk sums are computed: on this
process's threads (the whole stretch compiled), or on Ray workers (a step at a time, through
``chunk_sums``).
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from cluster.blocks import Blocks, add_evaluation_rows, evaluation_row
from core import Network
from core.chunks import ChunkEngine, sum_rows
from core.diagnostics import add_with_stats, stats_size
from core.plan import cut, epoch_cuts


class Backend(Protocol):
    name: str
    failures: int  # workers that died and whose chunks were computed again

    def start(self, network: Network, x: np.ndarray | None, labels: np.ndarray | None,
              blocks: Blocks | None = None) -> None:
        """Hold the training set: ``x`` and ``labels``, or a sharded dataset's ``blocks`` (where a Ray
        driver holds no rows, ``x`` is None and the workers read their blocks)."""
        ...

    @property
    def tags(self) -> dict[str, str]:
        """What the run is tagged with: the backend, its workers (Ray) or threads, its transport."""
        ...

    def chunk_sums(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int]:
        """One step's chunk sums: Σ_x ∂C_x/∂params of each chunk of ``x[batch]``, one row each in
        chunk order, then one spare row (for their total), and the count. The array is valid until
        the next call. Ray's ``train_steps`` is built on it; the local one is the single-process
        result the Ray backend's is tested against."""
        ...

    def gradient_stats(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        """Σ_x ∂C_x/∂params over ``x[batch]``, its count and the per-layer diagnostic sums
        (``core.diagnostics``), each added in chunk order."""
        ...

    def train_steps(self, network: Network, order: np.ndarray, first: int, last: int, batch_size: int,
                    eta: float, lmbda: float) -> None:
        """Mini-batch steps ``first`` to ``last - 1`` of the epoch shuffled as ``order``, in place."""
        ...

    def batch_cost(self, network: Network, batch: np.ndarray) -> float:
        """A sharded dataset's mean cost over ``batch``: its chunks' cost sums added in chunk order."""
        ...

    def evaluate(self, network: Network, split: str) -> tuple[float, float, np.ndarray]:
        """A sharded dataset's mean cost, accuracy and confusion counts on ``split``, block by block, added in
        block order wherever the blocks are."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """Chunks computed in this process: training steps compiled, a step's chunks on numba's threads;
    the diagnostics' chunk sums on a small thread pool (numpy releases the GIL in BLAS)."""

    name = "local"
    failures = 0  # threads do not die on their own

    def __init__(self, chunk_size: int, threads: int = 0):
        self.chunk_size = chunk_size
        self.threads = threads or os.cpu_count() or 1
        self._engine: ChunkEngine | None = None

    def start(self, network: Network, x: np.ndarray, labels: np.ndarray, blocks: Blocks | None = None) -> None:
        """``blocks``: the training set is a sharded dataset's (this process holds all its rows, ``blocks.rows``);
        under ``shuffle=blocks`` chunks are cut at its blocks, as the Ray workers cut them."""
        self._engine = ChunkEngine(x, labels, self.threads)  # one BLAS thread a chunk, as in every Ray worker
        self._sums = None  # the chunk sums' rows (core.chunks.sum_rows)
        self.blocks = blocks
        self._offsets = blocks.offsets("train") if blocks is not None and blocks.confined else None
        self._plan = None  # (order, cuts, firsts) of the epoch being trained (core.plan.epoch_cuts)

    @property
    def tags(self) -> dict[str, str]:
        return {"backend": self.name, "threads": str(self.threads)}

    def train_steps(self, network: Network, order: np.ndarray, first: int, last: int, batch_size: int,
                    eta: float, lmbda: float) -> None:
        if self._offsets is not None:  # chunks cut at the blocks, as the Ray workers cut them; compiled
            if self._plan is None or self._plan[0] is not order:  # the epoch's plan, once
                self._plan = (order, *epoch_cuts(order, batch_size, self.chunk_size, self._offsets))
            self._engine.planned_steps(network, order, *self._plan[1:], first, last, batch_size, eta, lmbda)
            return
        # the whole stretch compiled, each step's chunks on the threads at once: the same bits as step by step
        self._engine.steps(network, order, first, last, batch_size, eta, lmbda, self.chunk_size)

    def chunk_sums(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int]:
        bounds, _ = cut(batch, self.chunk_size, self._offsets)
        self._sums = sum_rows(self._sums, len(bounds), network)
        parts = self._engine.compute(network, [batch[lo:hi] for lo, hi in bounds], list(self._sums))
        return self._sums, sum(n for _, n in parts)

    def batch_cost(self, network: Network, batch: np.ndarray) -> float:
        """A sharded dataset's mini-batch cost, as the Ray workers compute it: its chunks' cost sums in order."""
        bounds, _ = cut(batch, self.chunk_size, self._offsets)
        x, y = self._engine.x, self._engine.labels
        rows = [evaluation_row(network, x[batch[lo:hi]], y[batch[lo:hi]], network.sizes[-1], confusion=False)
                for lo, hi in bounds]
        return add_evaluation_rows(rows, network.sizes[-1])[0]

    def evaluate(self, network: Network, split: str) -> tuple[float, float, np.ndarray]:
        """A sharded dataset's split, a block at a time, the sums added in block order (as from Ray's workers)."""
        x, y = self.blocks.rows[split]
        offsets = self.blocks.offsets(split)
        rows = [evaluation_row(network, x[lo:hi], y[lo:hi], network.sizes[-1])
                for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        return add_evaluation_rows(rows, network.sizes[-1])

    def gradient_stats(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        bounds, _ = cut(batch, self.chunk_size, self._offsets)
        sums = [np.empty_like(network.params) for _ in bounds]
        stats = np.zeros((len(bounds), stats_size(network.sizes)))
        parts = self._engine.compute(network, [batch[lo:hi] for lo, hi in bounds], sums, list(stats))
        return add_with_stats(parts, stats)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def make_backend(cfg, on_failure=None) -> Backend:
    """The backend a config names; ``on_failure`` hears of each Ray worker that died."""
    if cfg.backend == "local":
        return LocalBackend(cfg.chunk_size, cfg.threads)
    from cluster.driver import RayBackend  # Ray is imported only when a job asks for it

    return RayBackend(workers=cfg.workers, chunk_size=cfg.chunk_size, num_cpus=cfg.num_cpus,
                      max_worker_failures=cfg.max_worker_failures, on_failure=on_failure, transport=cfg.transport)
