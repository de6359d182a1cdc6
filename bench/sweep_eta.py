"""``python -m bench.sweep_eta``: the book's learning-rate experiment, as a sweep, drawn.

Runs ``gradavg sweep configs/sweep-eta.yaml`` into a temporary MLflow store, copies the parent
run's overlaid training-cost plot to bench/figures/sweep-eta.png, and prints what it shows.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from jobs.cli import main as gradavg
from jobs.runs import SWEEP_KEYS
from jobs.store import open_store
from jobs.sweep_run import latest_children

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gradavg-sweep-eta-") as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        code = gradavg(["sweep", str(ROOT / "configs" / "sweep-eta.yaml"), "--tracking-uri", uri])
        if code:
            return code
        client = open_store(uri, create=False)
        parent = client.search_runs([client.get_experiment_by_name("sweep-eta").experiment_id],
                                    filter_string=f"tags.{SWEEP_KEYS} = 'eta'")[0]
        for _, child in sorted(latest_children(client, parent.info.run_id).items()):
            costs = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "cost/train"),
                                             key=lambda m: m.step)]
            rises = sum(b > 1.1 * a for a, b in zip(costs, costs[1:]))
            print(f"eta={child.data.params['eta']:>5}: training cost {costs[0]:.3f} after epoch 1, "
                  f"{min(costs):.3f} at best, {costs[-1]:.3f} after epoch {len(costs)}; "
                  f"it rose by more than 10% in {rises} of {len(costs) - 1} epochs")
        plot = client.download_artifacts(parent.info.run_id, "plots/training_cost_curves.png", folder)
        out = ROOT / "bench" / "figures" / "sweep-eta.png"
        shutil.copy(plot, out)
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
