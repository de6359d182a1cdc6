"""The worker: an actor that holds training data and returns gradient sums with counts.

It holds either the whole training set, from the object store (data given in memory), or the
blocks of a sharded dataset it is given (``load``): under ``shuffle=blocks`` only its share,
read from files on its own node.
"""

from __future__ import annotations

import os
import time

import numpy as np

from cluster.blocks import BlockError, BlockSpec, evaluation_row, load_blocks, missing, node_name
from core import Network
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


def owners_in_order(chunks: int, shares: int) -> np.ndarray:
    """Which share computes each chunk when every share holds every row: consecutive groups (``split_in_order``)."""
    return np.repeat(np.arange(shares), [len(g) for g in split_in_order(list(range(chunks)), shares)])


class ShardWorker:
    """Computes Σ_x ∂C_x/∂params for the chunks of a mini-batch it is named for, one sum per chunk.

    Every worker is sent the same work: the step's positions, its chunks (``bounds``), the share
    that computes each (``owners``) and each chunk's block; a worker computes the chunks of share
    ``share`` and returns their sums separately (not added up here), so that the driver adds all
    chunk sums in chunk order whoever computed them. A worker holding ``threads`` CPUs computes that
    many chunks at once, each with one BLAS thread, as the single-process backend does.
    """

    def __init__(self, x: np.ndarray | None, labels: np.ndarray | None, sizes: list[int], cost: str,
                 activation: str, threads: int = 1, dtype: str = "float64"):
        self.sizes, self.cost, self.activation = list(sizes), cost, activation
        self.threads, self.dtype = threads, dtype
        self.engine = ChunkEngine(x, labels, threads) if x is not None else None
        self.held: dict[str, tuple[np.ndarray, np.ndarray, dict[int, int]]] = {}  # split -> rows, labels, starts
        self.specs: dict[int, BlockSpec] = {}

    # ------------------------------------------------------------------ a sharded dataset's blocks

    def missing(self, specs: list[BlockSpec]) -> tuple[str, list[int]]:
        """This node's name and the blocks whose files it cannot see."""
        return node_name(), missing(specs)

    def load(self, specs: dict[str, list[BlockSpec]]) -> str | None:
        """Hold exactly these blocks (reading those not held yet); None, or the one line that says why not."""
        try:
            for split, wanted in specs.items():
                x, y, starts = load_blocks(wanted, self.dtype)
                self.held[split] = (x, y, starts)
                self.specs.update({s.block: s for s in wanted})
                if split == "train":
                    if self.engine is not None:
                        self.engine.close()
                    self.engine = ChunkEngine(x, y, self.threads)
        except BlockError as e:
            return str(e)
        except MemoryError:
            return f"the blocks given to the worker on {node_name()} do not fit its memory; add workers or nodes"
        return None

    # ------------------------------------------------------------------ the work of a step

    def chunk_sums(self, work: tuple, share: int, shares: int) -> tuple[np.ndarray, list[int], np.ndarray | None,
                                                                      float]:
        """Share ``share``'s chunks of ``work = (params, positions, bounds, owners, blocks, mode)``: their sums
        stacked as rows (chunks of the share, n_params), the count of each chunk, in mode ``stats`` each chunk's
        diagnostic sums (chunks, stats_size), and the seconds the worker spent. Mode ``cost`` returns evaluation
        rows (``cluster.blocks.evaluation_row``, without the confusion counts) of the chunks instead of gradient
        sums; mode ``evaluate:SPLIT`` the rows of the split's blocks it owns (``owners`` by block)."""
        started = time.perf_counter()
        params, positions, bounds, owners, blocks, mode = work
        network = Network(self.sizes, params, self.cost, self.activation)
        mine = np.flatnonzero(owners == share)
        if mode.startswith("evaluate:"):
            split = mode.split(":", 1)[1]
            rows = [self._evaluate_block(network, split, int(b)) for b in np.asarray(blocks)[mine]]
            width = 3 + self.sizes[-1] ** 2
            return np.array(rows).reshape(len(mine), width), [], None, time.perf_counter() - started
        chunks = [self._rows(positions[bounds[c][0] : bounds[c][1]], None if blocks is None else int(blocks[c]))
                  for c in mine]
        if mode == "cost":
            x, y, _ = self.held.get("train") or (self.engine.x, self.engine.labels, None)
            rows = np.array([evaluation_row(network, x[r], y[r], self.sizes[-1], confusion=False) for r in chunks])
            return rows.reshape(len(mine), 3), [], None, time.perf_counter() - started
        sums = np.empty((len(mine), params.size), dtype=params.dtype)
        stats = np.zeros((len(mine), stats_size(self.sizes))) if mode == "stats" else None
        parts = self.engine.compute(network, chunks, list(sums), None if stats is None else list(stats))
        return sums, [n for _, n in parts], stats, time.perf_counter() - started

    def _rows(self, positions: np.ndarray, block: int | None) -> np.ndarray:
        """Positions of the training split as rows of what this worker holds."""
        if block is None or "train" not in self.held:
            return positions
        spec = self.specs[block]
        return positions - (spec.offset - self.held["train"][2][block])

    def _evaluate_block(self, network: Network, split: str, block: int) -> np.ndarray:
        x, y, starts = self.held[split]
        lo = starts[block]
        hi = lo + self.specs[block].rows
        return evaluation_row(network, x[lo:hi], y[lo:hi], self.sizes[-1])

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
