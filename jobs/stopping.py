"""How a job is stopped: the signals that stop it as Ctrl-C does, and the flag that says it is stopping.

A leaf: the training loop, the job and the sweep's trials read ``STOPPING``; the commands that run jobs
install its handler (``stop_on_signals``), a sweep's trial its own (``stop_once_on_signals``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

# Set when this process is being stopped (SIGTERM, SIGHUP, a cancelled Ray task): a job that then fails, because
# a library turned the interrupt into an error of its own, ends its run KILLED as a stopped job does.
STOPPING = threading.Event()

# Signals that stop a job as Ctrl-C does, its run ending KILLED: a stopped job (SIGTERM), a closed terminal or
# a dropped ssh session (SIGHUP).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# Signals this process was started with ignored, which stay ignored, as whoever started it asked: `nohup`
# ignores SIGHUP (a run that outlives its terminal), a shell ignores SIGINT for `command &` in a script.
IGNORED_AT_START = frozenset(s for s in (signal.SIGINT, *STOP_SIGNALS) if signal.getsignal(s) == signal.SIG_IGN)


def stop_on_signals() -> None:
    """From now on, Ctrl-C or a stop signal (``STOP_SIGNALS``) interrupts this process and marks it stopping."""
    for s in _handled((signal.SIGINT, *STOP_SIGNALS)):
        signal.signal(s, _on_stop_signal)
    sys.unraisablehook = _quiet_interrupts


def default_stop_signals() -> None:
    """Every run has ended: a stop signal has nothing left to close."""
    for s in _handled((signal.SIGINT, *STOP_SIGNALS)):
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)


def ignore_stop_signals() -> None:
    """The command is done and its exit status known: a stop from now on would only change that status."""
    for s in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(s, signal.SIG_IGN)


def _handled(signals: tuple) -> list:
    """Of ``signals``, those this process may handle: not those it was started with ignored."""
    return [s for s in signals if s not in IGNORED_AT_START]


def raise_if_stopping() -> None:
    """A stop whose interrupt something swallowed (a finalizer, where Python only prints it; a library) stops
    the job here."""
    if STOPPING.is_set():
        raise KeyboardInterrupt


def exit_status() -> int:
    """A stopped command's exit status, as a shell gives a process a signal ended: 128 + the signal's number
    (Ctrl-C's SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    return 128 + (_stopped_by[0] if _stopped_by else signal.SIGINT)


_stopped_by: list[int] = []  # the signal that stopped this process first


def reset() -> None:
    """Not stopping (again): for a process that runs one job after another in it (a test session, a notebook)."""
    STOPPING.clear()
    _stopped_by.clear()


def _stopping(signum: int) -> None:
    if not STOPPING.is_set():
        _stopped_by[:] = [signum]
    STOPPING.set()


def _quiet_interrupts(unraisable) -> None:
    """An interrupt raised inside a finalizer is printed by Python as a traceback, then dropped: drop it
    quietly (``STOPPING`` stays set, so the job stops at its next check, ``raise_if_stopping``)."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def stop_once_on_signals(signals: tuple = (signal.SIGINT, *STOP_SIGNALS), as_started: bool = True) -> None:
    """From now on, the first SIGINT or stop signal interrupts this process (a sweep's trial); later ones are
    ignored, the run closing.

    Not ``stop_on_signals``'s handler, which interrupts at every signal, on purpose: one stop of a sweep
    reaches a trial's process more than once (Ctrl-C's SIGINT reaches the whole process group, then the
    driver SIGTERMs each trial), and a second interrupt would cut the closing of its run short. ``as_started``:
    the signals this process was started with ignored stay so; not for a Ray task, which Ray cancels with SIGINT
    (``_thread.interrupt_main``, which does nothing where SIGINT is ignored)."""
    for s in _handled(signals) if as_started else signals:  # a Ray task: how Ray cancels it, whatever Ray ignored
        signal.signal(s, _interrupt_once)
    sys.unraisablehook = _quiet_interrupts


def _interrupt_once(signum, frame):
    if STOPPING.is_set():
        return
    _stopping(signum)
    raise KeyboardInterrupt


def _on_stop_signal(signum, frame):
    _stopping(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_deferred():
    """While a run is opened or claimed: a Ctrl-C or stop signal waits for the block to end, then interrupts as
    it would have. An interrupt inside the store's writes would leave a run in the store that its driver does not
    know it opened, so cannot close: RUNNING for good. The block is bounded (each request to a store is, see
    ``jobs.store.bound_requests``). Signals are only handled in the main thread, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, *STOP_SIGNALS)}
    caught: list[int] = []
    for s, handler in saved.items():
        if callable(handler):  # a signal ignored, or left to kill the process, stays so
            signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if caught:
            saved[caught[0]](caught[0], None)  # the handler's own interrupt, now that the run is known


@contextlib.contextmanager
def no_interrupts():
    """While a run is closed: a second Ctrl-C or stop signal there would leave it RUNNING (the close is
    bounded, as above). Main thread only, as above."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, *STOP_SIGNALS)}
    for s in saved:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


class Interrupted(KeyboardInterrupt):
    """An interrupt that says how to continue what it stopped (``hint``: a command to paste), or, with
    ``start_over``, that what it stopped starts over from the beginning (the command line says how)."""

    def __init__(self, hint: str, start_over: bool = False):
        super().__init__(hint)
        self.hint, self.start_over = hint, start_over
