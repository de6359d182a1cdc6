"""Reading a sharded dataset's blocks where they are computed on: a worker, or the single process.

A block is two ``.npy`` files, the rows ``(n, width)`` and the labels ``(n,)``, with one sha256
over both files' bytes (``block_digest``). A ``BlockSpec`` names a block and where its rows sit
among the positions of its split; it is plain data, so it crosses a process boundary as is.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

import numpy as np

from jobs.errors import first_line

SPLITS = ("train", "validation", "test")


class BlockError(ValueError):
    """A block cannot be read as its manifest says; the message names the block, the file and the node."""


@dataclass(frozen=True)
class BlockSpec:
    block: int  # its index in the manifest
    x_path: str
    y_path: str
    rows: int
    width: int
    dtype: str  # as written: float32 or float64
    sha256: str
    offset: int  # its first position among the rows of its split
    max_label: int  # the dataset's largest label, as its manifest says


def block_digest(x_path: str, y_path: str) -> str:
    """sha256 over the rows file's bytes, then the labels file's."""
    digest = hashlib.sha256()
    for path in (x_path, y_path):
        with open(path, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                digest.update(piece)
    return digest.hexdigest()


def node_name() -> str:
    """How an error names this node: its Ray node id where Ray runs, and its host name."""
    try:
        import ray

        if ray.is_initialized():
            return f"{socket.gethostname()} (Ray node {ray.get_runtime_context().get_node_id()[:12]})"
    except Exception:  # Ray absent or not connected: the host name alone
        pass
    return socket.gethostname()


def missing(specs: list[BlockSpec]) -> list[int]:
    """The blocks whose files this process cannot see."""
    return [s.block for s in specs if not (os.path.isfile(s.x_path) and os.path.isfile(s.y_path))]


def load_blocks(specs: list[BlockSpec], dtype) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """The blocks' rows stacked in the order given, as ``dtype``, their labels, and where each block
    starts among them. Each file is checked against its digest and its header before it is used;
    the rows go straight from the file into their place (no second copy of the share)."""
    dtype = np.dtype(dtype)
    width = specs[0].width if specs else 0
    x = np.empty((sum(s.rows for s in specs), width), dtype)
    labels = np.empty(x.shape[0], np.int64)
    starts, at = {}, 0
    for spec in specs:
        rows, y = read_block(spec)
        x[at : at + spec.rows] = rows  # converted to dtype as a whole array would be, element by element
        labels[at : at + spec.rows] = y
        starts[spec.block] = at
        at += spec.rows
        del rows
    return x, labels, starts


def read_block(spec: BlockSpec) -> tuple[np.ndarray, np.ndarray]:
    """One block's rows (memory-mapped, read-only) and labels, checked; ``BlockError`` names what is wrong."""
    where = f"block {spec.block} on {node_name()}"
    for path in (spec.x_path, spec.y_path):
        if not os.path.isfile(path):
            raise BlockError(f"{where}: {path} is missing; copy the dataset's folder to this node (or a shared "
                             "filesystem every node mounts at the same path)")
    try:
        digest = block_digest(spec.x_path, spec.y_path)
        x = np.load(spec.x_path, mmap_mode="r", allow_pickle=False)
        y = np.load(spec.y_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BlockError(f"{where}: {spec.x_path} cannot be read ({first_line(e, 120)}); restore the "
                         "file from the dataset's folder") from None
    if digest != spec.sha256:
        raise BlockError(f"{where}: {spec.x_path} does not match the manifest's sha256 (the block was changed or "
                         "damaged); restore it, or shard the data again with `gradavg data shard`")
    if x.ndim != 2 or x.shape != (spec.rows, spec.width) or x.dtype != np.dtype(spec.dtype):
        raise BlockError(f"{where}: {spec.x_path} holds {x.dtype} rows of shape {x.shape}, but the manifest says "
                         f"{spec.dtype} ({spec.rows}, {spec.width}); every block must have the dataset's width "
                         "and dtype: shard the data again")
    if y.shape != (spec.rows,) or not np.issubdtype(y.dtype, np.integer):
        raise BlockError(f"{where}: {spec.y_path} holds {y.dtype} labels of shape {y.shape}, but the manifest says "
                         f"{spec.rows} integer labels: shard the data again")
    if y.size and (y.min() < 0 or y.max() > spec.max_label):
        bad = int(y.max()) if y.max() > spec.max_label else int(y.min())
        raise BlockError(f"{where}: {spec.y_path} holds label {bad}, outside the manifest's 0 to {spec.max_label}; "
                         "shard the data again")
    return x, y.astype(np.int64, copy=False)


@dataclass
class Blocks:
    """A sharded dataset as a backend sees it: each split's blocks, whether chunks must stay within a
    block (``shuffle=blocks``: then each worker holds only its blocks), and, in a process that holds
    every row (the local backend), the rows of each split in position order."""

    specs: dict[str, list[BlockSpec]]
    confined: bool
    n_classes: int
    rows: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def offsets(self, split: str) -> np.ndarray:
        specs = self.specs[split]
        return np.array([s.offset for s in specs] + [sum(s.rows for s in specs)], dtype=np.int64)


# One row of evaluation sums per block (or chunk): Σ_x C_x, the number right, the count, then the
# confusion counts[true, predicted] flattened. Added by the driver in block order: the same bits
# whichever process evaluated which block.
def evaluation_row(network, x: np.ndarray, labels: np.ndarray, n_classes: int, confusion: bool = True) -> np.ndarray:
    cost, correct, predicted = network.evaluate_sums(x, labels)
    row = np.zeros(3 + (n_classes * n_classes if confusion else 0))
    row[:3] = cost, correct, labels.shape[0]
    if confusion and labels.size:
        np.add.at(row[3:], labels * n_classes + np.minimum(predicted, n_classes - 1), 1)
    return row


def add_evaluation_rows(rows, n_classes: int) -> tuple[float, float, np.ndarray]:
    """The mean cost, the accuracy and the confusion counts from rows in block order."""
    cost, correct, n = 0.0, 0.0, 0.0
    confusion = np.zeros(n_classes * n_classes)
    for row in rows:
        cost += row[0]
        correct += row[1]
        n += row[2]
        if row.shape[0] > 3:
            confusion += row[3:]
    if not n:
        raise ValueError("cannot evaluate on an empty dataset")
    return float(cost / n), float(correct / n), confusion.reshape(n_classes, n_classes).astype(np.int64)


def place(blocks: Blocks, missing: list[set[int]], nodes: list[str]) -> list[dict]:
    """Each worker's blocks, per split: every block on a worker whose node can read its files, the least
    loaded (in rows) of them, the first on a tie; so evenly and the same every time. Under
    ``shuffle=global`` every worker holds every training block."""
    held = [{split: [] for split in SPLITS} for _ in missing]
    load = [0] * len(missing)
    for split in SPLITS:
        for spec in blocks.specs[split]:
            readers = [w for w, gone in enumerate(missing) if spec.block not in gone]
            if split == "train" and not blocks.confined:
                blind = next((w for w, gone in enumerate(missing) if spec.block in gone), None)
                if blind is not None:
                    raise BlockError(f"block {spec.block} on {nodes[blind]}: {spec.x_path} is missing; under "
                                     "shuffle=global every worker reads every training block: copy the dataset's "
                                     "folder to every node (or train with shuffle=blocks)")
                for w in range(len(missing)):
                    held[w][split].append(spec)
                continue
            if not readers:
                raise BlockError(f"block {spec.block}: {spec.x_path} is missing on every node of the job "
                                 f"({', '.join(sorted(set(nodes)))}); copy the dataset's folder to them")
            w = min(readers, key=lambda r: (load[r], r))
            held[w][split].append(spec)
            load[w] += spec.rows
    return held
