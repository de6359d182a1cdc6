"""Per-layer diagnostics: how fast each layer learns, read off BP1-BP4.

Chapter 2 ends on a lesson: a weight learns slowly when its input neuron has low
activation (BP4: ∂C/∂w^l_jk = a^{l-1}_k δ^l_j) or its output neuron has saturated,
σ'(z) ≈ 0 (BP1, BP2). These numbers show it, layer by layer. They come from one
gradient pass (``gradient_sum`` with ``stats``), so every backend gives the same.
Layers are numbered as in the book: layer 2 is the first with weights.
"""

from __future__ import annotations

import numpy as np

from core.average import add_in_order
from core.network import Network, split_params

STATS = ("delta_abs_sum", "saturated_count", "low_input_count")  # per layer, in gradient_sum's stats


def stats_size(sizes: list[int]) -> int:
    return len(STATS) * (len(sizes) - 1)


def add_with_stats(parts, stats) -> tuple[np.ndarray, int, np.ndarray]:
    """Chunk sums and their diagnostic sums, each added in chunk order: (nabla, count, stats)."""
    nabla, count = add_in_order(parts)
    total = stats[0].copy()
    for row in stats[1:]:
        total += row
    return nabla, count, total


def layer_metrics(network: Network, nabla_sum: np.ndarray, count: int, stats: np.ndarray) -> dict[str, float]:
    """``layer{l}/{name}`` for every layer l, from one pass's sums and count.

    delta_mean_abs: mean |δ^l_j| over examples and neurons; grad_w_norm, grad_b_norm: the
    norms of ∂C/∂w^l and ∂C/∂b^l (the averaged gradient); saturated_fraction: the share of
    σ'(z^l_j) below ``core.backprop.SATURATED``; low_input_fraction: the share of the inputs
    a^{l-1}_k below ``core.backprop.LOW_ACTIVATION``; weight_norm: the Frobenius norm of w^l.
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
