"""How numbers read in what a person reads: the terminal, the MLflow UI, plots, tables and tags.

This module imports nothing of the project's: every module can import it.
"""

from __future__ import annotations


def percent(fraction: float) -> float:
    """An accuracy as a person reads it, everywhere: a percentage. The one place a fraction becomes one,
    so that a value logged and a value compared (a sweep's scheduler, a resumed sweep) are the same bits."""
    return 100 * fraction


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1: "1 epoch", "30 epochs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
