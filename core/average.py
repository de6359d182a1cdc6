"""The first assumption: C = (1/n) Σ_x C_x, so ∂C/∂w = (1/n) Σ_x ∂C_x/∂w.

Gradients travel as sums with counts. Parts of any size are added, in a fixed order,
and the total is divided once by the total count: never a mean of means, and the
same bits whoever computed the parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from core.network import Network


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Cut n examples into consecutive chunks of ``chunk_size`` (the last may be shorter).

    The cut depends only on n and chunk_size, never on how many workers there are.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return [(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]


def add_in_order(parts: Iterable[tuple[np.ndarray, int]], out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Σ of gradient sums, added left to right in the order given, and the total count."""
    total, count = None, 0
    for part, n in parts:
        if total is None:
            total = part.copy() if out is None else out
            if out is not None:
                np.copyto(out, part)
        else:
            total += part
        count += n
    if total is None:
        raise ValueError("no gradient parts to add")
    return total, count


def average(parts: Iterable[tuple[np.ndarray, int]]) -> np.ndarray:
    """∂C/∂params = (Σ of the parts' sums) / (Σ of their counts), dividing once."""
    total, count = add_in_order(parts)
    if count == 0:
        raise ValueError("cannot average over zero examples")
    return total / count


def update_in_place(network: Network, nabla_sum: np.ndarray, count: int, eta: float, lmbda: float = 0.0,
                    n_train: int | None = None, scratch: np.ndarray | None = None) -> None:
    """Gradient descent on ``network.params``, in place.

    w ← (1 − ηλ/n) w − η ∂C/∂w and b ← b − η ∂C/∂b (chapter 3's L2 decay, biases not
    decayed; n is the training-set size), with ∂C/∂w = nabla_sum / count.
    """
    if count <= 0:
        raise ValueError("cannot update from zero examples")
    if lmbda:
        if not n_train:
            raise ValueError("L2 weight decay needs the training-set size n_train")
        network.params[: network.n_weights] *= 1.0 - eta * lmbda / n_train
    step = np.multiply(nabla_sum, eta / count, out=scratch)
    network.params -= step


def descend(gradient_sum: Callable[[Network, np.ndarray], tuple[np.ndarray, int]], network: Network,
            order: np.ndarray, first: int, last: int, batch_size: int, eta: float, lmbda: float = 0.0) -> None:
    """Mini-batch steps ``first`` to ``last - 1`` of an epoch shuffled as ``order``, one at a time:
    ``gradient_sum(network, batch)`` gives Σ_x ∂C_x/∂params and the count, then ``update_in_place``."""
    scratch = np.empty_like(network.params)
    for step in range(first, last):
        batch = order[step * batch_size : (step + 1) * batch_size]
        nabla, count = gradient_sum(network, batch)
        update_in_place(network, nabla, count, eta, lmbda, order.shape[0], scratch=scratch)
