"""The book's reference algorithm: backprop one example at a time, summed over the mini-batch.

A short reimplementation of ``network.py``'s ``update_mini_batch`` and ``backprop``
(column vectors, a Python loop over the examples), for comparison only.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class BookNetwork:
    def __init__(self, weights: list[np.ndarray], biases: list[np.ndarray]):
        self.weights = [w.copy() for w in weights]
        self.biases = [b.reshape(-1, 1).copy() for b in biases]

    def update_mini_batch(self, xs: np.ndarray, labels: np.ndarray, eta: float) -> None:
        nabla_b = [np.zeros(b.shape) for b in self.biases]
        nabla_w = [np.zeros(w.shape) for w in self.weights]
        for x, label in zip(xs, labels):
            y = np.zeros((self.biases[-1].shape[0], 1))
            y[label] = 1.0
            delta_nabla_b, delta_nabla_w = self.backprop(x.reshape(-1, 1), y)
            nabla_b = [nb + dnb for nb, dnb in zip(nabla_b, delta_nabla_b)]
            nabla_w = [nw + dnw for nw, dnw in zip(nabla_w, delta_nabla_w)]
        self.weights = [w - (eta / len(xs)) * nw for w, nw in zip(self.weights, nabla_w)]
        self.biases = [b - (eta / len(xs)) * nb for b, nb in zip(self.biases, nabla_b)]

    def backprop(self, x, y):
        nabla_b = [np.zeros(b.shape) for b in self.biases]
        nabla_w = [np.zeros(w.shape) for w in self.weights]
        activation, activations, zs = x, [x], []
        for b, w in zip(self.biases, self.weights):
            z = np.dot(w, activation) + b
            zs.append(z)
            activation = _sigmoid(z)
            activations.append(activation)
        delta = (activations[-1] - y) * _sigmoid(zs[-1]) * (1 - _sigmoid(zs[-1]))
        nabla_b[-1] = delta
        nabla_w[-1] = np.dot(delta, activations[-2].transpose())
        for layer in range(2, len(self.weights) + 1):
            sp = _sigmoid(zs[-layer]) * (1 - _sigmoid(zs[-layer]))
            delta = np.dot(self.weights[-layer + 1].transpose(), delta) * sp
            nabla_b[-layer] = delta
            nabla_w[-layer] = np.dot(delta, activations[-layer - 1].transpose())
        return nabla_b, nabla_w
