"""PNG plots logged with each run, drawn with matplotlib's non-interactive backend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from jobs.text import percent  # noqa: E402

GRADIENT_NORMS_TITLE = r"$\|\partial C/\partial w^l\|$ per layer $l$"  # mathtext: drawn in any font


def _save(fig: Figure, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _epoch_axis(ax) -> None:
    """Epochs are whole numbers: no tick at 1.5."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def curves(history, path) -> None:
    _save(curves_figure(history), path)


def curves_figure(history) -> Figure:
    """Cost and accuracy (%, as logged) against epoch, training, validation and test side by side."""
    epochs = [r.epoch for r in history]
    fig, (ax_cost, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("train", "validation", "test"):
        costs = [getattr(r, f"{name}_cost") for r in history]
        if costs and costs[0] is not None:
            ax_cost.plot(epochs, costs, marker=".", label=name)
            ax_acc.plot(epochs, [getattr(r, f"{name}_accuracy") for r in history], marker=".", label=name)
    ax_cost.set(ylabel="mean cost C", title="cost")
    ax_acc.set(ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_cost, ax_acc):
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def confusion(labels: np.ndarray, predicted: np.ndarray, n_classes: int, path, title: str = "test set",
              counts: np.ndarray | None = None) -> None:
    """The confusion matrix of ``labels`` and ``predicted``, or of ``counts`` where given (counts[true, predicted])."""
    counts = confusion_matrix(labels, predicted, n_classes) if counts is None else counts
    fig, ax = plt.subplots(figsize=(6, 5.2))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    if n_classes <= 20:
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > counts.max() / 2 else "black")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix, {title} ({percent(accuracy):.1f}% correct)",
           xticks=range(n_classes), yticks=range(n_classes))
    _save(fig, path)


def per_layer(series: dict[str, list[tuple[int, float]]], path, title: str, ylabel: str, log: bool = False) -> None:
    _save(per_layer_figure(series, title, ylabel, log), path)


def per_layer_figure(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str,
                     log: bool = False) -> Figure:
    """One line per layer over training: ``series`` maps 'layer 2' to [(epoch, value), ...]."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in series.items():
        if points:
            epochs, values = zip(*sorted(points))
            ax.plot(epochs, values, marker=".", label=name)
    if log:
        ax.set_yscale("log")
    ax.set(ylabel=ylabel, title=title)
    _epoch_axis(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def misclassified(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, shape: tuple[int, int], path,
                  limit: int = 36) -> int:
    """A grid of test images the network got wrong, each titled 'true → predicted'. Returns how many."""
    wrong = np.flatnonzero(labels != predicted)[:limit]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong):
        ax.imshow(images[i].reshape(shape), cmap="gray_r")
        ax.set_title(f"{labels[i]} → {predicted[i]}", fontsize=9, color="firebrick")
    fig.suptitle("misclassified test images (true → predicted)" if len(wrong) else "no misclassified test images")
    _save(fig, path)
    return len(wrong)


def first_layer_weights(weights: np.ndarray, shape: tuple[int, int], path, limit: int = 40) -> None:
    """Each hidden neuron's incoming weights w^2_j drawn as an image: what it looks for."""
    shown = weights[:limit]
    cols = min(10, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, (ax, w) in enumerate(zip(axes.ravel(), shown)):
        bound = np.abs(w).max() or 1.0
        ax.imshow(w.reshape(shape), cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title(str(j), fontsize=7)
    fig.suptitle("first layer's weights, one image per hidden neuron (red +, blue −)")
    _save(fig, path)


def against_key(key: str, points: list[tuple], path) -> None:
    """A sweep's best validation accuracy of each trial against one swept key's value: on a log axis
    where the values are positive numbers spanning a factor of 20 or more, by category for text and lists."""
    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _ in points)
    if numeric:
        xs = [x for x, _ in points]
        ax.scatter(xs, [y for _, y in points])
        if xs and min(xs) > 0 and max(xs) >= 20 * min(xs):
            ax.set_xscale("log")
    else:
        names = sorted({str(x) for x, _ in points})
        ax.scatter([names.index(str(x)) for x, _ in points], [y for _, y in points])
        ax.set_xticks(range(len(names)), names)
    ax.set(xlabel=key, ylabel="best validation accuracy (%)", title=f"validation accuracy against {key}")
    ax.grid(alpha=0.3)
    _save(fig, path)


def overlaid(series: dict[str, list[tuple[int, float]]], ylabel: str, path) -> None:
    """One curve per trial of a sweep against epoch."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        ax.plot([e for e, _ in points], [v for _, v in points], marker=".", label=label)
    ax.set(ylabel=ylabel, title=f"{ylabel} of each trial")
    _epoch_axis(ax)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    _save(fig, path)
