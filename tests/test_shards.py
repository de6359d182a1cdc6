"""Sharded datasets without Ray: the blocks order and cut, the folder format, the bits of training on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.blocks import load_blocks
from conftest import CONFIGS
from core.kernels import add_and_update_rows
from core.plan import block_of, blocks_order, cut, epoch_cuts
from core.step import descend, mini_batch
from jobs import shards
from jobs.backends import LocalBackend
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.data import shard as data_shard
from jobs.train import train

OFFSETS = np.array([0, 7, 14, 21, 25, 33])  # five blocks of 7, 7, 7, 4 and 8 rows


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "digits"
    data_shard("digits", out, rows_per_block=100, validation_size=200)
    return out


@pytest.mark.parametrize("mix", [1, 2, 3, 9])
def test_a_blocks_order_is_a_permutation_each_batch_grouped_by_block(mix):
    order = blocks_order(np.random.default_rng(3), OFFSETS, mix, batch_size=5)
    assert sorted(order.tolist()) == list(range(33))
    for step in range(-(-33 // 5)):
        blocks = block_of(mini_batch(order, 5, step), OFFSETS)
        assert list(blocks) == sorted(blocks, key=list(dict.fromkeys(blocks)).index)  # each block's rows together
    again = blocks_order(np.random.default_rng(3), OFFSETS, mix, batch_size=5)
    assert np.array_equal(order, again)


def test_mixing_draws_each_mini_batch_from_several_blocks():
    offsets = np.arange(0, 1001, 100)  # ten blocks of 100
    for mix, expected in ((1, 1), (4, 4)):
        order = blocks_order(np.random.default_rng(0), offsets, mix, batch_size=8)
        blocks_per_batch = [np.unique(block_of(mini_batch(order, 8, s), offsets)).size for s in range(125)]
        assert np.median(blocks_per_batch) == expected


def test_a_cut_never_crosses_a_block_and_keeps_chunk_size():
    positions = np.array([0, 1, 2, 3, 4, 5, 8, 9, 20, 21, 22, 6])  # blocks 0 ×6, 1 ×2, 2, 3 ×2, 0 (OFFSETS)
    bounds, blocks = cut(positions, 3, OFFSETS)
    assert bounds == [(0, 3), (3, 6), (6, 8), (8, 9), (9, 11), (11, 12)]
    assert blocks.tolist() == [0, 0, 1, 2, 3, 0]
    assert cut(positions, 5)[0] == [(0, 5), (5, 10), (10, 12)]  # without blocks: chunk_bounds


@pytest.mark.parametrize("batch_size, chunk_size", [(5, 2), (10, 3), (33, 100), (1, 1)])
def test_an_epochs_cuts_are_each_mini_batchs_cut(batch_size, chunk_size):
    order = blocks_order(np.random.default_rng(1), OFFSETS, 2, batch_size)
    cuts, firsts = epoch_cuts(order, batch_size, chunk_size, OFFSETS)
    for step in range(-(-33 // batch_size)):
        lo = step * batch_size
        expected, _ = cut(mini_batch(order, batch_size, step), chunk_size, OFFSETS)
        got = [(cuts[c] - lo, cuts[c + 1] - lo) for c in range(firsts[step], firsts[step + 1])]
        assert got == expected


def test_the_folder_holds_the_source_split_rows_in_a_recorded_order(digits_folder):
    source = load_dataset("digits", 200)
    manifest = shards.read_manifest(digits_folder)
    assert (manifest.rows("train"), manifest.rows("validation"), manifest.rows("test")) == (1238, 200, 359)
    assert [manifest.blocks[b]["rows"] for b in manifest.splits["train"]] == [100] * 12 + [38]
    x, y, starts = load_blocks(manifest.specs("train"), "float64")
    rows = np.load(digits_folder / "train-rows.npy")
    assert np.array_equal(x, source.x_train[rows]) and np.array_equal(y, source.y_train[rows])
    assert starts[manifest.splits["train"][1]] == 100
    for split in ("validation", "test"):
        xs, ys, _ = load_blocks(manifest.specs(split), "float64")
        assert np.array_equal(xs, getattr(source, f"x_{split}")) and np.array_equal(ys, getattr(source, f"y_{split}"))
    doc = json.loads((digits_folder / "manifest.json").read_text())
    assert (doc["width"], doc["dtype"], doc["n_classes"], doc["image_shape"]) == (64, "float64", 10, [8, 8])
    assert {b["x"] for b in doc["blocks"]} == {p.name for p in digits_folder.glob("block-*.x.npy")}


def digits_cfg(*overrides):
    values = dict(text.split("=", 1) for text in ["epochs=2", "chunk_size=7", "log_every=10", *overrides])
    return load_config(CONFIGS / "digits.yaml", [f"{k}={v}" for k, v in values.items()])  # later ones win


def test_shuffle_global_on_the_folder_is_the_bits_of_its_source(digits_folder):
    """Sharding changes nothing that global shuffle computes: weights, diagnostics, costs, accuracies."""
    cfg = digits_cfg("diagnostics_every=30")
    original = train(cfg, load_dataset("digits", 200), LocalBackend(7, threads=2))
    sharded_cfg = digits_cfg("diagnostics_every=30", f"data={digits_folder}")
    sharded = train(sharded_cfg, load_dataset(str(digits_folder), 200), LocalBackend(7, threads=2))
    assert np.array_equal(original.network.params, sharded.network.params)
    for a, b in zip(original.history, sharded.history):
        assert a.diagnostics == b.diagnostics
        assert (a.train_accuracy, a.test_accuracy, a.validation_accuracy) == \
            (b.train_accuracy, b.test_accuracy, b.validation_accuracy)
        assert a.train_cost == pytest.approx(b.train_cost, rel=1e-12)  # added block by block: the last bits


def test_mnist_5k_sharded_in_float32_trains_a_float32_network_to_the_source_bits(tmp_path):
    out = tmp_path / "m5"
    data_shard("mnist-5k", out, rows_per_block=700, dtype="float32")
    cfg = load_config(CONFIGS / "nielsen-ch1.yaml", ["epochs=1", "dtype=float32"])
    original = train(cfg, load_dataset("mnist-5k"), LocalBackend(cfg.chunk_size))
    sharded = train(cfg, load_dataset(str(out)), LocalBackend(cfg.chunk_size))
    assert np.array_equal(original.network.params, sharded.network.params)


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_blocks_steps_are_the_bits_of_the_chunk_by_chunk_steps(digits_folder, threads):
    """The local backend runs shuffle=blocks compiled (core.kernels.run_planned_steps); Ray's driver adds
    chunk sums step by step (descend ending in add_and_update_rows): the same chunks, the same bits."""

    class StepByStep(LocalBackend):
        def train_steps(self, network, order, first, last, batch_size, eta, lmbda):
            descend(self.chunk_sums, network, order, first, last, batch_size, eta, lmbda, add_and_update_rows)

    cfg = digits_cfg(f"data={digits_folder}", "shuffle=blocks", "mix_blocks=3", "chunk_size=2", "lmbda=1.0")
    data = load_dataset(str(digits_folder), 200)
    compiled = train(cfg, data, LocalBackend(2, threads=threads))
    reference = train(cfg, data, StepByStep(2, threads=1))
    assert np.array_equal(compiled.network.params, reference.network.params)
    assert compiled.history[-1].train_cost == reference.history[-1].train_cost
    assert compiled.history[-1].test_accuracy > 0.5


def test_each_block_of_the_blocks_order_is_visited_once_an_epoch(digits_folder):
    """Every training example once per epoch under shuffle=blocks, as under global."""
    seen = []

    class Recording(LocalBackend):
        def train_steps(self, network, order, first, last, batch_size, eta, lmbda):
            seen.append(order[first * batch_size : last * batch_size].copy())
            super().train_steps(network, order, first, last, batch_size, eta, lmbda)

    cfg = digits_cfg(f"data={digits_folder}", "shuffle=blocks", "epochs=1", "log_every=1000")
    train(cfg, load_dataset(str(digits_folder), 200), Recording(7))
    assert sorted(np.concatenate(seen).tolist()) == list(range(1238))


def test_a_folder_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = np.save

    def failing(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing)
    with pytest.raises(OSError):
        data_shard("digits", tmp_path / "out", rows_per_block=100)
    assert list(tmp_path.iterdir()) == []  # no folder named out, no staging folder left


def test_parquet_written_elsewhere_reads_as_the_same_arrays_and_shards(tmp_path):
    """A folder of Parquet files with a list column x (as pyarrow and Ray Data write it) and one file of plain
    numeric columns (as pandas writes a frame): the same examples, in file order, as the arrays they came from."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    (tmp_path / "parts").mkdir()
    for name, rows in (("part-0.parquet", slice(0, 900)), ("part-1.parquet", slice(900, None))):
        pq.write_table(pa.table({"x": pa.array(list(x[rows]), type=pa.list_(pa.float64())), "y": y[rows]}),
                       tmp_path / "parts" / name)
    columns = {f"pixel{i}": x[:, i] for i in range(64)} | {"label": y}
    pq.write_table(pa.table(columns), tmp_path / "frame.parquet")
    source = load_dataset("digits", 200)
    for path in (tmp_path / "parts", tmp_path / "frame.parquet"):
        data = load_dataset(str(path), 200, test_size=359)
        for key in ("x_train", "y_train", "x_validation", "y_validation", "x_test", "y_test"):
            assert np.array_equal(getattr(data, key), getattr(source, key)), (path, key)
    manifest = data_shard(str(tmp_path / "parts"), tmp_path / "sharded", 500, 200, 359)
    assert (manifest.rows("train"), manifest.rows("test")) == (1238, 359)


def test_placement_is_even_deterministic_and_goes_where_a_node_can_read_the_files(digits_folder):
    from cluster.blocks import BlockError, place
    from jobs.shards import backend_blocks

    data = load_dataset(str(digits_folder), 200, rows=False)
    blocks = backend_blocks(data, "blocks", np.float64)
    train_ids = [s.block for s in blocks.specs["train"]]  # 13 blocks: 12 of 100 rows, one of 38
    held = place(blocks, [set(), set(), set()], ["a", "a", "b"])
    got = [[s.block for s in h["train"]] for h in held]
    assert sorted(sum(got, [])) == train_ids and max(map(len, got)) - min(map(len, got)) <= 1
    assert held == place(blocks, [set(), set(), set()], ["a", "a", "b"])  # the same every time
    # worker 2's node lacks the first six blocks: they go to workers 0 and 1, the rest evens it out
    lacking = set(train_ids[:6])
    held = place(blocks, [set(), set(), lacking], ["a", "a", "b"])
    assert not lacking & {s.block for s in held[2]["train"]}
    assert max(sum(s.rows for s in h["train"]) for h in held) - min(sum(s.rows for s in h["train"]) for h in held) \
        <= 100
    missing = r"block \d+: .*block-00003.x.npy is missing on every node of the job \(a, b\)"
    with pytest.raises(BlockError, match=missing):
        place(blocks, [{3}, {3}, {3}], ["a", "a", "b"])
    with pytest.raises(BlockError, match=r"block 3 on b: .* every worker reads every training block"):
        place(backend_blocks(data, "global", np.float64), [set(), set(), {3}], ["a", "a", "b"])


def test_a_submitted_job_s_data_is_checked_here_where_it_can_be(digits_folder, monkeypatch, tmp_path):
    from jobs.config import ConfigError
    from jobs.data import DataError
    from jobs.submit import check_data

    def cfg(*overrides):
        return load_config(CONFIGS / "digits.yaml", list(overrides))

    with pytest.raises(ConfigError, match="data=digits is none; shard it first"):
        check_data(cfg("shuffle=blocks"))
    with pytest.raises(DataError, match="its blocks hold 200 validation examples"):
        check_data(cfg(f"data={digits_folder}", "validation_size=5"))
    monkeypatch.chdir(digits_folder.parent)
    with pytest.raises(ConfigError, match=f"a sharded folder does not travel with a job .* data={digits_folder}"):
        check_data(cfg(f"data=./{digits_folder.name}"))
    check_data(cfg(f"data={tmp_path / 'only-on-the-cluster'}", "shuffle=blocks"))  # not here: not checked
    check_data(cfg(f"data={digits_folder}", "shuffle=blocks"))


def test_two_shards_into_one_folder_at_once_leave_one_whole_folder(tmp_path):
    out = tmp_path / "out"

    def racing():  # the other writer finishes while this one writes its test blocks
        yield np.zeros((3, 4)), np.zeros(3, np.int64)
        out.mkdir()
        (out / "manifest.json").write_text("{}")

    pieces = {"train": iter([(np.ones((5, 4)), np.ones(5, np.int64))]), "validation": iter(()), "test": racing()}
    with pytest.raises(shards.ShardError, match="already exists \\(written while this one was\\)"):
        shards.write_folder(out, "x", 4, "float64", 2, 1, None, pieces)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_is_readable_as_a_folder_made_with_mkdir(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        data_shard("digits", tmp_path / "out", rows_per_block=500)
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_stopped_shard_leaves_no_folder_and_no_staging(tmp_path, stop):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "data", "shard", "synthetic:60000:784:10", str(out)],
                           cwd=tmp_path, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob(".out.*/block-00003.y.npy")):
        time.sleep(0.02)  # stopped once it has written a few blocks
    job.send_signal(getattr(signal, stop))
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + getattr(signal, stop), err
    assert "interrupted (the folder was not written)" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
