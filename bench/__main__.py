"""``python -m bench``: gradavg against its anchors, side by side, in one run.

Prints seconds per 50,000-example epoch of [784, 30, 10] (sigmoid, quadratic cost,
η = 3.0) on the same synthetic MNIST-shaped data, and the ratios between them; then the
Ray figures, peak memory and the cost of MLflow tracking. Figures from one run on one
machine: read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

N_TRAIN = 50_000
SIZES = [784, 30, 10]
ETA = 3.0
BATCHES = (10, 100, 1000)
GRADAVG_EPOCHS = 7  # timed epochs of gradavg per dtype and mini-batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("single", "ray", "nodes", "model", "memory", "tracking", "diagnostics",
                                           "sweep", "data"),
                        action="append",
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--slow-examples", type=int, default=5_000,
                        help="examples the slow anchors (the book's loop, PyTorch at small batches) are timed on; "
                             "their seconds per epoch are scaled up from these (default 5,000)")
    parser.add_argument("--no-ddp", action="store_true", help="leave out the PyTorch DDP column of the Ray figures")
    args = parser.parse_args(argv)
    parts = args.only or ["single", "ray", "nodes", "model", "memory", "tracking", "diagnostics", "sweep", "data"]
    print(f"gradavg benchmark: {os.cpu_count()} cores, numpy {np.__version__}, python {sys.version.split()[0]}")
    if "single" in parts:
        single_process(args.slow_examples)
    if "ray" in parts:
        from bench.ray_bench import ray_figures

        ray_figures(ddp=not args.no_ddp)
    if "nodes" in parts:
        from bench.ray_bench import nodes_figures

        nodes_figures()
    if "model" in parts:
        from bench.ray_bench import model_figures

        model_figures()
    if "memory" in parts:
        peak_memory()
    if "tracking" in parts:
        tracking_cost()
    if "diagnostics" in parts:
        diagnostics_cost()
    if "sweep" in parts:
        from bench.sweep_bench import sweep_figures

        sweep_figures()
    if "data" in parts:
        from bench.data_bench import data_figures

        data_figures()
    return 0


# ------------------------------------------------------------------ single process


def data(dtype="float64"):
    from jobs.data import load_dataset

    d = load_dataset(f"synthetic:{N_TRAIN + 1000}:784:10", test_size=1000)
    assert d.x_train.shape[0] == N_TRAIN
    return d


def gradavg_epoch(d, batch_size: int, dtype: str, threads: int = 0) -> float:
    from jobs.backends import LocalBackend
    from jobs.config import load_config
    from jobs.train import train

    cfg = load_config(None, [f"data=synthetic:{N_TRAIN + 1000}:784:10", "sizes=[784,30,10]", f"eta={ETA}",
                             f"batch_size={batch_size}", "epochs=1", f"dtype={dtype}", "track=false",
                             "log_every=1000000"])
    return train(cfg, d, LocalBackend(cfg.chunk_size, threads)).history[-1].epoch_seconds


def book_epoch(d, batch_size: int, n: int) -> float:
    from bench.reference import BookNetwork
    from core import Network

    net = Network.create(SIZES, seed=0)
    book = BookNetwork(net.weights, net.biases)
    order = np.random.default_rng(1).permutation(N_TRAIN)[:n]
    started = time.perf_counter()
    for lo in range(0, n, batch_size):
        idx = order[lo : lo + batch_size]
        book.update_mini_batch(d.x_train[idx], d.y_train[idx], ETA)
    return (time.perf_counter() - started) * N_TRAIN / n


def torch_epoch(d, batch_size: int, n: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 30), torch.nn.Sigmoid(), torch.nn.Linear(30, 10),
                                torch.nn.Sigmoid()).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=ETA)
    x = torch.from_numpy(d.x_train)
    y = torch.nn.functional.one_hot(torch.from_numpy(d.y_train), 10).double()
    order = torch.from_numpy(np.random.default_rng(1).permutation(N_TRAIN)[:n])
    started = time.perf_counter()
    for lo in range(0, n, batch_size):
        idx = order[lo : lo + batch_size]
        optimizer.zero_grad(set_to_none=True)
        # the book's C = (1/2n) Σ ‖y − a‖², so its gradient is the mean of the per-example gradients
        loss = 0.5 * ((model(x[idx]) - y[idx]) ** 2).sum() / idx.shape[0]
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) * N_TRAIN / n


def gemm_rate(dtype="float64") -> float:
    """FLOP/s of a large matrix product with the threads this process may use (the best of 5)."""
    a = np.random.default_rng(0).random((2000, 2000)).astype(dtype)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * 2000**3 / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def single_process(slow_examples: int) -> None:
    from core import parameter_count

    d = data()
    params = parameter_count(SIZES)
    rate = {dt: gemm_rate(dt) for dt in ("float64", "float32")}
    floor = {dt: 6 * params * N_TRAIN / rate[dt] for dt in rate}
    print(f"\n## Single process: seconds per {N_TRAIN:,}-example epoch of {SIZES}, η = {ETA}")
    print(f"floor = 6 × {params:,} parameters × {N_TRAIN:,} examples at the measured GEMM rate "
          f"({rate['float64'] / 1e9:.1f} GFLOP/s float64, {rate['float32'] / 1e9:.1f} float32, "
          f"{os.cpu_count()} threads)")
    header = ("mini-batch", "gradavg f64", "gradavg f32", "book loop", "PyTorch f64", "floor f64",
              "book/gradavg", "torch/gradavg", "gradavg/floor", "f64/f32")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for batch_size in BATCHES:
        # each contender warmed up untimed first (gradavg: loading its compiled kernels; PyTorch: its own start-up);
        # float64 and float32 epochs alternate, so that their ratio is taken under the same machine conditions
        epochs = {"float64": [], "float32": []}
        for _ in range(1 + GRADAVG_EPOCHS):
            for dt, seconds in epochs.items():
                seconds.append(gradavg_epoch(d, batch_size, dt))
        f64, f32 = (statistics.median(seconds[1:]) for seconds in epochs.values())
        book = book_epoch(d, batch_size, max(slow_examples, batch_size))
        torch_n = slow_examples if batch_size < 1000 else N_TRAIN
        torch_epoch(d, batch_size, 20 * batch_size)
        torch_s = torch_epoch(d, batch_size, torch_n)
        row = [f"{batch_size:,}", f"{f64:.3f}", f"{f32:.3f}", f"{book:.2f}",
               "n/a" if torch_s is None else f"{torch_s:.3f}", f"{floor['float64']:.3f}", f"{book / f64:.1f}×",
               "n/a" if torch_s is None else f"{torch_s / f64:.1f}×", f"{f64 / floor['float64']:.2f}×",
               f"{f64 / f32:.2f}×"]
        print("| " + " | ".join(row) + " |", flush=True)
    if torch_epoch(d, 10, 10) is None:
        print("(PyTorch is not installed: `pip install torch==2.13.0` adds its column)")
    print(f"(the book's loop and PyTorch below mini-batch 1,000 timed on {slow_examples:,} "
          f"examples and scaled to an epoch; gradavg figures are medians of {GRADAVG_EPOCHS} full epochs after one "
          "untimed, float64 and float32 alternating)")


# ------------------------------------------------------------------ memory


def peak_memory() -> None:
    """Peak resident memory of a whole 50,000-example job, in a process of its own."""
    print(f"\n## Peak memory of a {N_TRAIN:,}-example run (one epoch, float64, no tracking)")
    # VmHWM, the peak of this process's own memory: ru_maxrss would carry over the parent's across exec
    code = ("import sys; from jobs.cli import main; "
            "rc = main(['run', 'configs/synthetic-large.yaml', 'epochs=1', 'track=false', '--quiet']); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(hwm, file=sys.stderr); sys.exit(rc)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"the run failed: {proc.stderr.strip().splitlines()[-1]}")
        return
    peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
    data_mb = N_TRAIN * 784 * 8 / 1e6 / 1.048576
    print(f"training data {data_mb:.0f} MiB; peak {peak_mb:.0f} MiB; "
          f"target 2 × data + 300 = {2 * data_mb + 300:.0f} MiB: {'met' if peak_mb <= 2 * data_mb + 300 else 'MISSED'}")


# ------------------------------------------------------------------ tracking


def tracking_cost() -> None:
    """Training with MLflow tracking on against off, at two sizes: short mnist-5k epochs at mini-batch 10,
    and synthetic-large's shape (50,000 × 784, mini-batch 1,000), where an epoch takes under 0.1 s."""
    from jobs.config import load_config
    from jobs.data import save_npz, synthetic

    print("\n## MLflow tracking cost: the training loop with the tracker's hooks against without, local sqlite store")
    print("(diagnostics on, as by default; each size alternates off and on, medians of per-epoch times)")
    with tempfile.TemporaryDirectory() as folder:
        tracking_cost_at(load_config("configs/nielsen-ch1.yaml", ["epochs=3"]), "mnist-5k, mini-batch 10", folder)
        x, y = synthetic(55_000, 784, 10)  # a file of synthetic-large's shape: the same work as its data spec
        save_npz(f"{folder}/large.npz", x, y)
        del x, y
        cfg = load_config("configs/synthetic-large.yaml", [f"data={folder}/large.npz", "epochs=8"])
        tracking_cost_at(cfg, "synthetic-large's shape, mini-batch 1,000", folder)


def tracking_cost_at(cfg, name: str, folder: str, rounds: int = 3) -> None:
    from jobs.backends import LocalBackend
    from jobs.run import prepare_data
    from jobs.tracking import RunTracker
    from jobs.train import Hooks, train

    class EpochTimes(Hooks):
        def __init__(self, tracker=None):
            self.tracker, self.seconds = tracker, []

        def on_epoch_end(self, result, state):
            self.seconds.append(result.epoch_seconds)
            if self.tracker:
                self.tracker.on_epoch_end(result, state)

        def on_batch_cost(self, step, cost):
            if self.tracker:
                self.tracker.on_batch_cost(step, cost)

    d = prepare_data(cfg)
    off, on, setup, drain = [], [], [], []
    uri = f"sqlite:///{folder}/mlflow.db"
    for _ in range(rounds):
        times = EpochTimes()
        train(cfg, d, LocalBackend(cfg.chunk_size), hooks=times)
        off += times.seconds[1:]  # the first epoch warms caches
        tracker = RunTracker(cfg, uri)
        opened = time.perf_counter()
        tracker.start(d, {"backend": "local"})
        setup.append(time.perf_counter() - opened)
        times = EpochTimes(tracker)
        train(cfg, d, LocalBackend(cfg.chunk_size), hooks=times)
        on += times.seconds[1:]
        started = time.perf_counter()
        tracker.flush()
        drain.append(time.perf_counter() - started)
        tracker.end("FINISHED")
    t_off, t_on = statistics.median(off), statistics.median(on)
    print(f"{name}: an epoch takes {t_off:.3f} s with tracking off, {t_on:.3f} s on: {100 * (t_on / t_off - 1):+.1f}% "
          f"(target at most +5%); sending what was held back at the end {statistics.median(drain):.3f} s, "
          f"opening the run {statistics.median(setup):.2f} s (once a run)")


def diagnostics_cost() -> None:
    """Training time with the per-layer diagnostics on against off (no tracking), medians of 5."""
    from jobs.backends import LocalBackend
    from jobs.config import load_config
    from jobs.run import prepare_data
    from jobs.train import train

    print("\n## Per-layer diagnostics cost (once an epoch, on a fiftieth of the training data, at most 500)")
    for spec, batch_size in ((f"synthetic:{N_TRAIN + 1000}:784:10", 100), ("mnist-5k", 10)):
        common = [f"data={spec}", "sizes=[784,30,10]", f"batch_size={batch_size}", "epochs=1", "track=false"]
        if spec.startswith("synthetic"):
            common.append("test_size=1000")
        d = prepare_data(load_config(None, common))
        times = {}
        for flag in ("false", "true"):
            cfg = load_config(None, [*common, f"diagnostics={flag}"])
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                train(cfg, d, LocalBackend(cfg.chunk_size))
                runs.append(time.perf_counter() - started)
            times[flag] = statistics.median(runs)
        print(f"{spec.split(':')[0]}, {d.x_train.shape[0]:,} examples, mini-batch {batch_size}: an epoch with "
              f"evaluation {times['false']:.3f} s off, {times['true']:.3f} s on: "
              f"{100 * (times['true'] / times['false'] - 1):+.1f}% (target at most +5%)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
