"""How an epoch is ordered and cut when the training set lives in blocks.

``shuffle=global`` orders an epoch by one permutation of every training example
(``rng.permutation(n)``) and cuts each mini-batch into chunks of ``chunk_size``
(``core.step.chunk_bounds``). A worker that holds only some blocks can compute a chunk only
when all of the chunk's rows lie in one of them, so ``shuffle=blocks`` orders and cuts so:

- the blocks in a seeded order, the rows of each block in a seeded order of their own;
- ``mix`` consecutive blocks of that order at a time have their rows interleaved (row 1 of each,
  then row 2 of each, …), so every mini-batch draws from about ``mix`` blocks, not one;
- within each mini-batch the rows are grouped by block (stably), and a chunk never crosses a
  block: a mini-batch is cut where its block changes, then each piece by ``chunk_size``.

Everything here depends on the seed, the blocks' sizes, ``mix``, ``batch_size`` and
``chunk_size``; never on how many workers there are or which holds which block. So the chunk
sums, added in chunk order, give the same bits on any worker count.
"""

from __future__ import annotations

import numpy as np

from core.step import chunk_bounds


def blocks_order(rng: np.random.Generator, offsets: np.ndarray, mix: int, batch_size: int) -> np.ndarray:
    """An epoch's order of positions: block b holds positions ``offsets[b]`` to ``offsets[b + 1] - 1``.

    Built with a few arrays of one integer an example (the order is that size anyway), sorted on one
    key each: (group of ``mix`` blocks, row, block) to interleave, then (mini-batch, block) to group."""
    sizes = np.diff(offsets)
    n, most = int(offsets[-1]), int(sizes.max(initial=1))
    blocks = rng.permutation(sizes.size)
    positions, key = np.empty(n, np.int64), np.empty(n, np.int64)
    at = 0
    for rank, b in enumerate(blocks.tolist()):
        m = int(sizes[b])
        positions[at : at + m] = offsets[b] + rng.permutation(m)  # the block's rows in an order of their own
        key[at : at + m] = (rank // mix) * (most * mix) + np.arange(m) * mix + rank % mix
        at += m
    order = np.argsort(key, kind="stable")
    positions, key = positions[order], key[order]
    del order
    key = (key // (most * mix)) * mix + key % mix  # each row's block, by its place in the blocks' order
    key += (np.arange(n) // batch_size) * sizes.size  # ... within its mini-batch
    return positions[np.argsort(key, kind="stable")]


def block_of(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The block each position lies in."""
    return np.searchsorted(offsets, positions, side="right") - 1


def cut(positions: np.ndarray, chunk_size: int, offsets: np.ndarray | None = None
        ) -> tuple[list[tuple[int, int]], np.ndarray | None]:
    """The chunks of a mini-batch (or any run of positions), as (lo, hi) within it, and each chunk's
    block. Without ``offsets``, ``chunk_bounds``'s cut (and no blocks). With them, the run is first cut
    where its block changes, then each piece by ``chunk_size``."""
    if offsets is None:
        return chunk_bounds(positions.shape[0], chunk_size), None
    blocks = block_of(positions, offsets)
    edges = np.flatnonzero(np.diff(blocks)) + 1
    starts = np.concatenate(([0], edges))
    stops = np.concatenate((edges, [positions.shape[0]]))
    bounds = [(lo + a, lo + b) for lo, hi in zip(starts.tolist(), stops.tolist())
              for a, b in chunk_bounds(hi - lo, chunk_size)] if positions.shape[0] else []
    return bounds, blocks[[lo for lo, _ in bounds]] if bounds else np.empty(0, np.int64)


def epoch_cuts(order: np.ndarray, batch_size: int, chunk_size: int, offsets: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """``cut`` of every mini-batch of an epoch at once, for the compiled steps: the positions in ``order``
    where a chunk starts (then ``order.size``), and the index of each step's first chunk (then their count).
    Chunk ``c`` is ``order[cuts[c]:cuts[c + 1]]``; step ``s`` has chunks ``firsts[s]`` to ``firsts[s + 1] - 1``."""
    n = order.shape[0]
    if n == 0:
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    blocks = block_of(order, offsets)
    at = np.arange(n)
    starts = np.flatnonzero((at % batch_size == 0) | np.concatenate(([True], blocks[1:] != blocks[:-1])))
    lengths = np.diff(np.concatenate((starts, [n])))
    pieces = -(-lengths // chunk_size)
    within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    cuts = np.concatenate((np.repeat(starts, pieces) + within * chunk_size, [n])).astype(np.int64)
    firsts = np.searchsorted(cuts, np.arange(0, n, batch_size)).astype(np.int64)
    return cuts, np.concatenate((firsts, [cuts.size - 1])).astype(np.int64)
