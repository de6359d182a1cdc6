"""Backprop's gradient against central finite differences."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from core.backprop import gradient_sum
from core.network import Network, split_params


def finite_difference_gradient(network: Network, x: np.ndarray, labels: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """∂C/∂params of the mean cost, by (C(p + h) − C(p − h)) / 2h, one parameter at a time.

    Computed on a float64 copy whatever the network's dtype, so that a float32
    backprop is judged against a reference better than itself.
    """
    probe = network.astype("float64")
    x64 = np.asarray(x, dtype=np.float64)
    grad = np.empty_like(probe.params)
    for i in range(probe.params.size):
        saved = probe.params[i]
        probe.params[i] = saved + h
        plus, _ = probe.evaluate(x64, labels)
        probe.params[i] = saved - h
        minus, _ = probe.evaluate(x64, labels)
        probe.params[i] = saved
        grad[i] = (plus - minus) / (2 * h)
    return grad


GradientSum = Callable[[Network, np.ndarray, np.ndarray], tuple[np.ndarray, int]]


def gradient_check(network: Network, x: np.ndarray, labels: np.ndarray, h: float = 1e-5,
                   gradient: GradientSum | None = None) -> float:
    """The worst relative error between backprop and finite differences over all layers.

    For each weight matrix and bias vector, ‖g_bp − g_fd‖ / (‖g_bp‖ + ‖g_fd‖); the
    maximum over them is returned. A norm per array, rather than per entry, keeps
    entries that are zero up to rounding from dominating. ``gradient`` computes the
    backprop sum and count (default: numpy's ``gradient_sum``; training's compiled path
    is ``core.kernels.compiled_gradient_sum``).
    """
    gradient = gradient or gradient_sum
    nabla, count = gradient(network, np.asarray(x, dtype=network.dtype), labels)
    backprop = nabla.astype(np.float64) / count
    numeric = finite_difference_gradient(network, x, labels, h)
    worst = 0.0
    bp_w, bp_b = split_params(backprop, network.sizes)
    fd_w, fd_b = split_params(numeric, network.sizes)
    for g_bp, g_fd in zip(bp_w + bp_b, fd_w + fd_b):
        scale = np.linalg.norm(g_bp) + np.linalg.norm(g_fd)
        if scale > 0:
            worst = max(worst, float(np.linalg.norm(g_bp - g_fd) / scale))
    return worst


# Relative error a correct backprop stays under, by dtype.
TOLERANCES = {"float64": 1e-7, "float32": 1e-4}
