"""Computing the gradient sums of several chunks of a training set, on a few threads.

The compiled chunk sum (``core.kernels``) runs without the GIL, so chunks computed on
threads run in parallel. A ``ChunkEngine`` holds BLAS to one thread for as long as it is
open (``core.blas.one_thread``): every chunk's products then give the same bits here, in
another thread, or in another process.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from core.backprop import gradient_sum
from core.blas import one_thread
from core.kernels import chunk_gradient_sum, run_planned_steps, run_steps
from core.network import Network
from core.step import piece_count
from core.workspace import Workspace


def sum_rows(buffer: np.ndarray | None, chunks: int, network: Network) -> np.ndarray:
    """A buffer for a mini-batch's chunk sums: one row per chunk, then one for their total, shaped and
    typed like ``network.params``; ``buffer`` itself when it already is one."""
    shape = (chunks + 1, network.params.shape[0])
    if buffer is None or buffer.shape != shape or buffer.dtype != network.dtype:
        return np.empty(shape, network.dtype)
    return buffer


class ChunkEngine:
    """Owns a training set and returns Σ_x ∂C_x/∂params for chunks of its rows, each chunk's
    products on one BLAS thread until ``close``."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, threads: int = 1):
        self.x, self.labels = x, labels
        self._blas_limit = one_thread()
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gradavg-chunk") if self.threads > 1 else None
        self._local = threading.local()

    def compute(self, network: Network, chunks: list[np.ndarray], outs, stats=None) -> list[tuple[np.ndarray, int]]:
        """One (sum, count) per chunk of row indices, in chunk order; ``outs[i]`` receives chunk i's sum
        (and ``stats[i]`` its diagnostic sums, when given)."""
        jobs = list(zip(chunks, outs, stats if stats is not None else [None] * len(chunks)))
        if self._pool is None or len(jobs) == 1:
            return [self.chunk(network, *job) for job in jobs]
        return list(self._pool.map(lambda job: self.chunk(network, *job), jobs))

    def chunk(self, network: Network, indices: np.ndarray, out: np.ndarray,
               stats: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        if stats is None:  # training: the compiled path, which copies the rows itself
            workspace = self._workspace(network, indices.shape[0])
            return chunk_gradient_sum(network, self.x, self.labels, indices, out, workspace)
        # diagnostics: numpy's gradient_sum, which also sums the per-layer statistics
        nabla, count = gradient_sum(network, self.x[indices], self.labels[indices], stats=stats)
        out[:] = nabla
        return out, count

    def steps(self, network: Network, order: np.ndarray, first: int, last: int, batch_size: int, eta: float,
              lmbda: float, chunk_size: int) -> None:
        """Mini-batch steps ``first`` to ``last - 1`` of the epoch shuffled as ``order``, compiled
        (``core.kernels.run_steps``): a mini-batch of several chunks has them computed on up to
        ``threads`` threads at once."""
        n_chunks = piece_count(min(batch_size, order.shape[0]), chunk_size)
        slots = min(self.threads, n_chunks)
        rows = min(batch_size, chunk_size)
        state = self._local
        state.sums = sum_rows(getattr(state, "sums", None), n_chunks, network)
        run_steps(network, self.x, self.labels, order, first, last, batch_size, eta, lmbda, state.sums,
                  self._workspace(network, rows, slots), chunk_size)

    def planned_steps(self, network: Network, order: np.ndarray, cuts: np.ndarray, firsts: np.ndarray, first: int,
                      last: int, batch_size: int, eta: float, lmbda: float) -> None:
        """``steps`` with chunks cut by a plan (``core.plan.epoch_cuts``), compiled
        (``core.kernels.run_planned_steps``)."""
        if last <= first:
            return
        most = int(np.diff(firsts[first : last + 1]).max())
        rows = int(np.diff(cuts)[firsts[first] : firsts[last]].max())
        state = self._local
        state.sums = sum_rows(getattr(state, "sums", None), most, network)
        slots = min(self.threads, most)
        run_planned_steps(network, self.x, self.labels, order, cuts, firsts, first, last, batch_size, eta, lmbda,
                          state.sums, self._workspace(network, rows, slots))

    def _workspace(self, network: Network, rows: int, slots: int = 1) -> Workspace:
        """This thread's workspace, made again only when the network or a larger chunk needs it."""
        state = self._local
        if not getattr(state, "workspace", None) or not state.workspace.fits(network, rows, slots):
            state.workspace = Workspace(network.sizes, rows, network.dtype, slots)
        return state.workspace

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None
