"""``python -m bench --only data``: sharded datasets, measured.

- peak memory of the driver and of each worker, ``shuffle=global`` against ``shuffle=blocks``, for
  synthetic training sets of 0.5 to 4 GiB (float32): the driver flat, each worker about its share
  under blocks, the whole set under global;
- examples per second for both shuffles on 1 and 2 workers, and the time the workers take to load
  their blocks;
- two namespace nodes, each worker capped below the whole training set (``bench.capped``);
- the accuracy of ``shuffle=blocks`` against ``shuffle=global`` on the book's chapter 1 and 3 configs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WIDTH, CLASSES = 784, 10
ROWS_PER_BLOCK = 20_000  # 60 MiB of float32 rows a block
TEST_ROWS = 10_000
MARGIN = 256 * 2**20  # a capped worker may allocate its share and this (buffers, the kernels it loads)


def synthetic_folder(out: Path, train_bytes: float, rows_per_block: int = ROWS_PER_BLOCK, seed: int = 0) -> Path:
    """A sharded dataset of about ``train_bytes`` of float32 training rows, written a block at a time (never
    more than one block in memory): inputs uniform on [0, 1], labels from a seeded linear teacher."""
    from jobs.shards import write_folder

    n_train = int(train_bytes // (WIDTH * 4))
    teacher = np.random.default_rng(seed).standard_normal((WIDTH, CLASSES)).astype(np.float32)

    def pieces(n: int, first_seed: int):
        for k, lo in enumerate(range(0, n, rows_per_block)):
            x = np.random.default_rng([seed, first_seed, k]).random((min(rows_per_block, n - lo), WIDTH),
                                                                  dtype=np.float32)
            yield x, np.argmax((x - 0.5) @ teacher, axis=1)

    write_folder(out, f"synthetic-{n_train}", WIDTH, "float32", CLASSES, CLASSES - 1, None,
                 {"train": pieces(n_train, 1), "validation": iter(()), "test": pieces(TEST_ROWS, 2)})
    return out


DRIVER = """
import json, sys, time
from cluster.connect import end_process
from cluster.driver import RayBackend
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.train import train

def hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1]) * 1024

class Measured(RayBackend):
    def start(self, *args, **kwargs):
        started = time.perf_counter()
        super().start(*args, **kwargs)
        self.load_seconds = time.perf_counter() - started
    def close(self):
        self.peaks = [hwm(pid) for pid in self.pids]
        super().close()

folder, shuffle, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(None, [f"data={folder}", f"shuffle={shuffle}", "sizes=[784,30,10]", "dtype=float32",
                         "batch_size=1000", "chunk_size=500", "epochs=1", "eta=0.5", "diagnostics=false",
                         "log_every=100000", "track=false", f"workers={workers}", "backend=ray"])
backend = Measured(workers, cfg.chunk_size)
state = train(cfg, load_dataset(folder, rows=False), backend)
print(json.dumps({"driver": hwm("self"), "workers": backend.peaks, "load": backend.load_seconds,
                  "rate": state.history[-1].examples_per_second}))
end_process(0)
"""


def drive(folder: Path, shuffle: str, workers: int) -> dict | str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(folder), shuffle, str(workers)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return json.loads(lines[-1])


def memory_and_speed(sizes=(0.5, 1, 2, 4)) -> None:
    mib = 2**20
    print("\n## Sharded data on Ray: peak memory (VmHWM) and speed, 2 workers on this machine, one epoch of "
          "[784, 30, 10] float32, mini-batch 1,000")
    print("| training set | shuffle | driver MiB | each worker MiB | start s | examples/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=os.environ.get("GRADAVG_BENCH_DIR")) as tmp:
        drive(synthetic_folder(Path(tmp) / "warm-up", 2**26), "blocks", 2)  # the workers' float32 kernels, cached
        for gib in sizes:
            folder = synthetic_folder(Path(tmp) / f"d{gib}", gib * 2**30)
            for shuffle in ("global", "blocks"):
                r = drive(folder, shuffle, 2)
                if isinstance(r, str):
                    print(f"| {gib} GiB | {shuffle} | failed: {r} | | | |")
                    continue
                each = " / ".join(f"{w / mib:,.0f}" for w in r["workers"])
                print(f"| {gib} GiB | {shuffle} | {r['driver'] / mib:,.0f} | {each} | {r['load']:.1f} | "
                      f"{r['rate']:,.0f} |", flush=True)
            if gib == 1:
                for shuffle in ("global", "blocks"):
                    r = drive(folder, shuffle, 1)
                    if not isinstance(r, str):
                        print(f"| {gib} GiB, 1 worker | {shuffle} | {r['driver'] / mib:,.0f} | "
                              f"{r['workers'][0] / mib:,.0f} | {r['load']:.1f} | {r['rate']:,.0f} |", flush=True)
            subprocess.run(["rm", "-rf", str(folder)])


def capped_nodes(train_gib: float = 1.5) -> None:
    """Two namespace nodes, one worker each, each capped at its share and MARGIN, below the whole set."""
    from bench import capped, two_nodes

    why = two_nodes.available() or capped.cgroups_available()
    print(f"\n## Two namespace nodes, each worker's memory capped (a memory cgroup), {train_gib} GiB training set")
    if why:
        print(f"skipped: {why}")
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("GRADAVG_BENCH_DIR")) as tmp:
        folder = synthetic_folder(Path(tmp) / "data", train_gib * 2**30)
        limit = int(train_gib * 2**30 / 2 + MARGIN)
        with two_nodes.two_nodes(Path(tmp)) as nodes:
            for shuffle in ("blocks", "global"):
                report = run_capped(nodes, folder, limit, shuffle, Path(tmp) / f"{shuffle}.npy")
                peaks = " / ".join(f"{p / 2**20:,.0f}" for p in report.get("peaks", []))
                speed = (f", {report['rate']:,.0f} examples/s, blocks loaded in {report['load']:.1f} s"
                         if "rate" in report else "")
                print(f"shuffle={shuffle}: cap {limit / 2**20:,.0f} MiB a worker (the training set is "
                      f"{train_gib * 1024:,.0f} MiB), {report.get('nodes')} nodes; peak {peaks} MiB; "
                      f"{report['outcome']}{speed}", flush=True)
        if (Path(tmp) / "blocks.npy").exists():
            same = np.array_equal(np.load(Path(tmp) / "blocks.npy"), single_process(folder))
            print(f"weights of the capped two-node run {'==' if same else '!='} the single process's, uncapped")


def run_capped(nodes, folder: Path, limit: int, shuffle: str, out: Path) -> dict:
    proc = nodes.run([sys.executable, "-m", "bench.capped", str(folder), str(limit), shuffle, str(out)],
                     capture_output=True, text=True, timeout=900, env_extra={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"outcome": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def single_process(folder: Path) -> np.ndarray:
    from bench.capped import OVERRIDES
    from jobs.backends import LocalBackend
    from jobs.config import load_config
    from jobs.data import load_dataset
    from jobs.train import train

    cfg = load_config(None, [f"data={folder}", "shuffle=blocks", *OVERRIDES])
    return train(cfg, load_dataset(str(folder)), LocalBackend(cfg.chunk_size)).network.params


def accuracy(seeds=(0, 1, 2, 3, 4)) -> None:
    from jobs.config import load_config, replace
    from jobs.data import shard
    from jobs.run import run_job

    print("\n## Accuracy of shuffle=blocks against shuffle=global: final test accuracy after the config's epochs, "
          f"mean of seeds {', '.join(map(str, seeds))} (the spread between seeds in brackets)")
    print("| config | shuffle | rows a block | mix_blocks | test accuracy % | against global | s a run |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("nielsen-ch1", "nielsen-ch3"):
            cfg = load_config(ROOT / "configs" / f"{name}.yaml")
            base = None
            for rows, shuffle, mix in ((1000, "global", 1), (1000, "blocks", 1), (1000, "blocks", 4),
                                       (250, "blocks", 1), (250, "blocks", 4)):
                folder = Path(tmp) / f"{name}-{rows}"
                if not folder.exists():
                    shard(cfg.data, folder, rows, cfg.validation_size, cfg.test_size)
                results, seconds = [], []
                for seed in seeds:
                    started = time.perf_counter()
                    run = run_job(replace(cfg, data=str(folder), shuffle=shuffle, mix_blocks=mix, seed=seed,
                                          track=False, diagnostics=False), quiet=True)
                    seconds.append(time.perf_counter() - started)
                    results.append(100 * run.state.history[-1].test_accuracy)
                mean = statistics.mean(results)
                base = mean if base is None else base
                print(f"| {name} | {shuffle} | {rows} | {mix if shuffle == 'blocks' else ''} | {mean:.2f} "
                      f"({min(results):.1f}–{max(results):.1f}) | {mean - base:+.2f} | "
                      f"{statistics.median(seconds):.1f} |", flush=True)


def data_figures() -> None:
    accuracy()
    memory_and_speed()
    capped_nodes()
