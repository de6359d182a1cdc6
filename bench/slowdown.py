"""``python -m bench.slowdown``: the two slowdown configs run, drawn side by side.

Writes bench/figures/slowdown.png from real runs of configs/slowdown-quadratic.yaml and
configs/slowdown-cross-entropy.yaml (no tracking), and prints the figures it shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jobs.config import load_config  # noqa: E402
from jobs.run import run_job  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    runs = {}
    for cost in ("quadratic", "cross-entropy"):
        cfg = load_config(ROOT / "configs" / f"slowdown-{cost}.yaml", ["track=false"])
        runs[cost] = run_job(cfg, quiet=True).state.history
    fig, (ax_grad, ax_cost, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    for cost, history in runs.items():
        epochs = [r.epoch for r in history]
        ax_grad.plot(epochs, [r.diagnostics["layer3/grad_w_norm"] for r in history], marker=".", label=cost)
        ax_cost.plot(epochs, [r.train_cost / history[0].train_cost for r in history], marker=".", label=cost)
        ax_acc.plot(epochs, [100 * r.test_accuracy for r in history], marker=".", label=cost)
        print(f"{cost:>13}: output layer ‖∂C/∂w‖ after epoch 1 {history[0].diagnostics['layer3/grad_w_norm']:.3g}, "
              f"saturated {100 * history[0].diagnostics['layer3/saturated_fraction']:.0f}%; training cost at epoch "
              f"{epochs[-1]} is {history[-1].train_cost / history[0].train_cost:.2f} of epoch 1's; "
              f"test accuracy {100 * history[-1].test_accuracy:.1f}%")
    ax_grad.set(yscale="log", xlabel="epoch", title="output layer ‖∂C/∂w³‖ (log scale)")
    ax_cost.set(xlabel="epoch", title="training cost, relative to epoch 1")
    ax_acc.set(xlabel="epoch", ylabel="%", title="test accuracy")
    for ax in (ax_grad, ax_cost, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("The same saturated start ([64, 30, 10], weights 3 × N(0, 1), η = 0.5), two costs")
    fig.tight_layout()
    out = ROOT / "bench" / "figures" / "slowdown.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
