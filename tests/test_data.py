"""Every loader round-trips its format, and every corruption gets its own clear error."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from jobs.data import DataError, load_dataset, save_npz, synthetic
from jobs.formats import read_idx


def write_idx(path, array: np.ndarray, gz=False):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def mnist_folder(tmp_path, n_train=50, n_test=20, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        write_idx(tmp_path / name, arr, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = mnist_folder(tmp_path, gz=gz)
    data = load_dataset(str(tmp_path), validation_size=10)
    assert data.x_train.shape == (40, 784) and data.x_validation.shape == (10, 784)
    np.testing.assert_array_equal(data.x_test, arrays["t10k-images-idx3-ubyte"].reshape(20, 784) / 255.0)
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    together = np.concatenate([data.x_train, data.x_validation]) * 255
    expected = arrays["train-images-idx3-ubyte"].reshape(50, 784)
    assert sorted(map(bytes, together.astype(np.uint8))) == sorted(map(bytes, expected.astype(np.uint8)))
    assert data.x_train.dtype == np.float64 and data.y_train.dtype == np.int64 and data.n_classes == 10


def test_npz_round_trip(tmp_path):
    x, y = synthetic(300, 12, 4, seed=2)
    save_npz(tmp_path / "d.npz", x, y)
    data = load_dataset(str(tmp_path / "d.npz"), validation_size=20, test_size=30)
    assert (data.x_train.shape[0], data.x_validation.shape[0], data.x_test.shape[0]) == (250, 20, 30)
    assert data.n_classes == 4 and data.n_inputs == 12
    rows = {x[i].tobytes(): y[i] for i in range(300)}
    for xs, ys in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert all(rows[xi.tobytes()] == yi for xi, yi in zip(xs, ys))


def test_book_pickle_needs_opt_in(tmp_path):
    rng = np.random.default_rng(0)
    part = lambda n: (rng.random((n, 784)).astype(np.float32), rng.integers(0, 10, n))  # noqa: E731
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump((part(30), part(10), part(5)), f)
    with pytest.raises(DataError, match="unpickling a file can run any code.*allow_pickle=true"):
        load_dataset(str(tmp_path / "mnist.pkl.gz"))
    data = load_dataset(str(tmp_path / "mnist.pkl.gz"), validation_size=5, allow_pickle=True)
    assert data.x_train.shape == (35, 784) and data.x_test.shape == (5, 784)


def test_bundled_sets_have_the_documented_shapes():
    digits = load_dataset("digits", validation_size=100)
    assert digits.x_test.shape == (359, 64) and digits.x_train.shape == (1338, 64)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    mnist = load_dataset("mnist-5k")
    assert mnist.x_train.shape == (4000, 784) and mnist.x_test.shape == (1000, 784)
    assert mnist.x_train.max() == 1.0 and set(np.unique(mnist.y_test)) == set(range(10))
    again = load_dataset("mnist-5k")
    assert again.digest == mnist.digest and np.array_equal(again.y_test, mnist.y_test)


def test_synthetic_is_seeded_and_sized():
    data = load_dataset("synthetic:500:20:3", validation_size=50)
    assert data.x_train.shape == (400, 20) and data.x_test.shape == (50, 20) and data.n_classes == 3
    assert load_dataset("synthetic:500:20:3", validation_size=50).digest == data.digest
    with pytest.raises(DataError, match="synthetic:EXAMPLES:INPUTS:CLASSES"):
        load_dataset("synthetic:12")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_truncated_idx(tmp_path):
    mnist_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated"):
        load_dataset(str(tmp_path))


def test_wrong_idx_magic(tmp_path):
    mnist_folder(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x09\x01" + path.read_bytes()[4:])
    with pytest.raises(DataError, match=r"not an MNIST IDX file") as raised:
        read_idx(path)
    assert "0x00000901" not in str(raised.value)  # the file's own bytes are never quoted


def test_corrupt_gzip(tmp_path):
    mnist_folder(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="cannot be read.*damaged"):
        load_dataset(str(tmp_path))


def test_counts_disagree(tmp_path):
    mnist_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(49))
    with pytest.raises(DataError, match="50 images but train-labels-idx1-ubyte has 49 labels"):
        load_dataset(str(tmp_path))


def test_labels_out_of_range(tmp_path):
    mnist_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 12))
    with pytest.raises(DataError, match=r"label 12 is out of range; labels must lie in \[0, 10\)"):
        load_dataset(str(tmp_path))
    save_npz(tmp_path / "neg.npz", np.zeros((5, 3)), np.array([0, 1, -1, 0, 1]))
    with pytest.raises(DataError, match="label -1 is out of range"):
        load_dataset(str(tmp_path / "neg.npz"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_the_data(tmp_path, bad):
    x, y = synthetic(50, 4, 2)
    x[7, 2] = bad
    save_npz(tmp_path / "d.npz", x, y)
    with pytest.raises(DataError, match="NaN or Inf"):
        load_dataset(str(tmp_path / "d.npz"))


def test_empty_dataset(tmp_path):
    save_npz(tmp_path / "empty.npz", np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    with pytest.raises(DataError, match="the dataset is empty"):
        load_dataset(str(tmp_path / "empty.npz"))


def test_unreadable_file(tmp_path):
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        pytest.skip("root reads any file; permissions cannot make one unreadable")
    x, y = synthetic(10, 4, 2)
    save_npz(tmp_path / "d.npz", x, y)
    (tmp_path / "d.npz").chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        load_dataset(str(tmp_path / "d.npz"))


def test_npz_that_is_not_a_dataset(tmp_path):
    np.savez(tmp_path / "w.npz", weights_0=np.zeros((2, 2)))
    with pytest.raises(DataError, match="needs arrays 'x'.*and 'y'"):
        load_dataset(str(tmp_path / "w.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(str(tmp_path / "junk.npz"))


def test_unreadable_file_as_any_user(tmp_path, monkeypatch):
    """Permissions do not stop root, so the operating system's refusal is simulated at open()."""
    x, y = synthetic(10, 4, 2)
    save_npz(tmp_path / "d.npz", x, y)
    (tmp_path / "idx").mkdir()
    mnist_folder(tmp_path / "idx")
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    monkeypatch.setattr("pathlib.Path.read_bytes", lambda self: refusing_open(self))
    with pytest.raises(DataError, match=r"d.npz: cannot be read \(permission denied\)"):
        load_dataset(str(tmp_path / "d.npz"))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: cannot be read \(permission denied\)"):
        load_dataset(str(tmp_path / "idx"))
