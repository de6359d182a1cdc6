"""Ray figures: a step's overhead under each transport, examples per second against the single
process and PyTorch DDP, where a Ray step's time goes (driver and workers), scaling from 1 to 2
workers, and the constants of the cost model (``bench.cost_model``)."""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict

import numpy as np

from bench.ddp import ddp_seconds_per_step
from cluster import RAY_SYSTEM_CONFIG
from cluster.driver import RayBackend  # (which puts Ray's settings in the environment: cluster.ray_settings)
from core.kernels import add_and_update

SIZES = [784, 30, 10]
BATCHES = (10, 100, 1_000, 10_000)
STEPS = {10: 400, 100: 300, 1_000: 60, 10_000: 8}  # timed steps per repetition
ETA = 1e-3


class TimedRayBackend(RayBackend):
    """A RayBackend that notes, each step, the round trip to its workers and their own compute."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = defaultdict(list)

    def _run(self, work):
        started = time.perf_counter()
        results = super()._run(work)
        self.seconds["round trip"].append(time.perf_counter() - started)
        self.seconds["workers"].append(max(seconds for *_, seconds in results))
        return results


def seconds_per_step(backend, network, x, labels, batch_size: int, steps: int, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean seconds of ``steps`` training steps (``train_steps``),
    after 3 untimed steps (Ray workers compile their kernels on the first)."""
    order = np.random.default_rng(0).permutation(x.shape[0])
    steps = min(steps, x.shape[0] // batch_size)
    backend.start(network, x, labels)
    try:
        backend.train_steps(network, order, 0, min(3, steps), batch_size, ETA, 0.0)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            backend.train_steps(network, order, 0, steps, batch_size, ETA, 0.0)
            times.append((time.perf_counter() - started) / steps)
    finally:
        backend.close()
    return statistics.median(times)


def driver_profile(network, x, labels, batch_size: int, steps: int, transport: str) -> dict[str, float]:
    """Where a step of 2 workers goes, medians in seconds: the whole step; the workers' compute (the
    slower of the two); the driver's own work: copying the chunk sums in, then adding them and
    updating; and the rest of the round trip (sending, waiting, receiving)."""
    backend = TimedRayBackend(2, math.ceil(batch_size / 2), transport=transport)
    order = np.random.default_rng(0).permutation(x.shape[0])
    backend.start(network, x, labels)
    step_s, collect_s, update_s = [], [], []
    try:
        for step in range(3 + steps):
            batch = order[(step * batch_size) % x.shape[0] :][:batch_size]
            started = time.perf_counter()
            sums, count = backend.chunk_sums(network, batch)
            collected = time.perf_counter()
            add_and_update(network, sums, sums.shape[0] - 1, count, ETA, 0.0, x.shape[0])
            done = time.perf_counter()
            step_s.append(done - started)
            collect_s.append(collected - started)
            update_s.append(done - collected)
    finally:
        backend.close()
    trips, workers = backend.seconds["round trip"][3:], backend.seconds["workers"][3:]
    return {"step": statistics.median(step_s[3:]), "workers": statistics.median(workers),
            "copy": statistics.median(np.subtract(collect_s[3:], trips)), "add+update": statistics.median(update_s[3:]),
            "transport": statistics.median(np.subtract(trips, workers))}


def ray_figures(ddp: bool = True) -> None:
    import ray

    from core import Network
    from jobs.backends import LocalBackend
    from jobs.data import synthetic

    # the peer first, with no Ray on the machine (a Ray process can take the port its ranks meet on)
    ddp_s = {m: ddp_seconds_per_step(SIZES, m, STEPS[m]) if ddp else None for m in BATCHES}
    # the embedded cluster gradavg starts (with the inline limits the tasks transport wants)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _system_config=RAY_SYSTEM_CONFIG)
    try:
        x, labels = synthetic(50_000, 784, 10)
        net = Network.create(SIZES, seed=0)
        print("\n## Ray on this machine (2 CPUs, one node)")

        # 1. the overhead of a step at mini-batch 10, one worker, each transport
        local = seconds_per_step(LocalBackend(10, threads=1), net.copy(), x, labels, 10, STEPS[10])
        print(f"{SIZES}, mini-batch 10, 1 worker: the same step in one process (1 thread) {1e3 * local:.3f} ms")
        for transport in ("compiled", "tasks"):
            step = seconds_per_step(RayBackend(1, 10, transport=transport), net.copy(), x, labels, 10, STEPS[10])
            target = " (target at most 0.7 ms)" if transport == "compiled" else ""
            print(f"  transport={transport}: a Ray step {1e3 * step:.3f} ms, so Ray adds "
                  f"{1e3 * (step - local):.3f} ms{target}")

        # 2. examples per second against the single process and PyTorch DDP, chunks of half the mini-batch
        print(f"\n{SIZES} float64, chunk_size = half the mini-batch, transport=auto (compiled here): examples per "
              "second; DDP: PyTorch DistributedDataParallel, gloo, 2 ranks of one thread")
        header = ("mini-batch", "local 1 thread", "local 2 threads", "Ray 1 worker", "Ray 2 workers", "DDP 2 ranks",
                  "Ray 2 / DDP", "Ray 2 / local 2")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for batch_size in BATCHES:
            chunk, steps = math.ceil(batch_size / 2), STEPS[batch_size]
            seconds = [seconds_per_step(backend, net.copy(), x, labels, batch_size, steps)
                       for backend in (LocalBackend(chunk, 1), LocalBackend(chunk, 2), RayBackend(1, chunk),
                                       RayBackend(2, chunk))]
            rates = [batch_size / s for s in seconds]
            ddp_rate = batch_size / ddp_s[batch_size] if ddp_s[batch_size] else None
            row = [f"{batch_size:,}", *(f"{r:,.0f}" for r in rates), "n/a" if ddp_rate is None else f"{ddp_rate:,.0f}",
                   "n/a" if ddp_rate is None else f"{rates[3] / ddp_rate:.2f}×", f"{rates[3] / rates[1]:.2f}×"]
            print("| " + " | ".join(row) + " |", flush=True)
        if ddp and ddp_s[10] is None:
            print("(PyTorch is not installed: `pip install torch==2.13.0` adds the DDP column)")
        print("targets: Ray 2 workers >= DDP at 100, 1,000 and 10,000; >= 0.6× local 2 threads at 1,000 and "
              ">= 0.9× at 10,000")

        # 3. where a step's time goes, 2 workers
        print(f"\n{SIZES}, 2 workers: where a step goes, medians in ms (driver = copying the chunk sums in, "
              "adding them and updating; transport = sending, waiting and receiving beyond the workers' compute)")
        print("| transport | mini-batch | step | workers' compute | driver: copy in | driver: add + update "
              "| transport |")
        print("|---|---|---|---|---|---|---|")
        for transport in ("compiled", "tasks"):
            for batch_size in BATCHES:
                p = driver_profile(net.copy(), x, labels, batch_size, STEPS[batch_size] // 2, transport)
                print(f"| {transport} | {batch_size:,} | {1e3 * p['step']:.3f} | {1e3 * p['workers']:.3f} | "
                      f"{1e3 * p['copy']:.3f} | {1e3 * p['add+update']:.3f} | {1e3 * p['transport']:.3f} |",
                      flush=True)

        # 4. scaling from 1 to 2 workers on a larger network
        big = Network.create([784, 100, 10], seed=0)
        one, two = (seconds_per_step(RayBackend(w, 2500), big.copy(), x, labels, 10_000, 6) for w in (1, 2))
        print(f"\n[784, 100, 10], mini-batch 10,000 in chunks of 2,500: Ray 1 worker {10_000 / one:,.0f} examples/s, "
              f"2 workers {10_000 / two:,.0f}: {one / two:.2f}× (target at least 1.6×)")
    finally:
        ray.shutdown()


def step_times_on_this_cluster() -> None:
    """Run by a driver inside a cluster (RAY_ADDRESS set): one worker per node, each transport."""
    import ray

    from core import Network
    from jobs.data import synthetic

    ray.init(logging_level="ERROR", log_to_driver=False)
    nodes = sum(n["Alive"] for n in ray.nodes())
    x, labels = synthetic(20_000, 784, 10)
    net = Network.create(SIZES, seed=0)
    ray.shutdown()
    for transport in ("auto", "compiled", "tasks"):
        for batch_size in (10, 1_000, 10_000):
            backend = RayBackend(nodes, math.ceil(batch_size / nodes), transport=transport)
            s = seconds_per_step(backend, net.copy(), x, labels, batch_size, STEPS[batch_size] // 4)
            print(f"| {nodes} | {transport} ({backend.transport}) | {batch_size:,} | {1e3 * s:.2f} | "
                  f"{batch_size / s:,.0f} |", flush=True)


def model_figures(with_nodes: bool = True) -> None:
    """The cost model's constants measured here, its predictions, and a check against 1 and 2 workers."""
    import ray

    from bench import cost_model, two_nodes
    from core import Network
    from jobs.backends import LocalBackend
    from jobs.data import synthetic

    print("\n## Toward many nodes: a cost model fitted to this machine (bench/cost_model.py)")
    across = None
    if with_nodes and two_nodes.available() is None:
        across = two_node_step()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _system_config=RAY_SYSTEM_CONFIG)
    try:
        x, labels = synthetic(50_000, 784, 10)
        per_example = {}
        for sizes in ((784, 30, 10), (784, 100, 10)):
            net = Network.create(list(sizes), seed=0)
            per_example[sizes] = seconds_per_step(LocalBackend(10_000, 1), net, x, labels, 10_000, 4) / 10_000
        net = Network.create(SIZES, seed=0)
        c = per_example[tuple(SIZES)]

        def overhead(workers: int, transport: str) -> float:  # a step at mini-batch 10 minus its compute
            backend = RayBackend(workers, math.ceil(10 / workers), transport=transport)
            return seconds_per_step(backend, net.copy(), x, labels, 10, STEPS[10]) - c * math.ceil(10 / workers)

        o1, o2 = overhead(1, "compiled"), overhead(2, "compiled")
        t1, t2 = overhead(1, "tasks"), overhead(2, "tasks")
        if across is None:
            print("(no two real nodes here: the overhead between nodes is taken as that of actor calls on one node)")
            across = t2
        else:
            across -= c * 5
            print(f"a step of 2 workers at mini-batch 10, less its compute: {1e3 * o2:.2f} ms on one node (compiled "
                  f"graph), {1e3 * t2:.2f} ms (actor calls); {1e3 * across:.2f} ms with one worker on each of two "
                  "real nodes (auto: actor calls)")
        profile = driver_profile(net.copy(), x, labels, 10_000, 4, "compiled")
        per_param = (profile["copy"] + profile["add+update"]) / (2 * net.params.size)
        k = cost_model.Constants(per_example, a=o1, b=o2 - o1, across=across, b_across=t2 - t1, per_param=per_param)
        cost_model.print_model(k)
        print("\ncheck on this machine (one node, W workers sharing its 2 cores): examples per second")
        print("| W | mini-batch | measured | model |")
        print("|---|---|---|---|")
        for w in (1, 2):
            for m in (1_000, 10_000):
                measured = m / seconds_per_step(RayBackend(w, math.ceil(m / w)), net.copy(), x, labels, m, STEPS[m])
                model = m / cost_model.step_seconds(k, tuple(SIZES), w, m, bandwidth=None)
                print(f"| {w} | {m:,} | {measured:,.0f} | {model:,.0f} |", flush=True)
    finally:
        ray.shutdown()


def two_node_step() -> float:
    """Seconds a step of 2 workers at mini-batch 10 takes with one on each of two real nodes (auto)."""
    import json
    import sys
    import tempfile
    from pathlib import Path

    from bench import two_nodes

    code = ("import json; from bench.ray_bench import *; from core import Network; from jobs.data import synthetic; "
            "x, y = synthetic(20_000, 784, 10); "
            "print(json.dumps(seconds_per_step(RayBackend(2, 5), Network.create(SIZES, seed=0), x, y, 10, 400)))")
    root = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as folder, two_nodes.two_nodes(Path(folder)) as nodes:
        proc = nodes.run([sys.executable, "-c", code], capture_output=True, text=True, env_extra={"PYTHONPATH": root})
    if proc.returncode != 0:
        raise RuntimeError(f"the two-node driver failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nodes_figures() -> None:
    """Step times with one worker on each of two real nodes, every transport."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from bench import two_nodes

    print("\n## Two real nodes (network namespaces joined by a veth pair, one worker of 1 CPU on each)")
    if why := two_nodes.available():
        print(f"skipped: {why}")
        return
    print("| nodes | transport (in use) | mini-batch | ms a step | examples/s |")
    print("|---|---|---|---|---|", flush=True)
    root = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as folder, two_nodes.two_nodes(Path(folder)) as nodes:
        proc = nodes.run([sys.executable, "-c", "from bench.ray_bench import step_times_on_this_cluster as f; f()"],
                         stdout=None, stderr=subprocess.DEVNULL, env_extra={"PYTHONPATH": root})
    if proc.returncode != 0:
        print(f"the two-node driver failed (status {proc.returncode})")
