"""PNG plots logged with each run, drawn with matplotlib's non-interactive backend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(history, path) -> None:
    """Cost and accuracy against epoch, training, validation and test side by side."""
    epochs = [r.epoch for r in history]
    fig, (ax_cost, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("train", "validation", "test"):
        costs = [getattr(r, f"{name}_cost") for r in history]
        if costs and costs[0] is not None:
            ax_cost.plot(epochs, costs, marker=".", label=name)
            ax_acc.plot(epochs, [100 * getattr(r, f"{name}_accuracy") for r in history], marker=".", label=name)
    ax_cost.set(xlabel="epoch", ylabel="mean cost C", title="cost")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_cost, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def confusion(labels: np.ndarray, predicted: np.ndarray, n_classes: int, path, title: str = "test set") -> None:
    counts = confusion_matrix(labels, predicted, n_classes)
    fig, ax = plt.subplots(figsize=(6, 5.2))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    if n_classes <= 20:
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > counts.max() / 2 else "black")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix, {title} ({100 * accuracy:.1f}% correct)",
           xticks=range(n_classes), yticks=range(n_classes))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
