"""Ray figures: the overhead of a step against a bare actor round trip, scaling from 1 to 2
workers, and the mini-batch size from which 2 Ray workers beat the single process."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

import cluster  # noqa: F401  (Ray's loopback and auth settings; Ray reads them when it is imported)


def _steps_per_second(backend, network, x, labels, batch_size: int, steps: int) -> float:
    """Median seconds of one step (gradient sum and update), after one warm-up step."""
    from core import update_in_place

    backend.start(network, x, labels)
    try:
        rng = np.random.default_rng(0)
        scratch = np.empty_like(network.params)
        times = []
        for i in range(steps + 1):
            batch = rng.choice(x.shape[0], batch_size, replace=False)
            started = time.perf_counter()
            nabla, count = backend.gradient_sum(network, batch)
            update_in_place(network, nabla, count, 1e-3, scratch=scratch)
            if i:
                times.append(time.perf_counter() - started)
    finally:
        backend.close()
    return statistics.median(times)


def ray_figures() -> None:
    import ray

    from cluster.driver import RayBackend
    from cluster.worker import ShardWorker
    from core import Network
    from jobs.backends import LocalBackend
    from jobs.data import synthetic

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        x, labels = synthetic(50_000, 784, 10)
        print("\n## Ray on this machine (2 CPUs, local cluster)")

        # 1. the overhead of a step with a tiny mini-batch, against a bare round trip of the same bytes
        net = Network.create([784, 30, 10], seed=0)
        local = _steps_per_second(LocalBackend(10, threads=1), net.copy(), x, labels, 10, 300)
        ray_step = _steps_per_second(RayBackend(1, chunk_size=10), net.copy(), x, labels, 10, 300)
        actor = ray.remote(ShardWorker).options(num_cpus=1).remote(ray.put(x[:10]), ray.put(labels[:10]),
                                                                    net.sizes, net.cost, net.activation, 1)
        ray.get(actor.pid.remote())
        trips = []
        for _ in range(301):
            started = time.perf_counter()
            ray.get(actor.echo.remote(ray.put(net.params)))
            trips.append(time.perf_counter() - started)
        ray.kill(actor)
        bare = statistics.median(trips[1:])
        overhead = ray_step - local
        print(f"[784, 30, 10], mini-batch 10: Ray step {1e3 * ray_step:.2f} ms, the same step in one process "
              f"{1e3 * local:.2f} ms, so Ray adds {1e3 * overhead:.2f} ms; a bare actor round trip with the same "
              f"{net.params.nbytes / 1024:.0f} KiB each way {1e3 * bare:.2f} ms: overhead/round trip "
              f"{overhead / bare:.2f}× (target at most 1.5×)")

        # 2. scaling from 1 to 2 workers on a large mini-batch
        big = Network.create([784, 100, 10], seed=0)
        print("\n[784, 100, 10], chunk_size 2,500: examples per second")
        print("| mini-batch | Ray 1 worker | Ray 2 workers | 2 / 1 workers | local 1 thread | local 2 threads |")
        print("|---|---|---|---|---|---|")
        for batch_size in (10_000, 20_000):
            rates = [batch_size / _steps_per_second(backend, big.copy(), x, labels, batch_size, 8)
                     for backend in (RayBackend(1, 2500), RayBackend(2, 2500), LocalBackend(2500, 1),
                                     LocalBackend(2500, 2))]
            print(f"| {batch_size:,} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[1] / rates[0]:.2f}× "
                  f"(target ≥ 1.6×) | {rates[2]:,.0f} | {rates[3]:,.0f} |", flush=True)

        # 3. from which mini-batch 2 Ray workers beat the single process
        print("\n[784, 30, 10], chunk_size = half the mini-batch: examples per second, Ray 2 workers against "
              "the single process (2 threads)")
        print("| mini-batch | Ray 2 workers | local 2 threads | Ray / local |")
        print("|---|---|---|---|")
        crossover = None
        for batch_size in (100, 1_000, 5_000, 10_000, 20_000, 40_000):
            chunk = math.ceil(batch_size / 2)
            steps = 20 if batch_size <= 5_000 else 6
            ray_rate = batch_size / _steps_per_second(RayBackend(2, chunk), net.copy(), x, labels, batch_size, steps)
            local_rate = batch_size / _steps_per_second(LocalBackend(chunk, 2), net.copy(), x, labels, batch_size,
                                                        steps)
            print(f"| {batch_size:,} | {ray_rate:,.0f} | {local_rate:,.0f} | {ray_rate / local_rate:.2f}× |",
                  flush=True)
            if crossover is None and ray_rate > local_rate:
                crossover = batch_size
        if crossover:
            print(f"Ray with 2 workers beats the single process from a mini-batch of about {crossover:,}")
        else:
            print("Ray with 2 workers did not beat the single process at any mini-batch tried on this one "
                  "2-core machine: both use the same 2 cores, and Ray adds its round trips. Reach for Ray when "
                  "it brings more cores (more nodes) than one process has.")
    finally:
        ray.shutdown()
