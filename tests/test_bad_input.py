"""Bad input, table-driven: each command exits 2 with one line that names the problem, no traceback,
and leaves no run RUNNING in the store."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, error_line
from core import Network
from jobs.cli import main
from jobs.data import save_npz

DIGITS = str(CONFIGS / "digits.yaml")
SECRET = "s3cret"  # in files and URIs below: no error line may quote it
LONG = "x" * 600

BOMB = """sizes: [&a [1, 1, 1, 1, 1, 1, 1, 1, 1], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a],
  &c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c], *d]
"""


def idx(path: Path, shape: tuple[int, ...], data: bytes = b"") -> None:
    path.write_bytes(struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + data)


def weights_file(path: Path, **changes) -> None:
    """A weights file as Network.save writes it, with some arrays replaced."""
    Network.create([64, 30, 10]).save(path)
    arrays = dict(np.load(path))
    arrays.update(changes)
    np.savez(path, **arrays)


def forged_header(path: Path) -> None:
    """A weights file whose weights_0.npy header claims (100000, 100000) doubles: 80 GB."""
    Network.create([64, 30, 10]).save(path)
    arrays = dict(np.load(path))
    with zipfile.ZipFile(path, "w") as z:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            raw = buffer.getvalue()
            if name == "weights_0":
                raw = raw.replace(b"(30, 64)", b"(100000, 100000)")
            z.writestr(f"{name}.npy", raw)


def zip_entries(path: Path, flags: int = 0, method: int | None = None) -> None:
    """Rewrite every entry's header of a zip: general-purpose ``flags`` added (bit 0: encrypted), and its
    compression ``method`` replaced (99: one no reader knows)."""
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local headers, central directory
        at = raw.find(signature)
        while at != -1:
            flag_at = at + offset
            raw[flag_at : flag_at + 2] = struct.pack("<H", struct.unpack("<H", raw[flag_at : flag_at + 2])[0] | flags)
            if method is not None:
                raw[flag_at + 2 : flag_at + 4] = struct.pack("<H", method)
            at = raw.find(signature, at + 4)
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "dup.yaml").write_text("eta: 1.0\nepochs: 2\neta: 3.0\n")
    (d / "syntax.yaml").write_text("eta: [1.0\n")
    (d / "list.yaml").write_text("- eta\n- epochs\n")
    (d / "bomb.yaml").write_text(BOMB)
    (d / "tagged.yaml").write_text("sizes: !!python/tuple [64, 30, 10]\n")
    (d / "int-key.yaml").write_text("1: 2\n")
    rng = np.random.default_rng(0)
    x, y = rng.random((100, 64)), rng.integers(0, 10, 100)
    save_npz(d / "complex.npz", x + 1j, y)
    save_npz(d / "huge-labels.npz", x, np.full(100, 2**63 + 5, dtype=np.uint64))
    save_npz(d / "classes.npz", x, y, n_classes=np.array(-3))
    save_npz(d / "test-width.npz", x, y, x_test=rng.random((20, 32)), y_test=rng.integers(0, 10, 20))
    (d / "zero-pixels").mkdir()
    idx(d / "zero-pixels" / "train-images-idx3-ubyte", (100, 0, 0))
    idx(d / "zero-pixels" / "train-labels-idx1-ubyte", (100,), bytes(100))
    (d / "overflow").mkdir()
    idx(d / "overflow" / "train-images-idx3-ubyte", (2**32 - 1, 2**32 - 1, 2**32 - 1), bytes(64))
    idx(d / "overflow" / "train-labels-idx1-ubyte", (100,), bytes(100))
    (d / "not-a-zip.npz").write_bytes(b"hello")
    weights_file(d / "sizes-2d.npz", sizes=np.array([[64, 30, 10]]))
    weights_file(d / "sizes-0d.npz", sizes=np.array(64))
    weights_file(d / "strings.npz", weights_0=np.full((30, 64), "a"))
    weights_file(d / "nan.npz", weights_0=np.full((30, 64), np.nan))
    forged_header(d / "forged.npz")
    Network.create([64, 30, 10]).save(d / "good.npz")
    Network.create([64, 30, 10]).save(d / "encrypted.npz")
    zip_entries(d / "encrypted.npz", flags=1)
    Network.create([64, 30, 10]).save(d / "compressed.npz")
    zip_entries(d / "compressed.npz", method=99)
    save_npz(d / "y-test-only.npz", x, y, y_test=rng.integers(0, 10, 20))
    save_npz(d / "plain.npz", x, y)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": x[:, 0], "b": y}), d / "no-label.parquet")
    (d / "broken.parquet").write_bytes(b"PAR1 not really")
    (d / "shadow").write_text(f"root:$6${SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    (d / "private").write_bytes(SECRET.encode() * 100)
    (d / "linked").mkdir()  # IDX files that are links to a private file
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (d / "linked" / name).symlink_to(d / "private")
    os.mkfifo(d / "fifo.yaml")
    os.mkfifo(d / "fifo.npz")
    sharded_folders(d)
    return d


def sharded_folders(d: Path) -> None:
    """Sharded copies of digits, each damaged one way."""
    import json
    import shutil

    from cluster.blocks import block_digest
    from jobs.data import shard

    shard("digits", d / "shard-ok", rows_per_block=300)
    for name in ("shard-digest", "shard-width", "shard-dtype", "shard-escape", "shard-nothing", "shard-classes"):
        shutil.copytree(d / "shard-ok", d / name)
    (d / "shard-digest" / "block-00001.x.npy").write_bytes((d / "shard-ok" / "block-00001.x.npy").read_bytes()[:-8]
                                                           + b"\x01" * 8)

    def replace_block(folder: Path, rows: np.ndarray) -> None:
        np.save(folder / "block-00001.x.npy", rows)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["blocks"][1]["sha256"] = block_digest(str(folder / "block-00001.x.npy"),
                                                       str(folder / "block-00001.y.npy"))
        (folder / "manifest.json").write_text(json.dumps(manifest))

    replace_block(d / "shard-width", np.zeros((300, 32)))
    replace_block(d / "shard-dtype", np.zeros((300, 64), np.float32))
    manifest = json.loads((d / "shard-escape" / "manifest.json").read_text())
    manifest["blocks"][0]["x"] = "../shard-ok/block-00000.x.npy"
    (d / "shard-escape" / "manifest.json").write_text(json.dumps(manifest))
    (d / "shard-nothing" / "manifest.json").unlink()
    manifest = json.loads((d / "shard-classes" / "manifest.json").read_text())
    manifest["n_classes"], manifest["max_label"] = 5, 4  # its blocks hold labels up to 9
    (d / "shard-classes" / "manifest.json").write_text(json.dumps(manifest))


# (arguments, with {d} for the folder of files above; what the error line must say, {d} likewise)
ROWS = [
    (["run", DIGITS, "eta=0"], "eta=0.0: the learning rate η must be a finite number > 0"),
    (["run", DIGITS, "eta=-1"], "eta=-1.0: the learning rate"),
    (["run", DIGITS, "eta=.nan"], "eta=.nan: the learning rate"),
    (["run", DIGITS, "lmbda=-1"], "lmbda=-1.0: the L2 decay"),
    (["run", DIGITS, "batch_size=0"], "batch_size=0: the mini-batch size must be >= 1"),
    (["run", DIGITS, "epochs=0"], "epochs=0: must be >= 1"),
    (["run", DIGITS, "epochs=2.5"], "epochs=2.5: must be a whole number"),
    (["run", DIGITS, "seed=-1"], "seed=-1: must be >= 0"),
    (["run", DIGITS, "sizes=[64]"], "sizes=[64]: needs at least two layer sizes"),
    (["run", DIGITS, "sizes=[64,0,10]"], "sizes=[64, 0, 10]: needs at least two layer sizes, each >= 1"),
    (["run", DIGITS, "sizes=[64,100000000000,10]"], "of memory for its weights and buffers, but this machine has"),
    (["run", DIGITS, f"sizes=[{','.join(['784'] * 33)}]"], "the input layer has 784 neurons but digits has 64"),
    (["run", DIGITS, "sizes=[784,30,10]"], "the input layer has 784 neurons but digits has 64 inputs"),
    (["run", DIGITS, "sizes=[64,30,5]"], "the output layer has 5 neurons but digits has labels up to 9"),
    (["run", DIGITS, "cost=hinge"], "cost=hinge: one of quadratic, cross_entropy"),
    (["run", DIGITS, "activation=relu"], "activation=relu: one of sigmoid"),
    (["run", DIGITS, "dtype=float16"], "dtype=float16: one of float64, float32"),
    (["run", DIGITS, "init=zeros"], "init=zeros: one of standard, scaled"),
    (["run", DIGITS, "backend=spark"], "backend=spark: one of local, ray"),
    (["run", DIGITS, "transport=nccl"], "transport=nccl: how Ray steps travel"),
    (["run", DIGITS, "workers=0"], "workers=0: must be >= 1"),
    (["run", DIGITS, "backend=ray", "workers=1000", "track=false"], "this machine has"),
    (["run", DIGITS, "chunk_size=0"], "chunk_size=0: must be >= 1"),
    (["run", DIGITS, "validation_size=-1"], "validation_size=-1: must be >= 0"),
    (["run", DIGITS, "validation_size=100000"], "validation_size=100000: must be at least 0 and less than"),
    (["run", DIGITS, "test_size=0"], "test_size=0: must be >= 1, or null"),
    (["run", DIGITS, "eta"], "override 'eta': write key=value"),
    (["run", DIGITS, "learning_rate=0.1"], "unknown key 'learning_rate'"),
    (["run", DIGITS, "eta=fast"], "eta=fast: must be a number"),
    (["run", DIGITS, "batch_size=2.5"], "batch_size=2.5: must be a whole number"),
    (["run", DIGITS, "etta=1"], "unknown key 'etta': did you mean 'eta'?"),
    (["run", DIGITS, f"experiment={LONG}"], "must be a name of 1 to 500 characters"),
    (["run", DIGITS, f"run_name={LONG}"], "must be a name of 1 to 250 characters"),
    (["run", DIGITS, "data=no-such-dataset"], "data='no-such-dataset': no such file or folder"),
    (["run", DIGITS, "data=synthetic:0:64:10"], "examples and inputs must be positive"),
    (["run", DIGITS, "data=synthetic:abc"], "write synthetic:EXAMPLES:INPUTS:CLASSES"),
    (["run", "no-such.yaml"], "config 'no-such.yaml': no such file"),
    (["run", "{d}/dup.yaml"], "key 'eta' is written twice (line 3); keep one"),
    (["run", "{d}/syntax.yaml"], "at line 2; write plain key: value lines"),
    (["run", "{d}/list.yaml"], "must be a mapping of key: value lines"),
    (["run", "{d}/bomb.yaml"], "an alias (*a) at line 1: write each value out"),
    (["run", "{d}/tagged.yaml"], "could not determine a constructor for the tag"),
    (["run", DIGITS, "data={d}/complex.npz"], "x is complex (complex128); inputs must be real numbers"),
    (["run", DIGITS, "data={d}/huge-labels.npz"], "label 9223372036854775813 is out of range"),
    (["run", DIGITS, "data={d}/classes.npz"], "n_classes must be one whole number >= 2"),
    (["run", DIGITS, "data={d}/test-width.npz"], "the test examples have 32 inputs but the training examples 64"),
    (["run", DIGITS, "data={d}/zero-pixels"], "its examples have no inputs (shape (100, 0))"),
    (["run", DIGITS, "data={d}/overflow"], "bytes its header promises for shape (4294967295, 4294967295"),
    (["run", DIGITS, "data={d}/not-a-zip.npz"], "not a readable .npz"),
    (["run", DIGITS, "--resume", "deadbeefdeadbeef"], "--resume deadbeefdeadbeef: no such run"),
    (["run", DIGITS, "--tracking-uri", "bogus://x"], "MLflow has no tracking store for the scheme 'bogus'"),
    (["run", DIGITS, "--tracking-uri", "http://127.0.0.1:9"], "http://127.0.0.1:9 cannot be reached"),
    (["gradcheck", DIGITS, "--tolerance", "nan"], "--tolerance nan: must be a number > 0"),
    (["gradcheck", DIGITS, "--examples", "0"], "--examples 0: must be at least 1"),
    (["evaluate", "{d}/no-such.npz"], "no such file; pass a weights.npz, runs:/RUN_ID, models:/m-ID or models:/NAME"),
    (["evaluate", "{d}/sizes-2d.npz"], "sizes must be a list of at least two positive whole numbers"),
    (["evaluate", "{d}/sizes-0d.npz"], "sizes must be a list of at least two positive whole numbers"),
    (["evaluate", "{d}/strings.npz"], "weights_0 holds <U1, not floating-point numbers"),
    (["evaluate", "{d}/nan.npz"], "the weights contain NaN or Inf"),
    (["evaluate", "{d}/forged.npz"], "weights_0 has shape (100000, 100000) but sizes need (30, 64)"),
    (["evaluate", "{d}/good.npz", "--data", "mnist-5k"], "has 784 inputs per example but the model takes 64"),
    (["evaluate", "{d}/good.npz", "--split", "validation"], "digits has no validation examples"),
    (["evaluate", "runs:/deadbeefdeadbeef"], "runs:/deadbeefdeadbeef: no such run with weights.npz"),
    (["evaluate", "models:/m-deadbeef"], "models:/m-deadbeef: no such gradavg model"),
    (["runs", "repair", "deadbeefdeadbeef"], "gradavg runs repair deadbeefdeadbeef: no such run"),
    (["submit", DIGITS], "a job on a cluster needs a tracking server it can reach"),
    (["run", DIGITS, "data=synthetic:5:4:2", "sizes=[4,3,2]"], "its default test hold-out (0) leaves no test"),
    (["run", DIGITS, "test_size=100000"], "test_size=100000 leaves no test or no training examples of its 1797"),
    (["run", "{d}/int-key.yaml"], "key 1: a key is a name, e.g. eta: 3.0"),
    (["run", DIGITS, "eta=1", "eta=2"], "eta is given twice on the command line (eta=1, eta=2); keep one"),
    (["run", DIGITS, "--force"], "--force goes with --resume RUN_ID"),
    (["cluster", "up", "--dashboard-port", "99999"], "--dashboard-port 99999: a port is a number from 1 to 65535"),
    (["cluster", "up", "--num-cpus", "0"], "--num-cpus 0: the head offers at least 1 CPU"),
    (["run", DIGITS, "validation_size=0", "early_stopping=3"],
     "early_stopping=3 watches validation accuracy, but validation_size=0"),
    (["run", str(CONFIGS / "sweep-eta.yaml")], "has a sweep: section, which runs several jobs"),
    (["sweep"], "gradavg sweep needs a config and the keys to sweep"),
    (["sweep", DIGITS, "validation_size=300"], "a sweep needs a key with several values"),
    (["sweep", DIGITS, "validation_size=300", "etaa=1,2"], "unknown key 'etaa': did you mean 'eta'?"),
    (["sweep", DIGITS, "validation_size=300", "eta=,"], "sweep eta=,: value 1 of 2 is empty"),
    (["sweep", DIGITS, "validation_size=300", "eta=1,,2"], "sweep eta=1,,2: value 2 of 3 is empty"),
    (["sweep", DIGITS, "validation_size=300", "eta=log(1)", "--samples", "2"], "a range has two ends"),
    (["sweep", DIGITS, "validation_size=300", "eta=[1,2,3]", "--samples", "2"], "to list values write eta=A,B,C"),
    (["sweep", DIGITS, "validation_size=300", "experiment=[a,b]", "--samples", "2"], "experiment cannot be swept"),
    (["sweep", DIGITS, "eta=1,2", "--grace", "2"], "--grace and --reduction set the asha scheduler"),
    (["sweep", DIGITS, "eta=1,2", "--register", "bad name/x"], "a model name is some text without / or :"),
    (["sweep", DIGITS, "validation_size=300", "cost=log(1,2)"], "cost takes no range"),
    (["sweep", DIGITS, "validation_size=300", "batch_size=[10,100]"], "is a range: say how many values to draw"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,0.5", "--samples", "3"], "drop --samples"),
    (["sweep", DIGITS, "validation_size=300", "eta=log(0.01,10)", "--samples", "501"],
     "this sweep is 501 trials; a sweep runs at most 500"),
    (["sweep", DIGITS, "validation_size=300", "eta=log(0,10)", "--samples", "2"], "a log range needs ends above 0"),
    (["sweep", DIGITS, "validation_size=300", "eta=[5,1]", "--samples", "2"], "a range needs finite ends, the lower"),
    (["sweep", DIGITS, "validation_size=0", "eta=0.1,0.5"], "a sweep compares its trials on validation accuracy"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,-1"], "eta=-1.0: the learning rate"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,0.1"], "0.1 is listed twice"),
    (["sweep", DIGITS, "validation_size=300", "workers=1,2"], "workers cannot be swept"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,0.5", "eta=1"], "eta is both swept (eta=0.1,0.5) and set"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,0.5", "backend=ray"], "each run on the local backend"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,0.5", "track=false"], "compared through MLflow"),
    (["sweep", DIGITS, "validation_size=300", "sizes=[64,30,10],[32,30,10]"], "the input layer has 32 neurons"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,0.5", "--at-once", "0"], "--at-once 0: run at least 1"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,0.5", "--follow"], "--follow goes with --address"),
    (["sweep", DIGITS, "eta=0.1,0.5", "--register", " "], "--register ' ': a model name is some text"),
    (["sweep", DIGITS, "validation_size=300", "eta=0.1,0.5", "--address", "http://127.0.0.1:9"],
     "cannot reach the Ray cluster at http://127.0.0.1:9"),
    (["sweep", "--resume", "deadbeefdeadbeef"], "--resume deadbeefdeadbeef: no such run"),
    (["sweep", DIGITS, "--resume", "deadbeefdeadbeef"], "continues a sweep as it was planned: drop the config"),
    # what a third adversarial trial found
    (["evaluate", "{d}/encrypted.npz"], "not a readable weights file (RuntimeError"),
    (["evaluate", "{d}/compressed.npz"], "not a readable weights file (NotImplementedError"),
    (["run", "{d}/shadow"], "is not a gradavg config (it has keys that are no names"),
    (["run", DIGITS, "data={d}/linked"], "not an MNIST IDX file"),
    (["run", "{d}/fifo.yaml"], "fifo.yaml': is not a regular file"),
    (["run", DIGITS, "data={d}/fifo.npz"], "fifo.npz': is not a regular file"),
    (["sweep", "{d}/fifo.yaml", "eta=1,2"], "fifo.yaml': is not a regular file"),
    (["run", DIGITS, "data={d}/y-test-only.npz"], "has y_test but no x_test"),
    (["run", DIGITS, "--tracking-uri", f"http://user:{SECRET}@127.0.0.1:9/"], "http://user:***@127.0.0.1:9/ cannot"),
    (["run", DIGITS, "--tracking-uri", "http://[::1"], "--tracking-uri http://[::1: not a valid URI"),
    (["run", DIGITS, "--tracking-uri", "http://127.0.0.1:abc"], "--tracking-uri http://127.0.0.1:abc: not a valid"),
    (["run", DIGITS, "--tracking-uri", "sqlite://"], "an in-memory store is gone when the process ends"),
    (["run", DIGITS, "--tracking-uri", "sqlite:///{d}/ro.db?mode=ro"], "is opened read-only (mode=ro)"),
    (["run", DIGITS, "--tracking-uri", " "], "--tracking-uri is blank"),
    (["run", DIGITS, "--tracking-uri", "{d}/mlflow.db"], "--tracking-uri {d}/mlflow.db: a file is named by a URI; "
                                                         "write sqlite:///{d}/mlflow.db"),
    (["run", DIGITS, "--tracking-uri", "./mlruns"], "--tracking-uri ./mlruns: a folder of runs is MLflow's file "
                                                    "store, which MLflow 3 opens only with MLFLOW_ALLOW_FILE_STORE="),
    (["run", DIGITS, "--tracking-uri", "127.0.0.1:5000"], "a tracking server is named with its scheme; write "
                                                          "http://127.0.0.1:5000"),
    (["evaluate", "runs:/abc", "--tracking-uri", "file:///tmp/mlruns"], "a folder of runs is MLflow's file store"),
    (["evaluate", "runs:/abc", "--tracking-uri", "http://[::1"], "not a valid URI"),
    (["runs", "repair", "--tracking-uri", "http://127.0.0.1:abc"], "not a valid URI"),
    (["sweep", DIGITS, "validation_size=300", "eta=1,2", "--tracking-uri", "http://[::1"], "not a valid URI"),
    (["sweep", "--resume", "abc", "--tracking-uri", "sqlite://"], "an in-memory store"),
    (["submit", DIGITS, "--tracking-uri", "http://[::1", "--address", "http://127.0.0.1:9"], "not a valid URI"),
    (["submit", DIGITS, "--tracking-uri", "http://127.0.0.1:9", "--address", "http://127.0.0.1:abc"],
     "--address http://127.0.0.1:abc: not a valid address"),
    (["jobs", "list", "--address", "http://[::1"], "--address http://[::1: not a valid address"),
    (["sweep", DIGITS, "eta=1,2", "--allow-pickle"], "--allow-pickle goes with --resume"),
    # sharded datasets (gradavg data shard)
    (["run", DIGITS, "data={d}/shard-nothing", "validation_size=0"], "holds blocks but no manifest.json"),
    (["run", DIGITS, "data={d}/shard-digest", "validation_size=0"],
     "block-00001.x.npy does not match the manifest's sha256"),
    (["run", DIGITS, "data={d}/shard-width", "validation_size=0"],
     "holds float64 rows of shape (300, 32), but the manifest says float64 (300, 64)"),
    (["run", DIGITS, "data={d}/shard-dtype", "validation_size=0"],
     "holds float32 rows of shape (300, 64), but the manifest says float64 (300, 64)"),
    (["run", DIGITS, "data={d}/shard-escape", "validation_size=0"], "block 0 needs x and y (file names in the folder)"),
    (["run", DIGITS, "data={d}/shard-ok"], "its blocks hold 0 validation examples, fixed when it was sharded, but "
                                          "validation_size=200; set validation_size=0"),
    (["run", DIGITS, "shuffle=blocks"], "shuffle=blocks orders an epoch by the blocks of a sharded dataset, and "
                                        "data=digits is none; shard it first"),
    (["run", DIGITS, "shuffle=blocks", "data={d}/plain.npz"], "is none; shard it first"),
    (["run", DIGITS, "mix_blocks=0"], "mix_blocks"),
    (["data", "shard", "digits", "{d}/shard-ok"], "already exists; shard into a new folder"),
    (["data", "shard", "digits"], "data shard needs SOURCE and OUT"),
    (["data", "shard", "digits", "{d}/new", "--rows-per-block", "0"], "--rows-per-block 0: must be at least 1"),
    (["data", "shard", "{d}/no-such", "{d}/new"], "no such file or folder"),
    (["data", "check", "{d}/shard-digest"], "does not match the manifest's sha256"),
    (["data", "check", "{d}"], "no manifest.json here, so it is no sharded dataset"),
    (["run", DIGITS, "data={d}/shard-classes", "validation_size=0", "sizes=[64,30,5]"],
     "holds label 9, outside the manifest's 0 to 4"),
    (["data", "check", "{d}/shard-classes"], "holds label 9, outside the manifest's 0 to 4"),
    (["submit", DIGITS, "shuffle=blocks", "--tracking-uri", "http://127.0.0.1:9", "--address", "http://127.0.0.1:9"],
     "data=digits is none; shard it first"),
    (["submit", DIGITS, "data={d}/shard-ok", "--tracking-uri", "http://127.0.0.1:9", "--address",
      "http://127.0.0.1:9"], "its blocks hold 0 validation examples"),
    (["run", DIGITS, "data={d}/no-such-folder", "shuffle=blocks"], "no such file or folder"),
    (["run", DIGITS, "data={d}/no-label.parquet"], "has no label column (y or label); its columns are a, b"),
    (["run", DIGITS, "data={d}/broken.parquet"], "not readable Parquet"),
]


def needs_a_store(args: list[str]) -> bool:
    """Rows about something in a store (a run, a model, a sweep to resume): the rest are refused before any
    store is opened."""
    return "--resume" in args or args[:2] == ["runs", "repair"] or any(a.startswith(("runs:/", "models:/"))
                                                                      for a in args)


def run_row(args, files, capsys, monkeypatch) -> str:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False) if args[0] == "submit" else None
    assert main([a.replace("{d}", str(files)) for a in args]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err
    return error_line(err)


BEFORE_A_STORE = [row for row in ROWS if not needs_a_store(row[0])]


@pytest.mark.parametrize("args, message", BEFORE_A_STORE, ids=[" ".join(a)[:60] for a, _ in BEFORE_A_STORE])
def test_bad_input_is_one_line_and_exit_2_before_any_store_opens(files, tmp_path, capsys, monkeypatch, args,
                                                                 message):
    """Refused before a store is opened, so no run can be left RUNNING: the store named is never made."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert message.replace("{d}", str(files)) in run_row(args, files, capsys, monkeypatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no mlruns/, nothing written here


IN_A_STORE = [row for row in ROWS if needs_a_store(row[0])]


@pytest.mark.parametrize("args, message", IN_A_STORE, ids=[" ".join(a)[:60] for a, _ in IN_A_STORE])
def test_bad_input_about_a_stored_run_is_one_line_and_leaves_no_run_running(files, tracking_uri, capsys,
                                                                            monkeypatch, args, message):
    assert message.replace("{d}", str(files)) in run_row(args, files, capsys, monkeypatch)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
