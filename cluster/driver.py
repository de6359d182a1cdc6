"""The driver's side: start the workers, send each step's work, collect the chunk sums in order.

The cluster is joined (or an embedded one started) by ``cluster.connect``.

Two transports carry a step: ``compiled``, a Ray Compiled Graph (``cluster.compiled``: the workers
wait on shared-memory channels; a step is one write and one read, 0.1–0.3 ms on one node), and
``tasks``, one actor call per worker (a few ms). ``auto`` takes the compiled graph when every worker
shares the driver's node and the graph carries a first step, tasks otherwise. Both send the same work
to the same worker method and collect the same chunk sums, so the bits do not depend on the transport.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable

import numpy as np

from cluster import TRANSPORTS
from cluster.blocks import BlockError, Blocks, add_evaluation_rows, place
from cluster.compiled import CompiledTransport
from cluster.connect import connect
from cluster.errors import ClusterError, WorkerFailuresError
from cluster.worker import owners_in_order
from core.chunks import sum_rows
from core.diagnostics import add_with_stats
from core.kernels import add_and_update_rows
from core.network import Network
from core.plan import cut
from core.step import descend
from jobs.errors import first_line

# Seconds the workers may take to start (import numpy, numba and gradavg) before the job is given up
START_SECONDS = 180.0


class RayBackend(CompiledTransport):
    """Chunk sums computed by ``workers`` ShardWorker actors, carried by ``transport``.

    A worker that dies during a step (its process killed, its node lost, out of memory)
    is noticed when its result is awaited; its chunks are computed again by a new worker,
    or by the surviving ones when no new worker can be placed. The chunk sums, and so the
    weights, are the same bits as without the failure. More than ``max_worker_failures``
    failures in one job stop it with ``WorkerFailuresError``. Under the compiled transport,
    any failure (a dead worker, a channel that times out) tears the graph down first and the
    job goes on with the tasks transport, again with the same bits.
    """

    name = "ray"

    def __init__(self, workers: int, chunk_size: int, num_cpus: float = 1.0, max_worker_failures: int = 3,
                 on_failure: Callable[[str], None] | None = None, replace_timeout: float = 20.0,
                 transport: str = "auto", step_floor: float = 60.0):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport}: one of {', '.join(TRANSPORTS)}")
        self.workers, self.chunk_size, self.num_cpus = workers, chunk_size, num_cpus
        self.max_worker_failures = max_worker_failures
        self.on_failure, self.replace_timeout = on_failure, replace_timeout
        self.requested = transport
        self.transport: str | None = None  # the transport in use, once started
        self.failures = 0
        self.actors: list = []
        self.pids: list[int] = []  # the workers' process ids, in the order of self.actors
        self._graph = None  # the compiled graph over self.actors, while the compiled transport runs
        self._slowest = 0.0  # the slowest step so far: a step's results are awaited many times longer
        self._stepped = False  # a first step has ended (it loads the workers' kernels: not counted as slowest)
        self.step_floor = step_floor  # ... but never less than this, in seconds
        self._per_example = 0.0  # a worker's seconds per example in the last compiled step
        self._started_ray = False
        self.blocks: Blocks | None = None  # a sharded dataset's blocks (start), and each worker's share of them:
        self.placement: list[dict] = []  # per worker, per split, the BlockSpecs it holds
        self._in_order: dict[tuple[int, int], np.ndarray] = {}  # owners_in_order by (chunks, workers)

    @property
    def tags(self) -> dict[str, str]:
        return {"backend": self.name, "workers": str(self.workers), "transport": str(self.transport)}

    def start(self, network: Network, x: np.ndarray | None, labels: np.ndarray | None,
              blocks: Blocks | None = None) -> None:
        """Start the workers on the training set ``x``, ``labels`` (put in the object store once: the workers
        on a node share one copy), or on a sharded dataset's ``blocks``, which the workers read from their
        nodes' files (the driver reads none)."""
        import ray

        self._started_ray = connect(self.workers * self.num_cpus)
        available = ray.cluster_resources().get("CPU", 0)
        if self.workers * self.num_cpus > available:
            self.close()
            raise ClusterError(f"workers={self.workers} with num_cpus={self.num_cpus:g} need "
                               f"{self.workers * self.num_cpus:g} CPUs but the Ray cluster has {available:g}; "
                               "lower workers or num_cpus, or add nodes")
        self.blocks = blocks
        self._x_ref, self._labels_ref = (ray.put(x), ray.put(labels)) if blocks is None else (None, None)
        self._network_spec = (network.sizes, network.cost, network.activation)
        self._dtype = str(network.dtype)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        self.pids = self._started_workers()  # a busy compiled graph answers no other call: asked now
        if blocks is not None:
            self._place_blocks()
        self._sums = None  # the chunk sums' rows (core.chunks.sum_rows)
        self.transport = self._choose_transport(network)

    def _started_workers(self) -> list[int]:
        """The workers' process ids, once every worker has started; a cluster that cannot start them all (a node
        counted but lost, too little memory) is given up after ``START_SECONDS``, not waited on forever."""
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get([actor.pid.remote() for actor in self.actors], timeout=START_SECONDS)
        except GetTimeoutError:
            self.close()
            raise ClusterError(f"the {self.workers} Ray workers did not all start within {START_SECONDS:.0f} s; "
                               "check that the cluster's nodes are alive and have room for them (`ray status`)") \
                from None

    def _new_actor(self):
        import ray

        from cluster.worker import ShardWorker

        threads = max(1, int(self.num_cpus))
        return ray.remote(ShardWorker).options(num_cpus=self.num_cpus).remote(
            self._x_ref, self._labels_ref, *self._network_spec, threads, self._dtype)

    # ------------------------------------------------------------------ a sharded dataset's blocks

    def _place_blocks(self) -> None:
        """Give each worker its blocks (``place``: where its node can read them, evenly) and have it load them."""
        import ray

        every = [spec for specs in self.blocks.specs.values() for spec in specs]
        seen = ray.get([actor.missing.remote(every) for actor in self.actors])
        self.nodes = [node for node, _ in seen]
        try:
            self.placement = place(self.blocks, [set(gone) for _, gone in seen], self.nodes)
        except BlockError as e:
            self.close()
            raise ClusterError(str(e)) from None
        from ray.exceptions import RayActorError

        try:
            problems = ray.get([actor.load.remote(held) for actor, held in zip(self.actors, self.placement)])
        except RayActorError as error:
            self.close()
            raise ClusterError(f"a worker died while it loaded its blocks ({first_line(error, 160)}); a worker's "
                               "memory must hold its share: add workers or nodes (or, under shuffle=global, where "
                               "every worker holds every training block, train with shuffle=blocks)") from None
        problem = next((p for p in problems if p), None)
        if problem:
            self.close()
            raise ClusterError(problem)
        self._owner_of_blocks()

    def _owner_of_blocks(self) -> None:
        """Which worker computes on each block: the one it is placed on (a training block under
        ``shuffle=global`` is everywhere, and not looked up)."""
        self.owner = {spec.block: k for k, held in enumerate(self.placement) for split, specs in held.items()
                      for spec in specs if split != "train" or self.blocks.confined}

    def _owners(self, bounds: list, chunk_blocks) -> np.ndarray:
        if chunk_blocks is None:  # every worker holds every training row: consecutive groups, the same every step
            key = (len(bounds), len(self.actors))
            if key not in self._in_order:
                self._in_order[key] = owners_in_order(*key)
            return self._in_order[key]
        return np.array([self.owner[int(b)] for b in chunk_blocks], dtype=np.int64)

    def _cut(self, batch: np.ndarray) -> tuple[list, np.ndarray | None]:
        confined = self.blocks is not None and self.blocks.confined
        return cut(batch, self.chunk_size, self.blocks.offsets("train") if confined else None)

    # ------------------------------------------------------------------ what a step asks of the workers

    def chunk_sums(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int]:
        bounds, chunk_blocks = self._cut(batch)
        results = self._run((network.params, batch, bounds, self._owners(bounds, chunk_blocks), chunk_blocks, "train"))
        self._sums = sum_rows(self._sums, len(bounds), network)
        _, counts = self._gather(results, len(bounds), self._sums)
        return self._sums, sum(counts)

    def train_steps(self, network: Network, order: np.ndarray, first: int, last: int, batch_size: int,
                    eta: float, lmbda: float) -> None:
        descend(self.chunk_sums, network, order, first, last, batch_size, eta, lmbda, add_and_update_rows)

    def gradient_stats(self, network: Network, batch: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        bounds, chunk_blocks = self._cut(batch)
        work = (network.params, batch, bounds, self._owners(bounds, chunk_blocks), chunk_blocks, "stats")
        results = self._run(work)
        rows, counts = self._gather(results, len(bounds))
        stats = self._gather([(r[2], r[1], None, r[3]) for r in results], len(bounds))[0]
        return add_with_stats(list(zip(rows, counts)), list(stats))

    def batch_cost(self, network: Network, batch: np.ndarray) -> float:
        """The mean cost over a mini-batch of a sharded dataset: its chunks' cost sums, added in chunk order."""
        bounds, chunk_blocks = self._cut(batch)
        rows, _ = self._gather(self._run((network.params, batch, bounds, self._owners(bounds, chunk_blocks),
                                          chunk_blocks, "cost")), len(bounds))
        return add_evaluation_rows(rows, network.sizes[-1])[0]

    def evaluate(self, network: Network, split: str) -> tuple[float, float, np.ndarray]:
        """Mean cost, accuracy and confusion counts on a split of a sharded dataset, each worker evaluating
        the blocks placed on it, the rows added in block order."""
        specs = self.blocks.specs[split]
        ids = np.array([s.block for s in specs], dtype=np.int64)
        owners = (owners_in_order(len(ids), len(self.actors)) if split == "train" and not self.blocks.confined
                  else np.array([self.owner[int(b)] for b in ids], dtype=np.int64))
        rows, _ = self._gather(self._run((network.params, None, None, owners, ids, f"evaluate:{split}")), len(ids))
        return add_evaluation_rows(rows, network.sizes[-1])

    def _gather(self, results: list, n: int, out: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
        """Every share's rows put back in chunk order (share k computed the chunks ``owners == k``), into
        ``out`` where given, and each chunk's count."""
        owners = self._last_owners
        if out is None:
            width = next((r[0].shape[1] for r in results if r[0].ndim == 2 and r[0].shape[0]), 0)
            out = np.empty((n, width), dtype=next((r[0].dtype for r in results if r[0].size), np.float64))
        counts = [0] * n
        for k, (part, part_counts, _, _) in enumerate(results):
            if not len(part):
                continue
            where = np.flatnonzero(owners == k)
            if where[-1] - where[0] + 1 == where.size:  # consecutive chunks (every worker holds every row)
                out[where[0] : where[-1] + 1] = part
                counts[where[0] : where[-1] + 1] = part_counts
            else:
                out[where] = part
                for c, count in zip(where.tolist(), part_counts):
                    counts[c] = count
        return out, counts

    def _run(self, work: tuple) -> list:
        """Every share's (rows, counts, stats, seconds), in share order: one ``ShardWorker.chunk_sums`` a worker."""
        self._last_owners = work[3]
        if self.transport == "compiled":
            return self._run_compiled(work)
        return self._run_tasks(work)

    # ------------------------------------------------------------------ the tasks transport

    def _step_timeout(self) -> float:
        """How long a step's results are awaited: the first step compiles the workers' kernels (10 minutes);
        later ones 100 times the slowest step so far, at least ``step_floor``. A worker that has not answered
        by then is hung (stopped, swapping, its node unreachable) and is treated as dead."""
        return max(self.step_floor, 100 * self._slowest) if self._slowest else 600.0

    def _record(self, seconds: float) -> None:
        """A step's time, from the second step on: the first loads the workers' kernels, seconds that would
        make the bound 100 times too long."""
        if self._stepped:
            self._slowest = max(self._slowest, seconds)
        self._stepped = True

    def _run_tasks(self, work: tuple) -> list:
        import ray
        from ray.exceptions import RayActorError

        started, failures = time.perf_counter(), self.failures
        timeout = self._step_timeout()
        deadline = time.monotonic() + timeout
        shares = len(self.actors)
        pending = {actor.chunk_sums.remote(work, k, shares): (k, actor) for k, actor in enumerate(self.actors)}
        results: list = [None] * shares
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # every worker still computing has hung: it is given up, and its shares computed again
                for ref, (k, actor) in list(pending.items()):
                    del pending[ref]
                    ray.kill(actor)  # (a SIGKILL reaches a stopped process too)
                    actor = self._recover(actor, k, f"it did not answer within {timeout:.0f} s, and was given up")
                    pending[actor.chunk_sums.remote(work, k, shares)] = (k, actor)
                deadline = time.monotonic() + timeout
                continue
            k, actor = pending.pop(ready[0])
            try:
                results[k] = ray.get(ready[0])
            except RayActorError as error:
                actor = self._recover(actor, k, first_line(error, 160))
                pending[actor.chunk_sums.remote(work, k, shares)] = (k, actor)
        if self.failures == failures:  # a step that recovered a worker says nothing of the workers' speed
            self._record(time.perf_counter() - started)
        return results

    # ------------------------------------------------------------------ failures

    def _recover(self, dead, share: int, cause: str):
        """Worker ``dead`` died computing ``share``: count it (once, however many shares it had), then
        return the worker that computes the share again: a new one in its place, or a survivor."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        index = next((i for i, actor in enumerate(self.actors) if actor is dead), None)
        if index is None:  # already counted and replaced or dropped, for another of its shares
            if not self.actors:
                raise WorkerFailuresError(f"every Ray worker died and none could be placed again ({cause})")
            return self.actors[share % len(self.actors)]
        self.failures += 1
        if self.failures > self.max_worker_failures:
            raise WorkerFailuresError(f"Ray workers failed {self.failures} times, more than max_worker_failures="
                                      f"{self.max_worker_failures} (last: {cause})")
        replacement = self._new_actor()
        try:
            pid = ray.get(replacement.pid.remote(), timeout=self.replace_timeout)
        except (GetTimeoutError, RayActorError):
            ray.kill(replacement)
            del self.actors[index], self.pids[index]
            if not self.actors:
                raise WorkerFailuresError(f"every Ray worker died and none could be placed again ({cause})") from None
            survivor = share % len(self.actors)
            if self.blocks is not None:  # the survivor takes the dead worker's blocks over
                self._take_over(index, survivor if survivor < index else survivor + 1)
            self._tell(f"worker {index + 1} died ({cause}); no new worker could be placed, so the other "
                       f"{len(self.actors)} compute its chunks (failure {self.failures} of at most "
                       f"{self.max_worker_failures})")
            return self.actors[survivor]
        if self.blocks is not None:  # the new worker reads exactly the dead one's blocks
            try:
                self._load(replacement, self.placement[index])
            except RayActorError as error:
                raise WorkerFailuresError(f"the worker that replaced worker {index + 1} died while it loaded its "
                                          f"blocks ({first_line(error, 160)})") from None
        self.actors[index], self.pids[index] = replacement, pid
        self._tell(f"worker {index + 1} died ({cause}); a new worker computes its chunks again "
                   f"(failure {self.failures} of at most {self.max_worker_failures})")
        return replacement

    def _take_over(self, dead: int, survivor: int) -> None:
        """Worker ``survivor`` (an index before the dead one's removal) holds its own blocks and ``dead``'s."""
        from ray.exceptions import RayActorError

        held, gone = self.placement[survivor], self.placement[dead]
        merged = {split: held[split] + [s for s in gone[split] if s not in held[split]] for split in held}
        self.placement[survivor] = merged
        del self.placement[dead]
        self._owner_of_blocks()
        try:
            self._load(self.actors[survivor - (1 if survivor > dead else 0)], merged)
        except RayActorError:  # the survivor died too: found when its result is awaited, and its blocks passed on
            pass

    def _load(self, actor, held: dict) -> None:
        """Have ``actor`` hold the blocks ``held``; a block it cannot read stops the job, to be resumed."""
        import ray

        problem = ray.get(actor.load.remote(held), timeout=max(600.0, self.replace_timeout))
        if problem:
            raise WorkerFailuresError(f"{problem}; the job cannot go on without the block")

    def _tell(self, message: str) -> None:
        if self.on_failure is not None:
            self.on_failure(message)

    def close(self) -> None:
        import ray

        # Ray 2.60 workaround: an interrupt in a compiled graph's read leaves its channel buffers in the frames of the
        # exception's traceback; freed after ray.shutdown, they crash the process (a segmentation fault). Free
        # them now, while Ray still runs: the traceback keeps its lines, its finished frames lose their locals.
        in_flight = sys.exc_info()[1]
        if in_flight is not None and in_flight.__traceback__ is not None:
            traceback.clear_frames(in_flight.__traceback__)
        self._teardown(failed=False)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


