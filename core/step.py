"""One step of gradient descent, each of its parts defined once: the reference for every backend.

The first assumption: C = (1/n) Σ_x C_x, so ∂C/∂w = (1/n) Σ_x ∂C_x/∂w. Gradients therefore
travel as sums with counts: an epoch's shuffle is cut into mini-batches, a mini-batch into
chunks, each chunk's sum Σ_x ∂C_x/∂params is computed wherever (``core.backprop``), the sums
are added in chunk order, and the update divides once by the mini-batch's count. Never a mean
of means, and the same bits whoever computed the chunks.

Training runs compiled copies of the cuts, the add and the update (``core.kernels``: ``_piece``,
``_piece_count``, ``_add_and_update``), for speed at small mini-batches; tests hold them to these
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from core.network import Network


def piece(index: int, size: int, n: int) -> tuple[int, int]:
    """Positions ``lo`` to ``hi - 1`` of piece ``index`` when n consecutive positions are cut into
    pieces of ``size``, the last one shorter when size does not divide n.

    Both cuts of a step are this one: an epoch's shuffle into mini-batches, a mini-batch into
    chunks. It depends only on n and size, never on how many workers or threads there are.
    """
    lo = index * size
    return lo, min(lo + size, n)


def piece_count(n: int, size: int) -> int:
    """How many pieces ``piece`` cuts n positions into: ⌈n / size⌉."""
    return -(-n // size)


def batch_count(n_train: int, batch_size: int) -> int:
    """Mini-batches in an epoch of ``n_train`` examples."""
    return piece_count(n_train, batch_size)


def mini_batch(order: np.ndarray, batch_size: int, step: int) -> np.ndarray:
    """The indices of mini-batch ``step`` of the epoch whose shuffle is ``order``."""
    lo, hi = piece(step, batch_size, order.shape[0])
    return order[lo:hi]


def chunk_bounds(m: int, chunk_size: int) -> list[tuple[int, int]]:
    """The chunks of a mini-batch of m examples, as (lo, hi) positions within it."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return [piece(c, chunk_size, m) for c in range(piece_count(m, chunk_size))]


def add_in_order(parts: Iterable[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """Σ of gradient sums, added left to right in the order given, and the total count.

    Floating-point addition is not associative, so the order is part of the result: chunk
    order, whoever computed the chunks. The first part is copied, never added into.
    """
    total, count = None, 0
    for part, n in parts:
        if total is None:
            total = part.copy()
        else:
            total += part
        count += n
    if total is None:
        raise ValueError("no gradient parts to add")
    return total, count


def update_in_place(network: Network, nabla_sum: np.ndarray, count: int, eta: float, lmbda: float = 0.0,
                    n_train: int | None = None) -> None:
    """Gradient descent on ``network.params``, in place.

    w ← (1 − ηλ/n) w − η ∂C/∂w and b ← b − η ∂C/∂b (chapter 3's L2 decay; biases are not
    decayed; n is the training-set size), with ∂C/∂w = nabla_sum / count: the one division,
    folded into the step's scale η/count, which is rounded to the network's dtype first.
    """
    if count <= 0:
        raise ValueError("cannot update from zero examples")
    if lmbda:
        if not n_train:
            raise ValueError("L2 weight decay needs the training-set size n_train")
        network.params[: network.n_weights] *= 1.0 - eta * lmbda / n_train
    network.params -= nabla_sum * (eta / count)


ChunkSums = Callable[[Network, np.ndarray], Iterable[tuple[np.ndarray, int]]]


def descend(chunk_sums: ChunkSums, network: Network, order: np.ndarray, first: int, last: int, batch_size: int,
            eta: float, lmbda: float = 0.0) -> None:
    """Mini-batch steps ``first`` to ``last - 1`` of the epoch shuffled as ``order``, in place.

    ``chunk_sums(network, batch)`` gives each chunk's (Σ_x ∂C_x/∂params, count), in chunk order;
    they are added in that order, then the update. The compiled ``core.kernels.run_steps`` and
    ``steps_from_chunk_sums`` are held to this bit for bit.
    """
    for step in range(first, last):
        nabla_sum, count = add_in_order(chunk_sums(network, mini_batch(order, batch_size, step)))
        update_in_place(network, nabla_sum, count, eta, lmbda, order.shape[0])
