"""How a job is stopped: the signals that stop it as Ctrl-C does, and the flag that says it is stopping.

A leaf: the training loop, the job and the sweep's trials read ``STOPPING``; the commands that run jobs
install the handler (``stop_on_signals``).
"""

from __future__ import annotations

import signal
import threading

# Set when this process is being stopped (SIGTERM, SIGHUP, a cancelled Ray task): a job that then fails, because
# a library turned the interrupt into an error of its own, ends its run KILLED as a stopped job does.
STOPPING = threading.Event()

# Signals that stop a job as Ctrl-C does, its run ending KILLED: a stopped job (SIGTERM), a closed terminal or
# a dropped ssh session (SIGHUP).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """From now on, a stop signal interrupts this process as Ctrl-C does (``STOP_SIGNALS``)."""
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)


def default_stop_signals() -> None:
    """Every run has ended: a stop signal has nothing left to close."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)


def _on_stop_signal(signum, frame):
    STOPPING.set()
    raise KeyboardInterrupt
