"""The buffers the compiled backward pass (``core.kernels``) works in."""

from __future__ import annotations

import numpy as np

from core.network import Network


class Workspace:
    """The compiled backward pass's buffers, reused across steps: at a mini-batch of 10 the
    arithmetic is tiny and allocation would be a large share of the time.

    ``slots`` sets of them, one for each chunk computed at once on its own thread, each for
    chunks of up to ``rows`` examples: the chunk's rows copied out of the training set, and
    a^l and δ^l of every layer kept as the book writes them, one column per example, (n_l, m):
    the products then run on contiguous operands, which OpenBLAS does faster.
    """

    def __init__(self, sizes: list[int], rows: int, dtype, slots: int = 1):
        self.sizes, self.rows, self.dtype, self.slots = list(sizes), rows, np.dtype(dtype), slots
        self.x_slots = np.empty((slots, rows * sizes[0]), dtype)  # a chunk's rows, (m, n_0) flat
        self.activation_slots = tuple(np.empty((slots, n * rows), dtype) for n in sizes[1:])  # a^l, (n_l, m) flat
        self.delta_slots = tuple(np.empty((slots, n * rows), dtype) for n in sizes[1:])  # δ^l, (n_l, m) flat

    def fits(self, network: Network, rows: int, slots: int = 1) -> bool:
        return (self.sizes == network.sizes and self.dtype == network.dtype and rows <= self.rows
                and slots <= self.slots)
