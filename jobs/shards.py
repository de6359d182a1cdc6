"""Sharded datasets: a folder of fixed blocks and a manifest, written by ``gradavg data shard``.

The folder holds ``manifest.json`` and, per block, ``block-NNNNN.x.npy`` (rows, ``(n, width)``)
and ``block-NNNNN.y.npy`` (labels). Blocks are fixed when the folder is written, independent of
any worker count: they are the unit of placement (each Ray worker loads only its own), of the
``shuffle=blocks`` order, and of recovery (a replacement worker loads the dead one's). Plain
``.npy`` because numpy memory-maps it and reads it with no other library, bit for bit, in the
dtype it was written.

The training examples are written in one seeded order (so that a block is a fair sample of the
data, even where the source is sorted by class); ``train-rows.npy`` keeps which source example
each position holds, so that ``shuffle=global`` on the folder visits the same examples in the same
order as on its source: the same bits. Validation and test blocks keep the source's order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.blocks import SPLITS, BlockError, Blocks, BlockSpec, block_digest, load_blocks

MANIFEST = "manifest.json"
FORMAT = "gradavg-blocks"
VERSION = 1
ROWS_PER_BLOCK = 1000
SHARD_SEED = 20_260_102  # the order the training examples are written in


class ShardError(ValueError):
    """A folder that is no sharded dataset, or one that cannot be written; the message says what to do."""


@dataclass(frozen=True)
class Manifest:
    folder: Path
    name: str
    width: int
    dtype: str
    n_classes: int
    max_label: int
    image_shape: tuple[int, int] | None
    blocks: tuple[dict, ...]  # per block: x, y (file names), rows, sha256
    splits: dict  # split -> tuple of block indices, in position order
    source_rows: dict | None  # {"file", "sha256"}: the source example at each training position
    digest: str  # sha256 of manifest.json's bytes

    def rows(self, split: str) -> int:
        return sum(self.blocks[b]["rows"] for b in self.splits[split])

    def offsets(self, split: str) -> np.ndarray:
        """Where each of the split's blocks starts among its positions, then the split's size."""
        return np.concatenate(([0], np.cumsum([self.blocks[b]["rows"] for b in self.splits[split]]))).astype(np.int64)

    def specs(self, split: str) -> list[BlockSpec]:
        offsets = self.offsets(split)
        return [BlockSpec(b, str(self.folder / self.blocks[b]["x"]), str(self.folder / self.blocks[b]["y"]),
                          self.blocks[b]["rows"], self.width, self.dtype, self.blocks[b]["sha256"], int(offsets[k]),
                          self.max_label)
                for k, b in enumerate(self.splits[split])]

    def positions_of_sources(self) -> np.ndarray | None:
        """inv such that position inv[i] holds the source's training example i; None where the folder
        does not say (then positions are the examples' order)."""
        if self.source_rows is None:
            return None
        path = self.folder / self.source_rows["file"]
        try:
            with open(path, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != self.source_rows["sha256"]:
                    raise ShardError(f"{path}: does not match the manifest's sha256; restore it, or shard the data "
                                     "again")
            rows = np.load(path, allow_pickle=False)
        except OSError as e:
            raise ShardError(f"{path}: cannot be read ({e.strerror or e}); restore it from the dataset's folder") \
                from None
        n = self.rows("train")
        if rows.shape != (n,) or not np.array_equal(np.sort(rows), np.arange(n)):
            raise ShardError(f"{path}: is not an order of the {n} training examples; shard the data again")
        inverse = np.empty(n, np.int64)
        inverse[rows] = np.arange(n)
        return inverse


def is_sharded(path: str | os.PathLike) -> bool:
    return Path(path, MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """The manifest of a sharded folder, checked for shape and sense (the blocks' files are checked
    where they are read)."""
    folder = Path(folder).resolve()
    path = folder / MANIFEST
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
    except FileNotFoundError:
        raise ShardError(f"{folder}: no {MANIFEST} here, so it is no sharded dataset; write one with "
                         "`gradavg data shard SOURCE OUT`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: cannot be read as a manifest ({type(e).__name__}); shard the data again") from None
    problem = _manifest_problem(doc)
    if problem:
        raise ShardError(f"{path}: {problem}; shard the data again with `gradavg data shard`")
    shape = doc.get("image_shape")
    return Manifest(folder, str(doc["name"]), doc["width"], doc["dtype"], doc["n_classes"], doc["max_label"],
                    tuple(shape) if shape else None, tuple(doc["blocks"]),
                    {s: tuple(doc["splits"][s]) for s in SPLITS}, doc.get("source_rows"),
                    hashlib.sha256(raw).hexdigest())


def _manifest_problem(doc) -> str | None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return f"not a {FORMAT} manifest"
    if doc.get("version") != VERSION:
        return f"version {doc.get('version')!r}, and this gradavg reads version {VERSION}"
    whole = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    if not whole(doc.get("width"), 1) or doc.get("dtype") not in ("float32", "float64") \
            or not whole(doc.get("n_classes"), 2) or not whole(doc.get("max_label"), 0):
        return "width, dtype (float32 or float64), n_classes or max_label missing or wrong"
    if doc["max_label"] >= doc["n_classes"]:
        return f"max_label {doc['max_label']} is not below n_classes {doc['n_classes']}"
    blocks = doc.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        return "it lists no blocks"
    for k, block in enumerate(blocks):
        if not isinstance(block, dict) or not whole(block.get("rows"), 1) \
                or not all(_plain_name(block.get(key)) for key in ("x", "y")) \
                or not isinstance(block.get("sha256"), str) or len(block["sha256"]) != 64:
            return f"block {k} needs x and y (file names in the folder), rows >= 1 and a sha256"
    splits = doc.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        return f"splits must name the blocks of {', '.join(SPLITS)}"
    listed = [b for s in SPLITS for b in (splits[s] if isinstance(splits[s], list) else [None])]
    if any(not whole(b, 0) or b >= len(blocks) for b in listed) or sorted(listed) != list(range(len(blocks))):
        return "splits must list every block exactly once"
    if not splits["train"] or not splits["test"]:
        return "it needs training blocks and test blocks"
    rows = doc.get("source_rows")
    if rows is not None and (not isinstance(rows, dict) or not _plain_name(rows.get("file"))
                             or not isinstance(rows.get("sha256"), str)):
        return "source_rows must name a file in the folder and its sha256"
    return None


def _plain_name(name) -> bool:
    """A file in the folder itself: a manifest never points a reader elsewhere."""
    return isinstance(name, str) and bool(name) and name == os.path.basename(name) and name not in (".", "..")


# ---------------------------------------------------------------- reading a folder


def load_sharded(folder, validation_size: int | None, test_size: int | None, rows: bool | tuple[str, ...] = True):
    """The folder as a ``Dataset``. With ``rows``, every block is read (a single process
    trains on them all), or those of the splits it names; without, only the manifest and the first test
    block (a sample for plots and a model's input example): what a Ray driver holds. A
    ``validation_size`` of None takes the folder's."""
    from jobs.formats import DataError, Dataset

    manifest = read_manifest(folder)
    n_validation, n_test = manifest.rows("validation"), manifest.rows("test")
    if validation_size is not None and validation_size != n_validation:
        raise DataError(f"data={folder}: its blocks hold {n_validation} validation examples, fixed when it was "
                        f"sharded, but validation_size={validation_size}; set validation_size={n_validation}, or "
                        f"shard again with --validation-size {validation_size}")
    if test_size is not None and test_size != n_test:
        raise DataError(f"data={folder}: its blocks hold {n_test} test examples, fixed when it was sharded, but "
                        f"test_size={test_size}; drop test_size, or shard again with --test-size {test_size}")
    wanted = set(SPLITS) if rows is True else set(rows or ())
    try:
        parts = {}
        for split in SPLITS:
            if split in wanted:
                x, y, _ = load_blocks(manifest.specs(split), manifest.dtype)
            elif split == "test":  # a sample
                x, y, _ = load_blocks(manifest.specs(split)[:1], manifest.dtype)
            else:
                x = y = None
            parts[f"x_{split}"], parts[f"y_{split}"] = x, y
    except BlockError as e:
        raise DataError(str(e)) from None
    return Dataset(name=manifest.name, n_classes=manifest.n_classes, digest=manifest.digest, shards=manifest,
                   **parts)


# ---------------------------------------------------------------- writing a folder


def write_folder(out, name: str, width: int, dtype: str, n_classes: int, max_label: int,
                 image_shape: tuple[int, int] | None, pieces: dict[str, Iterable[tuple[np.ndarray, np.ndarray]]],
                 source_rows: np.ndarray | None = None) -> Manifest:
    """Write blocks as they come (one in memory at a time), then the manifest, into a new folder that
    takes the name ``out`` only once complete: a folder named ``out`` is never half written."""
    out = Path(out)
    if out.exists():
        raise ShardError(f"{out}: already exists; shard into a new folder (or remove it first)")
    if dtype not in ("float32", "float64"):
        raise ShardError(f"--dtype {dtype}: use float32 or float64")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        blocks, splits = [], {}
        for split in SPLITS:
            splits[split] = []
            for x, y in pieces[split]:
                k = len(blocks)
                entry = {"x": f"block-{k:05d}.x.npy", "y": f"block-{k:05d}.y.npy", "rows": int(y.size)}
                np.save(staging / entry["x"], np.ascontiguousarray(x, dtype=dtype), allow_pickle=False)
                np.save(staging / entry["y"], np.asarray(y, dtype=np.int64), allow_pickle=False)
                entry["sha256"] = block_digest(str(staging / entry["x"]), str(staging / entry["y"]))
                blocks.append(entry)
                splits[split].append(k)
        doc = {"format": FORMAT, "version": VERSION, "name": name, "width": int(width), "dtype": dtype,
               "n_classes": int(n_classes), "max_label": int(max_label),
               "image_shape": list(image_shape) if image_shape else None, "blocks": blocks, "splits": splits}
        if source_rows is not None:
            np.save(staging / "train-rows.npy", np.asarray(source_rows, dtype=np.int64), allow_pickle=False)
            with open(staging / "train-rows.npy", "rb") as f:
                doc["source_rows"] = {"file": "train-rows.npy", "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        problem = _manifest_problem(doc)
        if problem:
            raise ShardError(f"{out}: {problem}")
        (staging / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # as a folder made with mkdir (mkdtemp makes it private)
        try:
            staging.rename(out)
        except OSError:
            if out.exists():  # another `data shard` to the same folder finished first
                raise ShardError(f"{out}: already exists (written while this one was); keep that one, or shard "
                                 "into a new folder") from None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_manifest(out)


def backend_blocks(data, shuffle: str, dtype) -> Blocks | None:
    """What a backend is told of a sharded dataset (None for data given in memory): its blocks, whether
    chunks stay within them, and the rows of every split where ``data`` holds them, in ``dtype``."""
    manifest = data.shards
    if manifest is None:
        return None
    rows = None
    if data.x_train is not None:
        rows = {split: (np.ascontiguousarray(getattr(data, f"x_{split}"), dtype=dtype), getattr(data, f"y_{split}"))
                for split in SPLITS}
    return Blocks({split: manifest.specs(split) for split in SPLITS}, shuffle == "blocks", manifest.n_classes, rows)
