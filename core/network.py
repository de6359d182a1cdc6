"""A feedforward network in the book's notation, stored in one flat parameter vector.

Weights w^l have shape (n_l, n_{l-1}) and biases b^l shape (n_l,), l = 1 … L-1 in the
book's indexing (index 0 here is the book's layer 2). All of them are views into a
single contiguous vector ``params``: weights first, then biases. One vector makes the
update one operation, the broadcast to workers one object, and L2 decay a slice.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.functions import activation_named, cost_named, one_hot

INITS = ("standard", "scaled")
DTYPES = {"float64": np.float64, "float32": np.float32}


def parameter_count(sizes: list[int]) -> int:
    return sum(n_out * n_in for n_in, n_out in zip(sizes[:-1], sizes[1:])) + sum(sizes[1:])


def weight_count(sizes: list[int]) -> int:
    return sum(n_out * n_in for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def split_params(params: np.ndarray, sizes: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Views of a flat vector as weight matrices and bias vectors (weights first)."""
    weights, biases, offset = [], [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        weights.append(params[offset : offset + n_out * n_in].reshape(n_out, n_in))  # (n_out, n_in)
        offset += n_out * n_in
    for n_out in sizes[1:]:
        biases.append(params[offset : offset + n_out])  # (n_out,)
        offset += n_out
    return weights, biases


def join_params(weights: list[np.ndarray], biases: list[np.ndarray]) -> np.ndarray:
    """The flat vector ``split_params`` splits: every weight matrix, then every bias vector."""
    return np.concatenate([w.ravel() for w in weights] + list(biases))


def write_npz(path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to ``path``, atomically: written to a temporary file beside it and flushed to
    disk, then renamed, so that a file under the final name is always whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


@dataclass
class Network:
    sizes: list[int]
    params: np.ndarray  # flat, weights then biases
    cost: str = "quadratic"
    activation: str = "sigmoid"

    def __post_init__(self):
        self.sizes = [int(n) for n in self.sizes]
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"sizes must list at least two positive layer sizes, got {self.sizes}")
        if self.params.shape != (parameter_count(self.sizes),):
            raise ValueError(f"params has shape {self.params.shape}, sizes {self.sizes} need "
                             f"({parameter_count(self.sizes)},)")
        cost_named(self.cost)
        activation_named(self.activation)
        self.weights, self.biases = split_params(self.params, self.sizes)

    @classmethod
    def create(cls, sizes, init: str = "standard", seed: int = 0, cost: str = "quadratic",
               activation: str = "sigmoid", dtype: str = "float64", init_scale: float = 1.0) -> "Network":
        """Gaussian initialisation from an explicit seed.

        ``standard``: weights and biases N(0, 1), the book's chapter 1 network.
        ``scaled``: weights N(0, 1/n_in), biases N(0, 1), the book's chapter 3.
        ``init_scale`` multiplies the initial weights (large values start the network saturated).
        Draws happen in float64 (biases first, then weights, as the book does) so a
        float32 network starts from the same values, rounded.
        """
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        sizes = [int(n) for n in sizes]
        rng = np.random.default_rng(seed)
        biases = [rng.standard_normal(n_out) for n_out in sizes[1:]]
        weights = [rng.standard_normal((n_out, n_in)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        if init == "scaled":
            weights = [w / np.sqrt(w.shape[1]) for w in weights]
        weights = [w * init_scale for w in weights]
        params = join_params(weights, biases).astype(dtype_named(dtype))
        return cls(sizes, params, cost, activation)

    @property
    def dtype(self) -> np.dtype:
        return self.params.dtype

    @property
    def n_weights(self) -> int:
        return weight_count(self.sizes)

    def copy(self) -> "Network":
        return Network(list(self.sizes), self.params.copy(), self.cost, self.activation)

    def astype(self, dtype: str) -> "Network":
        return Network(list(self.sizes), self.params.astype(dtype_named(dtype)), self.cost, self.activation)

    def feedforward(self, x: np.ndarray) -> np.ndarray:
        """Eq. 25, a^l = σ(w^l a^{l-1} + b^l), for a batch of rows at once.  # (m, n_L)

        Rows are examples, so the product is a^{l-1} (w^l)^T.
        """
        sigma = activation_named(self.activation).fn
        a = np.asarray(x, dtype=self.dtype)
        for w, b in zip(self.weights, self.biases):
            z = a @ w.T
            z += b
            a = sigma(z, out=z)
        return a

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The digit each row is taken for: the output neuron with the largest activation."""
        return np.argmax(self.feedforward(x), axis=1)

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch_rows: int = 10_000) -> tuple[float, float]:
        """Mean cost C = (1/n) Σ_x C_x (without the L2 term) and accuracy on a dataset."""
        n = labels.shape[0]
        if n == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        total_cost, correct, _ = self.evaluate_sums(x, labels, batch_rows)
        return total_cost / n, correct / n

    def evaluate_sums(self, x: np.ndarray, labels: np.ndarray, batch_rows: int = 10_000
                      ) -> tuple[float, int, np.ndarray]:
        """What ``evaluate`` divides by n: Σ_x C_x (in float64, ``batch_rows`` examples at a time) and how
        many are right; and the class predicted for each example. Data held in blocks is evaluated a block at
        a time and the sums added in block order, wherever the blocks are."""
        cost = cost_named(self.cost)
        total_cost, correct = 0.0, 0
        predicted = np.empty(labels.shape[0], np.int64)
        for start in range(0, labels.shape[0], batch_rows):
            a = self.feedforward(x[start : start + batch_rows])
            part = labels[start : start + batch_rows]
            y = one_hot(part, self.sizes[-1], dtype=a.dtype)
            total_cost += float(cost.per_example(a, y).sum(dtype=np.float64))
            predicted[start : start + batch_rows] = np.argmax(a, axis=1)
            correct += int(np.count_nonzero(predicted[start : start + batch_rows] == part))
        return total_cost, correct, predicted

    def save(self, path) -> None:
        """Write ``.npz`` readable with ``allow_pickle=False``, atomically (``write_npz``)."""
        arrays = {f"weights_{i}": w for i, w in enumerate(self.weights)}
        arrays.update({f"biases_{i}": b for i, b in enumerate(self.biases)})
        arrays.update(sizes=np.array(self.sizes, dtype=np.int64), cost=np.array(self.cost),
                      activation=np.array(self.activation))
        write_npz(path, arrays)

    @classmethod
    def load(cls, path) -> "Network":
        """Read what ``save`` wrote. Every array is checked against ``sizes`` from its header
        before it is read, so a damaged or forged file is refused rather than allocated."""
        try:
            with np.load(path, allow_pickle=False) as data:
                sizes = _read_sizes(path, data)
                n_layers = len(sizes) - 1
                shapes = {f"weights_{i}": (sizes[i + 1], sizes[i]) for i in range(n_layers)}
                shapes.update({f"biases_{i}": (sizes[i + 1],) for i in range(n_layers)})
                arrays = {name: _read_array(path, data, name, shape) for name, shape in shapes.items()}
                cost, activation = _read_text(path, data, "cost"), _read_text(path, data, "activation")
        except KeyError as e:
            raise ValueError(f"{path}: not a gradavg weights file, missing array {e}") from None
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as e:
            # an entry flagged encrypted (RuntimeError), an unknown compression method (NotImplementedError)
            raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
        weights = [arrays[f"weights_{i}"] for i in range(n_layers)]
        biases = [arrays[f"biases_{i}"] for i in range(n_layers)]
        params = join_params(weights, biases)
        if not np.all(np.isfinite(params)):
            raise ValueError(f"{path}: the weights contain NaN or Inf (saved from a diverged run?)")
        return cls(sizes, params, cost, activation)


def _read_sizes(path, data) -> list[int]:
    shape, dtype = _header(data, "sizes")
    sizes = data["sizes"] if len(shape) == 1 and shape[0] <= 1000 else None
    if sizes is None or sizes.size < 2 or dtype.kind not in "iu" or sizes.min() < 1:
        raise ValueError(f"{path}: sizes must be a list of at least two positive whole numbers, got "
                         f"{dtype} of shape {shape}")
    return [int(n) for n in sizes]


def _read_array(path, data, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One array of a weights file, its shape and type checked before it is read."""
    header_shape, dtype = _header(data, name)
    if header_shape != shape:
        raise ValueError(f"{path}: {name} has shape {header_shape} but sizes need {shape}")
    if dtype.kind != "f":
        raise ValueError(f"{path}: {name} holds {dtype}, not floating-point numbers")
    return data[name]


def _header(data, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """An array's shape and dtype from its .npy header inside the .npz, without reading the array."""
    with data.zip.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _read_text(path, data, name: str) -> str:
    value = data[name]
    if value.shape != () or value.dtype.kind != "U":
        raise ValueError(f"{path}: {name} must be one name, got {value.dtype} of shape {value.shape}")
    return str(value)


def dtype_named(name: str) -> np.dtype:
    try:
        return np.dtype(DTYPES[name])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None
