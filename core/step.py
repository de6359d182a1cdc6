"""One step of gradient descent, each of its parts defined once: the reference for every backend.

The first assumption: C = (1/n) Σ_x C_x, so ∂C/∂w = (1/n) Σ_x ∂C_x/∂w. Gradients therefore
travel as sums with counts: an epoch's shuffle is cut into mini-batches, a mini-batch into
chunks, each chunk's sum Σ_x ∂C_x/∂params is computed wherever (``core.backprop``), the sums
are added in chunk order, and the update divides once by the mini-batch's count. Never a mean
of means, and the same bits whoever computed the chunks.

Training runs compiled twins of these (``core.kernels``), for speed at small mini-batches; tests
hold each to its reference bit for bit (``tests/test_core.py``):

=====================================  ==========================================================
readable (this module, ``core.backprop``)  compiled (``core.kernels``)
=====================================  ==========================================================
``gradient_sum`` (BP1–BP4, a chunk)    ``_chunk_sum`` (``chunk_gradient_sum``)
``piece``, ``piece_count``             ``_piece``, ``_piece_count``
``add_and_update``: ``add_in_order``,  ``_add_and_update`` (``add_and_update``,
then ``update_in_place``               ``add_and_update_rows``): the one place η/m is computed
``descend`` over this process's rows   ``run_steps`` (``_run_steps``, ``_run_chunked_steps``);
                                       ``run_planned_steps`` (chunks cut at a sharded set's blocks)
``descend`` over chunk sums computed   ``descend(..., add_and_update=add_and_update_rows)``: the
elsewhere                              Ray driver's loop, this very function
=====================================  ==========================================================
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


Parts = Iterable[tuple[np.ndarray, int]]
ChunkSums = Callable[[Network, np.ndarray], Parts]
AddAndUpdate = Callable[[Network, Parts, float, float, int], None]


def add_and_update(network: Network, parts: Parts, eta: float, lmbda: float, n_train: int) -> None:
    """The end of a step: the chunks' (Σ_x ∂C_x/∂params, count) added in chunk order, then the update."""
    nabla_sum, count = add_in_order(parts)
    update_in_place(network, nabla_sum, count, eta, lmbda, n_train)


def descend(chunk_sums: ChunkSums, network: Network, order: np.ndarray, first: int, last: int, batch_size: int,
            eta: float, lmbda: float = 0.0, add_and_update: AddAndUpdate = add_and_update) -> None:
    """Mini-batch steps ``first`` to ``last - 1`` of the epoch shuffled as ``order``, in place.

    ``chunk_sums(network, batch)`` gives the mini-batch's chunk sums with their counts, in chunk order;
    ``add_and_update`` ends the step with them (this module's, or its compiled twin
    ``core.kernels.add_and_update_rows`` where the sums come as rows: Ray's driver). The compiled
    ``core.kernels.run_steps`` is held to this bit for bit.
    """
    for step in range(first, last):
        add_and_update(network, chunk_sums(network, mini_batch(order, batch_size, step)), eta, lmbda, order.shape[0])
