"""Files a user brings: MNIST's IDX files, an .npz, Parquet, the book's pickle, read into a ``Source``
(``jobs.data`` splits it into a ``Dataset``).

The shape contract of ``jobs.data`` holds here: x float64 of shape (n, n_inputs), y int64 labels in
[0, n_classes).
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs.errors import UserError, first_line


class DataError(UserError, ValueError):
    """A dataset that cannot be used; the message names the file or name and the problem."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # (n_train, n_inputs)
    y_train: np.ndarray  # (n_train,)
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    digest: str = field(default="")  # sha256 of every array (a sharded folder: of its manifest), for tracking
    shards: object = None  # a sharded folder's jobs.shards.Manifest; a Ray driver's Dataset then holds no rows

    @property
    def n_inputs(self) -> int:
        return self.shards.width if self.shards is not None else self.x_train.shape[1]

    @property
    def n_train(self) -> int:
        return self.shards.rows("train") if self.shards is not None else self.y_train.shape[0]

    @property
    def n_validation(self) -> int:
        return self.shards.rows("validation") if self.shards is not None else self.y_validation.shape[0]

    @property
    def max_label(self) -> int:
        if self.shards is not None:
            return self.shards.max_label
        return int(max(self.y_train.max(initial=0), self.y_test.max(initial=0)))

    @property
    def image_shape(self) -> tuple[int, int] | None:
        if self.shards is not None:
            return self.shards.image_shape
        side = int(round(self.n_inputs**0.5))
        return (side, side) if side * side == self.n_inputs and self.name != "synthetic" else None


@dataclass
class Source:
    """A dataset's examples as read, before its split (``jobs.data.split``)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    n_classes: int
    default_test: int
    origin: object = None


def describe_sources() -> str:
    return ("a bundled dataset (digits, mnist-5k, synthetic or synthetic:N:INPUTS:CLASSES), a folder written "
            "by `gradavg data shard`, a folder with MNIST's IDX files, an .npz with arrays x and y, Parquet (a "
            "file or a folder of them: labels y, inputs x or the other numeric columns), or the book's "
            "mnist.pkl.gz (with allow_pickle=true)")


# ---------------------------------------------------------------- files a user brings

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def load_path(path: Path, allow_pickle: bool) -> Source:
    """The examples of a file or folder a user brings, by its format."""
    if not path.exists():
        raise DataError(f"data={str(path)!r}: no such file or folder; use {describe_sources()}")
    if path.is_dir():
        if next(path.glob("*.parquet"), None) is not None:
            return _load_parquet(path)
        if next(path.glob("block-*.x.npy"), None) is not None:
            raise DataError(f"data={str(path)!r}: holds blocks but no manifest.json, so it is no sharded dataset; "
                            "shard the source again with `gradavg data shard SOURCE OUT`")
        return _load_idx_dir(path)
    regular_file(path, "data")
    name = path.name
    if name.endswith(".npz"):
        return _load_npz(path)
    if name.endswith(".parquet"):
        return _load_parquet(path)
    if name.endswith(".pkl.gz") or name.endswith(".pkl"):
        return _load_book_pickle(path, allow_pickle)
    if "idx3-ubyte" in name:
        return _load_idx_dir(path.parent)
    raise DataError(f"{path}: unknown format; use {describe_sources()}")


def regular_file(path: Path, what: str) -> None:
    """Refuse what is not a plain file (a FIFO, a device, a socket) before it is opened: opening one can wait
    forever for a writer."""
    if path.exists() and not path.is_file():
        raise DataError(f"{what}={str(path)!r}: is not a regular file (a FIFO, a device or a socket); pass a file")


def _open_maybe_gz(path: Path) -> bytes:
    regular_file(path, "data")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied); check the file's permissions") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e}); the file is damaged, download it again") from None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic 0x0000080N for N dimensions of unsigned bytes."""
    raw = _open_maybe_gz(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        # the file's own bytes are not quoted: a path given by mistake may be a private file's
        raise DataError(f"{path}: not an MNIST IDX file (it does not start with IDX's magic number 0x00000801 "
                        "for labels or 0x00000803 for images)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)  # Python ints: a forged header cannot overflow
    if len(raw) - header < expected:
        raise DataError(f"{path}: truncated: holds {len(raw) - header} of the {expected} bytes its header "
                        f"promises for shape {dims}; download it again")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / candidate).exists():
            return folder / candidate
    return None


def _load_idx_pair(folder: Path, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray] | None:
    images_path = _find_idx(folder, IDX_FILES[images_key])
    labels_path = _find_idx(folder, IDX_FILES[labels_key])
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = IDX_FILES[images_key] if images_path is None else IDX_FILES[labels_key]
        raise DataError(f"{folder}: {missing}[.gz] is missing; images and labels come in pairs")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path}: expected 3-D images and 1-D labels, got {images.ndim}-D and {labels.ndim}-D")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path}: {images.shape[0]} images but {labels_path.name} has "
                        f"{labels.shape[0]} labels; the counts must agree")
    x = images.reshape(images.shape[0], math.prod(images.shape[1:])) / 255.0
    return x, _check_labels(labels.astype(np.int64), 10, labels_path)


def _load_idx_dir(folder: Path) -> Source:
    train = _load_idx_pair(folder, "train_images", "train_labels")
    if train is None:
        raise DataError(f"{folder}: no {IDX_FILES['train_images']}[.gz] here; use {describe_sources()}")
    test = _load_idx_pair(folder, "test_images", "test_labels")
    x_test, y_test = test if test is not None else (None, None)
    return Source(f"idx:{folder.name}", *train, x_test, y_test, 10, default_test=len(train[1]) // 10,
                   origin=folder)


def _load_npz(path: Path) -> Source:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise DataError(f"{path}: not a readable .npz (no zip header); save it with numpy.savez")
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied); check the file's permissions") from None
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{path}: holds pickled objects ({e}); save plain numeric arrays x and y") from None
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError: a damaged archive
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e}); save it again") from None
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path}: needs arrays 'x' (examples as rows) and 'y' (integer labels); "
                        f"it has {sorted(arrays)}")
    x, y = _npz_pair(path, arrays["x"], arrays["y"])
    n_classes = _npz_classes(path, arrays["n_classes"]) if "n_classes" in arrays else int(y.max(initial=0)) + 1
    x_test = y_test = None
    if ("x_test" in arrays) != ("y_test" in arrays):
        given, missing = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise DataError(f"{path}: has {given} but no {missing}; save both (a test set) or neither (a test set is "
                        "then held out of x and y)")
    if "x_test" in arrays and "y_test" in arrays:
        x_test, y_test = _npz_pair(path, arrays["x_test"], arrays["y_test"])
        n_classes = max(n_classes, int(y_test.max(initial=0)) + 1) if "n_classes" not in arrays else n_classes
        y_test = _check_labels(y_test, n_classes, path)
    return Source(f"npz:{path.stem}", x, _check_labels(y, n_classes, path), x_test, y_test, n_classes,
                   default_test=len(y) // 10, origin=path)


LABEL_COLUMNS = ("y", "label")


def _load_parquet(path: Path) -> Source:
    """Parquet written elsewhere (pandas, Spark, Ray Data's ``write_parquet``): one file, or a folder of them
    read in name order, rows in file order. The labels are column ``y`` (or ``label``); the inputs a list
    column ``x``, or else every other numeric column, in the schema's order. Read through pyarrow, which
    MLflow installs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    try:
        tables = [pq.read_table(f) for f in files]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied); check the files' permissions") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not readable Parquet ({first_line(e, 160)}); write it again") from None
    names = table.schema.names
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    if label is None:
        raise DataError(f"{path}: has no label column ({' or '.join(LABEL_COLUMNS)}); its columns are "
                        f"{', '.join(names[:10])}{', …' if len(names) > 10 else ''}")
    y = table.column(label).to_numpy()
    kind = {c: table.schema.field(c).type for c in names}
    if "x" in names and (pa.types.is_list(kind["x"]) or pa.types.is_fixed_size_list(kind["x"])):
        column = table.column("x").combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False)
        if y.size and values.size % y.size:
            raise DataError(f"{path}: the lists in column x are not all of one length; every example needs the "
                            "same inputs")
        x = values.reshape(y.size, -1) if y.size else values.reshape(0, 0)
    else:
        inputs = [c for c in names if c != label and (pa.types.is_integer(kind[c]) or pa.types.is_floating(kind[c]))]
        if not inputs:
            raise DataError(f"{path}: has no input columns (a list column x, or numeric columns besides {label})")
        x = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in inputs])
    x, y = _npz_pair(path, x, y)
    n_classes = int(y.max(initial=0)) + 1
    return Source(f"parquet:{path.stem}", x, _check_labels(y, n_classes, path), None, None, n_classes,
                   default_test=len(y) // 10, origin=path)


def _npz_pair(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: x must be (examples, inputs…) and y (examples,) with one label per row; "
                        f"got x {x.shape} and y {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"{path}: labels y must be whole numbers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() > _MAX_LABEL):  # before the cast to int64, which would wrap them
        bad = y[(y < 0) | (y > _MAX_LABEL)][0]
        bad = int(bad) if np.issubdtype(y.dtype, np.integer) else f"{bad:.0f}"  # exact, however large
        raise DataError(f"{path}: label {bad} is out of range; labels are class numbers 0, 1, 2, …")
    if np.iscomplexobj(x):
        raise DataError(f"{path}: x is complex ({x.dtype}); inputs must be real numbers")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: x must be numeric, got dtype {x.dtype}")
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).astype(np.float64), y.astype(np.int64)


_MAX_LABEL = 1_000_000  # a class number beyond this is a mistake in the file, not a class


def _npz_classes(path: Path, value: np.ndarray) -> int:
    if value.shape != () or not np.issubdtype(value.dtype, np.integer) or not 2 <= int(value) <= _MAX_LABEL + 1:
        raise DataError(f"{path}: n_classes must be one whole number >= 2, got {value.dtype} {value.shape} "
                        f"{str(value)[:40]}; drop it to count the classes from y")
    return int(value)


def _load_book_pickle(path: Path, allow_pickle: bool) -> Source:
    if not allow_pickle:
        raise DataError(f"{path}: is a pickle, and unpickling a file can run any code in it; "
                        "if you trust it, pass allow_pickle=true, or convert it to .npz")
    raw = _open_maybe_gz(path)
    try:
        training, validation, test = pickle.loads(raw, encoding="latin1")  # the book's Python 2 pickle
    except Exception as e:
        raise DataError(f"{path}: not the book's mnist.pkl.gz (a pickled (training, validation, test) "
                        f"triple): {type(e).__name__}: {e}") from None
    x = np.concatenate([training[0], validation[0]]).astype(np.float64)
    y = np.concatenate([training[1], validation[1]]).astype(np.int64)
    x_test, y_test = np.asarray(test[0], dtype=np.float64), np.asarray(test[1], dtype=np.int64)
    return Source(f"pkl:{path.name}", x, _check_labels(y, 10, path), x_test, _check_labels(y_test, 10, path),
                   10, default_test=0, origin=path)


def _check_labels(y: np.ndarray, n_classes: int, origin) -> np.ndarray:
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        bad = int(y[(y < 0) | (y >= n_classes)][0])
        raise DataError(f"{origin}: label {bad} is out of range; labels must lie in [0, {n_classes})")
    return y
