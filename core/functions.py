"""Activations and costs, each a pair of functions with one shared signature.

They are looked up by the name a config uses in ``ACTIVATIONS`` and ``COSTS``.
``per_example`` takes examples as rows, ``a`` and ``y`` of shape (m, n_L); the deltas and
activations are elementwise, so they take arrays of any shape: one example, or the
one-column-per-example matrices of ``gradient_sum``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def sigmoid(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """σ(z) = 1 / (1 + e^{-z}), elementwise (eq. 3 of chapter 1)."""
    out = np.negative(z, out=out)
    with np.errstate(over="ignore", under="ignore"):  # e^{-z} -> inf gives σ = 0, as it should
        np.exp(out, out=out)
    out += 1.0
    return np.reciprocal(out, out=out)


def sigmoid_prime_from_output(a: np.ndarray) -> np.ndarray:
    """σ'(z) = σ(z)(1 − σ(z)), computed from a = σ(z) so z need not be kept."""
    return (1.0 - a) * a


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[..., np.ndarray]  # (z, out=None) -> σ(z); out=z computes it in place
    prime_from_output: Callable[[np.ndarray], np.ndarray]  # a = σ(z) -> σ'(z)


@dataclass(frozen=True)
class Cost:
    """A per-example cost C_x and its output error δ^L (BP1)."""

    name: str
    # (a, y) -> C_x for each row, shape (m,)
    per_example: Callable[[np.ndarray, np.ndarray], np.ndarray]
    # (a, y, activation) -> δ^L, elementwise, the shape of a
    delta: Callable[[np.ndarray, np.ndarray, Activation], np.ndarray]


def _quadratic_per_example(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """C_x = ½‖y − a^L‖² (eq. 26 without the 1/n, which the average supplies)."""
    diff = a - y
    return 0.5 * np.einsum("ij,ij->i", diff, diff)


def _quadratic_delta(a: np.ndarray, y: np.ndarray, activation: Activation) -> np.ndarray:
    """BP1: δ^L = (a^L − y) ⊙ σ'(z^L)."""
    return (a - y) * activation.prime_from_output(a)


def _cross_entropy_per_example(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """C_x = −Σ_j [y_j ln a_j + (1 − y_j) ln(1 − a_j)] (chapter 3, eq. 63).

    ``nan_to_num`` turns 0·ln 0 into 0 and ln 0 into a large finite number, as the
    book's ``CrossEntropyCost.fn`` does.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.nan_to_num(-y * np.log(a) - (1.0 - y) * np.log(1.0 - a))
    return terms.sum(axis=1)


def _cross_entropy_delta(a: np.ndarray, y: np.ndarray, activation: Activation) -> np.ndarray:
    """BP1 for cross-entropy with sigmoid output: the σ'(z^L) cancels, δ^L = a^L − y."""
    if activation.name != "sigmoid":
        raise ValueError(f"cross_entropy's δ^L = a − y holds for sigmoid output, not {activation.name!r}")
    return a - y


ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation("sigmoid", sigmoid, sigmoid_prime_from_output),
}

COSTS: dict[str, Cost] = {
    "quadratic": Cost("quadratic", _quadratic_per_example, _quadratic_delta),
    "cross_entropy": Cost("cross_entropy", _cross_entropy_per_example, _cross_entropy_delta),
}


def activation_named(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


def cost_named(name: str) -> Cost:
    try:
        return COSTS[name]
    except KeyError:
        raise ValueError(f"unknown cost {name!r}; valid: {', '.join(COSTS)}") from None


def one_hot(labels: np.ndarray, n_classes: int, dtype=np.float64) -> np.ndarray:
    """Desired outputs y(x) as rows: 1.0 at the label, 0.0 elsewhere.  # (m, n_classes)"""
    y = np.zeros((labels.shape[0], n_classes), dtype=dtype)
    y[np.arange(labels.shape[0]), labels] = 1.0
    return y
