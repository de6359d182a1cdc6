"""Backpropagation, BP1–BP4, for one example and for a whole batch.

BP1: δ^L = ∇_a C ⊙ σ'(z^L)
BP2: δ^l = ((w^{l+1})^T δ^{l+1}) ⊙ σ'(z^l)
BP3: ∂C/∂b^l_j = δ^l_j
BP4: ∂C/∂w^l_jk = a^{l-1}_k δ^l_j
"""

from __future__ import annotations

import numpy as np

from core.functions import activation_named, cost_named, one_hot
from core.network import Network, split_params


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
    delta = cost.delta(activations[-1][None, :], y[None, :], sigma)[0]  # BP1
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


class Workspace:
    """Buffers for the batched backward pass, reused across steps.

    At a mini-batch of 10 the arithmetic is tiny and allocation is a large share of
    the time, so every intermediate array lives here. One workspace per thread; the
    compiled path (``core.kernels``) uses ``x``, ``activations`` and ``deltas`` too, with
    ``slots`` sets of them (``x_slots``, ...; slot 0 is the numpy path's), one for each chunk
    it computes at once on its own threads.
    Activations and errors are kept as the book writes them, one column per example,
    (n_l, m): the products then run on contiguous operands, which OpenBLAS does faster.
    """

    def __init__(self, sizes: list[int], rows: int, dtype, slots: int = 1):
        self.sizes, self.rows, self.dtype, self.slots = list(sizes), rows, np.dtype(dtype), slots
        slotted = lambda: tuple(np.empty((slots, n * rows), dtype) for n in sizes[1:])  # noqa: E731
        self.x_slots = np.empty((slots, rows * sizes[0]), dtype)  # chunks' rows gathered from the training set
        self.activation_slots, self.delta_slots = slotted(), slotted()  # a^l, δ^l
        self.x = self.x_slots[0]
        self.activations = tuple(a[0] for a in self.activation_slots)
        self.deltas = tuple(d[0] for d in self.delta_slots)
        self._primes = tuple(np.empty(n * rows, dtype) for n in sizes[1:])  # σ'(z^l)
        self._targets = np.zeros(sizes[-1] * rows, dtype)  # y(x), one-hot columns
        self.columns = np.arange(rows)
        self._views: dict[int, tuple] = {}
        self._nabla: tuple | None = None

    def fits(self, network: Network, rows: int, slots: int = 1) -> bool:
        return (self.sizes == network.sizes and self.dtype == network.dtype and rows <= self.rows
                and slots <= self.slots)

    def views(self, m: int) -> tuple[list, list, list, np.ndarray, np.ndarray]:
        """Contiguous (n_l, m) views of every buffer, made once per m."""
        if m not in self._views:
            shaped = lambda bufs: [b[: n * m].reshape(n, m) for b, n in zip(bufs, self.sizes[1:])]  # noqa: E731
            self._views[m] = (shaped(self.activations), shaped(self.deltas), shaped(self._primes),
                              self._targets[: self.sizes[-1] * m].reshape(self.sizes[-1], m), self.columns[:m])
        return self._views[m]

    def rows_of(self, m: int) -> np.ndarray:
        """The gathered-rows buffer as (m, n_0), one example per row."""
        return self.x[: m * self.sizes[0]].reshape(m, self.sizes[0])

    def nabla_views(self, out: np.ndarray) -> tuple[tuple, tuple]:
        """nabla_w and nabla_b views of ``out``, kept while the same array is passed again."""
        if self._nabla is None or self._nabla[0] is not out:
            nabla_w, nabla_b = split_params(out, self.sizes)
            self._nabla = (out, tuple(nabla_w), tuple(nabla_b))
        return self._nabla[1], self._nabla[2]


def gradient_sum(network: Network, x: np.ndarray, labels: np.ndarray, out: np.ndarray | None = None,
                 workspace: Workspace | None = None, stats: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Σ_x ∂C_x/∂params over the rows of x, fully matrix-based, and the example count.

    Returns (nabla, count): ``nabla`` is flat, laid out like ``network.params``
    (``split_params`` gives nabla_w and nabla_b). The input x has one example per row;
    inside, activations and errors have one per column, as in the book, so BP4's sum
    over examples of δ^l (a^{l-1})^T is the one product δ^l (a^{l-1})^T.

    With ``stats`` (float64, ``3 * (len(sizes) - 1)``), also fills per layer, in the
    order of ``core.diagnostics.STATS``: Σ|δ^l|, the count of saturated neurons
    (σ'(z^l) < SATURATED) and the count of low activations feeding the layer
    (a^{l-1} < LOW_ACTIVATION), all summed over the batch like the gradient.
    """
    m = labels.shape[0]
    if out is None:
        out = np.empty_like(network.params)
    if m == 0:
        out.fill(0.0)
        return out, 0
    if workspace is None or not workspace.fits(network, m):
        workspace = Workspace(network.sizes, m, network.dtype)
    sigma = activation_named(network.activation)
    cost = cost_named(network.cost)
    nabla_w, nabla_b = workspace.nabla_views(out)
    acts, deltas, primes, targets, columns = workspace.views(m)

    a_prev = x.T  # (n_0, m), a view
    for w, b, a in zip(network.weights, network.biases, acts):
        np.matmul(w, a_prev, out=a)  # z^l = w^l a^{l-1} + b^l, eq. 25  # (n_l, m)
        a += b[:, None]
        sigma.fn(a, out=a)
        a_prev = a

    targets.fill(0.0)
    targets[labels, columns] = 1.0  # y(x), one-hot columns
    cost.delta(acts[-1], targets, sigma, out=deltas[-1], scratch=primes[-1])  # BP1
    for layer in range(len(deltas) - 1, -1, -1):
        delta = deltas[layer]
        if layer == 0:
            np.matmul(delta, x, out=nabla_w[0])  # BP4, summed over the batch: δ^l (a^{l-1})^T
        else:
            np.matmul(delta, acts[layer - 1].T, out=nabla_w[layer])
        np.sum(delta, axis=1, out=nabla_b[layer])  # BP3, summed over the batch
        if layer > 0:
            below = deltas[layer - 1]
            np.matmul(network.weights[layer].T, delta, out=below)  # BP2
            below *= sigma.prime_from_output(acts[layer - 1], out=primes[layer - 1])
    if stats is not None:
        _layer_stats(x, acts, deltas, primes, sigma, stats)
    return out, m


# Thresholds of the diagnostics (chapter 2's closing lesson): a neuron is saturated when
# σ'(z) < 0.01, i.e. |z| > 4.6 and a within 0.01 of 0 or 1 (σ' is at most 0.25); an input
# has low activation when a < 0.01.
SATURATED = 0.01
LOW_ACTIVATION = 0.01


def _layer_stats(x, acts, deltas, primes, sigma, stats: np.ndarray) -> None:
    sigma.prime_from_output(acts[-1], out=primes[-1])  # the output layer's σ' is not kept by BP1
    for layer, (delta, prime) in enumerate(zip(deltas, primes)):
        a_in = x if layer == 0 else acts[layer - 1]
        stats[3 * layer] = np.abs(delta).sum(dtype=np.float64)
        stats[3 * layer + 1] = np.count_nonzero(prime < SATURATED)
        stats[3 * layer + 2] = np.count_nonzero(a_in < LOW_ACTIVATION)


def per_example_gradient_sum(network: Network, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """The same sum as ``gradient_sum``, one example at a time: the oracle for the batched path."""
    out = np.zeros_like(network.params)
    nabla_w, nabla_b = split_params(out, network.sizes)
    for xi, label in zip(x, labels):
        dw, db = backprop_example(network, xi, int(label))
        for acc, g in zip(nabla_w + nabla_b, dw + db):
            acc += g
    return out, labels.shape[0]
