"""A sweep's wall time against its trials one after another, on this machine and on Ray.

Four trials of mnist-5k, [784, 100, 10], 8 epochs each (η = 0.1, 0.3, 1, 3). Each way runs the
same plan into a new MLflow store: ``--at-once 1`` is the trials one after another; the default
runs as many at once as there are cores, one core (and one BLAS thread) each. The median
seconds of an epoch inside the trials show whether trials that share the machine slow each
other down.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from mlflow.tracking import MlflowClient

PLAN = ["data=mnist-5k", "validation_size=500", "sizes=[784,100,10]", "epochs=8", "diagnostics=false",
        "eta=0.1,0.3,1,3", "experiment=bench-sweep"]


def _sweep(at_once: int | None, on_ray: bool) -> tuple[float, float, int]:
    """Wall seconds of the sweep, the median epoch's seconds inside its trials, and how many ran at once."""
    import io

    from jobs.sweep import plan_from
    from jobs.sweep_run import latest_children, run_sweep, start

    with tempfile.TemporaryDirectory(prefix="gradavg-bench-sweep-") as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        plan = plan_from("-", PLAN, None)
        parent = start(plan, uri)
        started = time.perf_counter()
        run_sweep(plan, uri, parent, at_once, on_ray=on_ray, stream=io.StringIO())
        wall = time.perf_counter() - started
        client = MlflowClient(uri)
        epochs = [m.value for child in latest_children(client, parent).values()
                  for m in client.get_metric_history(child.info.run_id, "epoch_seconds")]
        at = at_once or 0
    return wall, statistics.median(epochs), at


def sweep_figures() -> None:
    import os

    cores = os.cpu_count() or 1
    print(f"\nsweep of 4 trials (mnist-5k, [784, 100, 10], 8 epochs each), {cores} cores:")
    print(f"{'where':<14} {'trials at once':>15} {'wall s':>8} {'s/epoch in a trial':>19} {'speed-up':>9}")
    for where, on_ray in (("this machine", False), ("Ray", True)):
        if on_ray:
            from cluster import ray_settings

            ray_settings()
            import ray

            ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False)
        try:
            one, epoch_one, _ = _sweep(1, on_ray)
            side, epoch_side, _ = _sweep(None, on_ray)
        finally:
            if on_ray:
                ray.shutdown()
        print(f"{where:<14} {1:>15} {one:>8.1f} {epoch_one:>19.3f}")
        print(f"{where:<14} {min(cores, 4):>15} {side:>8.1f} {epoch_side:>19.3f} {one / side:>8.2f}×")
