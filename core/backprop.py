"""Backpropagation, BP1–BP4, for one example and for a whole batch: the reference.

BP1: δ^L = ∇_a C ⊙ σ'(z^L)
BP2: δ^l = ((w^{l+1})^T δ^{l+1}) ⊙ σ'(z^l)
BP3: ∂C/∂b^l_j = δ^l_j
BP4: ∂C/∂w^l_jk = a^{l-1}_k δ^l_j

Tests, the gradient check and the diagnostics use these; training runs a compiled copy of
``gradient_sum`` (``core.kernels``), held to them by tests.
"""

from __future__ import annotations

import numpy as np

from core.diagnostics import layer_stats
from core.functions import activation_named, cost_named, one_hot
from core.network import Network, join_params, split_params


def backprop_example(network: Network, x: np.ndarray, label: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """∂C_x/∂w and ∂C_x/∂b for one training example x, as the book's ``backprop`` does.

    Returns (nabla_w, nabla_b): lists shaped like ``network.weights`` and ``network.biases``.
    This is the reference the batched path is tested against; it is not fast.
    """
    sigma = activation_named(network.activation)
    cost = cost_named(network.cost)
    activation = np.asarray(x, dtype=network.dtype)
    activations = [activation]  # a^1 … a^L, each (n_l,)
    for w, b in zip(network.weights, network.biases):
        z = w @ activation + b  # eq. 25
        activation = sigma.fn(z)
        activations.append(activation)
    y = one_hot(np.array([label]), network.sizes[-1], dtype=network.dtype)[0]
    delta = cost.delta(activations[-1], y, sigma)  # BP1
    nabla_w = [np.empty(0)] * len(network.weights)
    nabla_b = [np.empty(0)] * len(network.biases)
    nabla_b[-1] = delta  # BP3
    nabla_w[-1] = np.outer(delta, activations[-2])  # BP4
    for layer in range(2, len(network.sizes)):
        sp = sigma.prime_from_output(activations[-layer])
        delta = (network.weights[-layer + 1].T @ delta) * sp  # BP2
        nabla_b[-layer] = delta
        nabla_w[-layer] = np.outer(delta, activations[-layer - 1])
    return nabla_w, nabla_b


def gradient_sum(network: Network, x: np.ndarray, labels: np.ndarray,
                 stats: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Σ_x ∂C_x/∂params over the rows of x, fully matrix-based, and the example count.

    ``backprop_example`` for all examples at once: each a^l and δ^l becomes a matrix with one
    column per example, so BP3's sum over examples is a row sum and BP4's Σ_x δ^l (a^{l-1})^T
    is the one product δ^l (a^{l-1})^T. Returns (nabla, count): ``nabla`` is flat, laid out like
    ``network.params`` (``split_params`` gives nabla_w and nabla_b).

    With ``stats`` (float64, ``core.diagnostics.stats_size(sizes)``), also fills the per-layer
    diagnostic sums of ``core.diagnostics.layer_stats``.
    """
    m = labels.shape[0]
    if m == 0:
        return np.zeros_like(network.params), 0
    sigma = activation_named(network.activation)
    cost = cost_named(network.cost)
    # The one departure from the book's notation: the API takes examples as rows, x (m, n_0);
    # transposed here, every matrix below has the book's one column per example.
    activation = np.asarray(x, dtype=network.dtype).T  # (n_0, m)
    activations = [activation]
    for w, b in zip(network.weights, network.biases):
        z = w @ activation + b[:, None]  # eq. 25  # (n_l, m)
        activation = sigma.fn(z)
        activations.append(activation)
    y = one_hot(labels, network.sizes[-1], dtype=network.dtype).T  # (n_L, m)
    delta = cost.delta(activations[-1], y, sigma)  # BP1  # (n_L, m)
    deltas = [delta]  # δ^L … δ^2, kept for the diagnostics
    nabla_w = [np.empty(0)] * len(network.weights)
    nabla_b = [np.empty(0)] * len(network.biases)
    nabla_b[-1] = delta.sum(axis=1)  # BP3, summed over the batch
    nabla_w[-1] = delta @ activations[-2].T  # BP4, summed over the batch
    for layer in range(2, len(network.sizes)):
        sp = sigma.prime_from_output(activations[-layer])
        delta = (network.weights[-layer + 1].T @ delta) * sp  # BP2
        deltas.append(delta)
        nabla_b[-layer] = delta.sum(axis=1)
        nabla_w[-layer] = delta @ activations[-layer - 1].T
    if stats is not None:
        layer_stats(activations, deltas[::-1], sigma, stats)
    return join_params(nabla_w, nabla_b), m


def per_example_gradient_sum(network: Network, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """The same sum as ``gradient_sum``, one example at a time: the oracle for the batched path."""
    out = np.zeros_like(network.params)
    nabla_w, nabla_b = split_params(out, network.sizes)
    for xi, label in zip(x, labels):
        dw, db = backprop_example(network, xi, int(label))
        for acc, g in zip(nabla_w + nabla_b, dw + db):
            acc += g
    return out, labels.shape[0]
