"""Errors as the user sees them: what exit status each kind means, and an error's message on one line.

``gradavg`` exits 2 on a ``UserError`` (a config, a path, an unreachable server: the message says what
to change) and 1 on a ``JobFailed`` (the job ran and failed). Each module's errors subclass one of the
two, beside the builtin they always were (``ConfigError(UserError, ValueError)``), so ``jobs.cli``
maps an exception to its exit status by class.

This module imports nothing of the project's: every module, ``cluster``'s too, can import it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a config, a path, an unreachable server): exit status 2."""


class JobFailed(Exception):
    """The job ran and failed (it diverged, its workers kept dying, its store was lost): exit status 1."""


class UsageError(UserError):
    """A mistake on the command line that is not a config key's."""


def one_line(error: BaseException, limit: int = 2000) -> str:
    """An error's whole message on one line (a library's may span several), cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message, cut to ``limit`` characters; its type's name if it has none."""
    return _first(error)[:limit] or type(error).__name__


def reason(error: BaseException) -> str:
    """An error as one short line: its type and the first line of its message, cut at a word near
    300 characters."""
    first = _first(error)
    if not first:
        return type(error).__name__
    if len(first) > 300:
        first = first[:300].rsplit(" ", 1)[0] + " …"
    return f"{type(error).__name__}: {first}"


def _first(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
