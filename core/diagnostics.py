"""Per-layer diagnostics: how fast each layer learns, read off BP1-BP4.

Chapter 2 ends on a lesson: a weight learns slowly when its input neuron has low
activation (BP4: ∂C/∂w^l_jk = a^{l-1}_k δ^l_j) or its output neuron has saturated,
σ'(z) ≈ 0 (BP1, BP2). These numbers show it, layer by layer. They come from one
gradient pass (``core.backprop.gradient_sum`` with ``stats``), so every backend gives
the same. Layers are numbered as in the book: layer 2 is the first with weights.
"""

from __future__ import annotations

import numpy as np

from core.network import Network, split_params
from core.step import add_in_order

STATS = ("delta_abs_sum", "saturated_count", "low_input_count")  # per layer, in gradient_sum's stats

# Thresholds of the diagnostics (chapter 2's closing lesson): a neuron is saturated when
# σ'(z) < 0.01, i.e. |z| > 4.6 and a within 0.01 of 0 or 1 (σ' is at most 0.25); an input
# has low activation when a < 0.01.
SATURATED = 0.01
LOW_ACTIVATION = 0.01


def stats_size(sizes: list[int]) -> int:
    return len(STATS) * (len(sizes) - 1)


def layer_stats(activations: list[np.ndarray], deltas: list[np.ndarray], sigma, stats: np.ndarray) -> None:
    """Fill ``stats`` with each layer's sums over a batch, in the order of ``STATS``: Σ|δ^l|, the
    count of saturated neurons (σ'(z^l) < SATURATED) and the count of low activations feeding the
    layer (a^{l-1} < LOW_ACTIVATION). ``activations`` are a^1 … a^L and ``deltas`` δ^2 … δ^L of
    one backward pass, one column per example."""
    for layer, delta in enumerate(deltas):
        stats[3 * layer] = np.abs(delta).sum(dtype=np.float64)
        stats[3 * layer + 1] = np.count_nonzero(sigma.prime_from_output(activations[layer + 1]) < SATURATED)
        stats[3 * layer + 2] = np.count_nonzero(activations[layer] < LOW_ACTIVATION)


def add_with_stats(parts, stats) -> tuple[np.ndarray, int, np.ndarray]:
    """Chunk sums and their diagnostic sums, each added in chunk order: (nabla, count, stats)."""
    nabla, count = add_in_order(parts)
    total, _ = add_in_order((row, 0) for row in stats)
    return nabla, count, total


def layer_metrics(network: Network, nabla_sum: np.ndarray, count: int, stats: np.ndarray) -> dict[str, float]:
    """``layer{l}/{name}`` for every layer l, from one pass's sums and count.

    delta_mean_abs: mean |δ^l_j| over examples and neurons; grad_w_norm, grad_b_norm: the
    norms of ∂C/∂w^l and ∂C/∂b^l (the averaged gradient); saturated_fraction: the share of
    σ'(z^l_j) below ``SATURATED``; low_input_fraction: the share of the inputs
    a^{l-1}_k below ``LOW_ACTIVATION``; weight_norm: the Frobenius norm of w^l.
    """
    nabla_w, nabla_b = split_params(nabla_sum, network.sizes)
    out = {}
    for layer, (w, gw, gb) in enumerate(zip(network.weights, nabla_w, nabla_b)):
        n_out, n_in = w.shape
        delta_abs, saturated, low = stats[len(STATS) * layer : len(STATS) * (layer + 1)]
        prefix = f"layer{layer + 2}/"
        out[prefix + "delta_mean_abs"] = float(delta_abs) / (count * n_out)
        out[prefix + "grad_w_norm"] = float(np.linalg.norm(gw)) / count
        out[prefix + "grad_b_norm"] = float(np.linalg.norm(gb)) / count
        out[prefix + "saturated_fraction"] = float(saturated) / (count * n_out)
        out[prefix + "low_input_fraction"] = float(low) / (count * n_in)
        out[prefix + "weight_norm"] = float(np.linalg.norm(w))
    return out
