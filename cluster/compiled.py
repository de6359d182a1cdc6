"""The compiled transport of ``cluster.driver.RayBackend``: a Ray Compiled Graph over the workers (they wait
on shared-memory channels; a step is one write and one read, 0.1–0.3 ms on one node), chosen where it
works, torn down (in bounded time) where it stops working, the job then going on with the tasks transport.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from cluster.connect import graph_failed
from cluster.errors import ClusterError
from core.network import Network
from jobs.errors import first_line

# Ray 2.60 workaround: below this expected wait (seconds), the driver reads a compiled graph's result at once
SPIN_FREE_WAIT = 5e-4
# Seconds a compiled graph's teardown may take before the driver goes on without it
TEARDOWN_SECONDS = 30.0


class CompiledTransport:
    """``RayBackend``'s methods for the compiled graph (``self._graph``), and the choice of a transport."""

    def _compile(self):
        from ray.dag import InputNode, MultiOutputNode

        shares = len(self.actors)
        with InputNode() as work:
            dag = MultiOutputNode([actor.chunk_sums.bind(work, k, shares) for k, actor in enumerate(self.actors)])
        return dag.experimental_compile()

    def _run_compiled(self, work: tuple) -> list:
        import ray

        started = time.perf_counter()
        timeout = self._step_timeout()
        try:
            ref = self._graph.execute(work)
            # Reading a compiled graph's result spins on a core: sleep through most of the workers'
            # expected compute first, or on a machine with a core per worker the driver takes one
            # of theirs (2 workers at mini-batch 10,000 on 2 cores: 37 ms a step, 21 ms with it).
            expected = self._per_example * (0 if work[1] is None else work[1].shape[0]) / len(self.actors)
            if expected > SPIN_FREE_WAIT:
                time.sleep(0.8 * expected)
            results = ray.get(ref, timeout=timeout)
        except Exception as error:
            # A worker died (the error names it, or only a channel it broke), a step took too long,
            # or the graph itself failed. A graph compiled again after a worker's death was seen to
            # hang two steps later (Ray 2.60), so the tasks transport carries the job on: it finds a
            # dead worker when it awaits its result, and replaces or covers it.
            from ray.exceptions import RayChannelTimeoutError

            cause = (f"a step took longer than {timeout:.0f} s" if isinstance(error, RayChannelTimeoutError)
                     else first_line(error, 160))
            self._teardown()
            self.transport = "tasks"
            self._tell(f"the compiled graph stopped: {cause}; the job goes on with transport=tasks, "
                       "with the same results")
            return self._run_tasks(work)
        self._record(time.perf_counter() - started)
        if work[5] == "train":  # a training step (diagnostics take the slower numpy path)
            rates = [seconds / sum(counts) for _, counts, _, seconds in results if sum(counts)]
            self._per_example = min(rates, default=self._per_example)
        return results

    def _choose_transport(self, network: Network) -> str:
        """``tasks`` when asked for; else the compiled graph, if it compiles and carries a first
        (empty) step. ``auto`` takes it only when every worker shares the driver's node: between
        two real nodes its steps measured slower than tasks' (4–11 ms against 2 ms at mini-batch
        10, 48–63 ms against 21 ms at 10,000), and on nodes simulated on one machine
        (``ray.cluster_utils.Cluster``) a second step hangs and takes the raylet down."""
        import ray

        if self.requested == "tasks":
            return "tasks"
        here = ray.get_runtime_context().get_node_id()
        if self.requested == "auto" and set(ray.get([a.node_id.remote() for a in self.actors])) != {here}:
            return "tasks"
        try:
            self._graph = self._compile()
            empty = np.zeros(0, np.int64)
            ray.get(self._graph.execute((network.params, empty, [], empty, None, "train")), timeout=30)
        except Exception as error:
            self._teardown()
            if self.requested == "compiled":
                self.close()
                raise ClusterError(f"transport=compiled does not work on this cluster ({first_line(error, 160)}); "
                                   "use transport=auto or transport=tasks") from None
            return "tasks"
        return "compiled"

    def _teardown(self, failed: bool = True) -> None:
        if self._graph is not None:
            if failed:
                graph_failed()
            graph, self._graph = self._graph, None
            if failed:  # Ray logs the dead worker's loop it cannot cancel, with tracebacks, from its threads too
                logging.getLogger("ray.dag.compiled_dag_node").setLevel(logging.CRITICAL)
            # Ray 2.60 workaround: teardown waits for every worker's loop to end, without a limit: a hung
            # worker would hang the driver here. Give it a bounded time in a thread of its own, then go on.
            thread = threading.Thread(target=_quietly, args=(graph.teardown,), daemon=True,
                                      name="gradavg-graph-teardown")
            thread.start()
            thread.join(min(TEARDOWN_SECONDS, max(self.step_floor, 1.0)))


def _quietly(action: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        action()
