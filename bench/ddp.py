"""The peer: PyTorch DistributedDataParallel on CPUs (gloo), the tool a user would otherwise pick
for synchronous data-parallel SGD. Optional: without PyTorch its figures are ``None``.

Two ranks of one thread each train the same model gradavg does ([784, 30, 10], sigmoid,
the quadratic cost, float64, η = 3.0), each on its half of every mini-batch, the rows
gathered from a shuffled order as gradavg gathers them; DDP averages the two halves'
gradients with an all-reduce.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, sizes: list[int], batch_size: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from jobs.data import synthetic

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(n_in, n_out), torch.nn.Sigmoid()]
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers).double())
        optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
        x_np, y_np = synthetic(50_000, sizes[0], sizes[-1])
        x = torch.from_numpy(x_np)
        y = torch.nn.functional.one_hot(torch.from_numpy(y_np), sizes[-1]).double()
        order = torch.from_numpy(__import__("numpy").random.default_rng(1).permutation(x.shape[0]))
        half = batch_size // world
        times = []
        for step in range(3 + steps):
            lo = (step * batch_size) % (x.shape[0] - batch_size) + rank * half
            rows = order[lo : lo + half]
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            # the book's C = (1/2n) Σ ‖y − a‖²: each rank's mean over its half, averaged by the all-reduce
            loss = 0.5 * ((model(x[rows]) - y[rows]) ** 2).sum() / half
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        if rank == 0:
            with open(out, "w") as f:
                f.write(str(statistics.median(times[3:])))
        dist.barrier()  # neither rank leaves the group while the other still uses it
    finally:
        dist.destroy_process_group()


def ddp_seconds_per_step(sizes: list[int], batch_size: int, steps: int, world: int = 2) -> float | None:
    """Median seconds of a DDP step over ``steps`` (after 3 untimed), or None without PyTorch."""
    try:
        import torch.multiprocessing as mp
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "seconds")
        for attempt in range(3):  # a rank that aborts as it meets the other (gloo, rarely) is run again
            try:
                mp.spawn(_rank, args=(world, _free_port(), sizes, batch_size, steps, out), nprocs=world, join=True)
                break
            except mp.ProcessExitedException:
                if attempt == 2:
                    raise
        with open(out) as f:
            return float(f.read())
