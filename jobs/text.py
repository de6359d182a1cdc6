"""How numbers read in what a person reads: the terminal, the MLflow UI, plots, tables and tags.

This module imports nothing of the project's: every module can import it.
"""

from __future__ import annotations


def percent(fraction: float) -> float:
    """An accuracy as a person reads it, everywhere: a percentage. The one place a fraction becomes one,
    so that a value logged and a value compared (a sweep's scheduler, a resumed sweep) are the same bits."""
    return 100 * fraction


def accuracies(test: float, validation: float | None, kept_epoch: int | None = None) -> str:
    """How a run's result reads, before "after N epochs": its test and validation accuracy (fractions), and the
    epoch whose weights they are where ``keep=best`` kept an earlier one than the last."""
    text = f"test accuracy {percent(test):.2f}%"
    text += "" if validation is None else f", validation {percent(validation):.2f}%"
    return text + (f" with the weights of epoch {kept_epoch} (keep=best: its best validation accuracy),"
                   if kept_epoch is not None else "")


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1: "1 epoch", "30 epochs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
