"""How a process joins Ray and leaves it: the cluster ``RAY_ADDRESS`` names, or an embedded local one,
and the exit of a process whose compiled graph failed.

``ray.init()`` is given no address when ``RAY_ADDRESS`` is set (``ray job submit`` sets it), so that
variable decides the cluster; with none, ``address="local"`` starts an embedded cluster on 127.0.0.1,
never one a ``ray start`` elsewhere on this machine left behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading

from cluster import RAY_SYSTEM_CONFIG, ray_settings
from cluster.auth import ensure_token
from cluster.errors import ClusterError
from jobs.errors import first_line

ray_settings()  # before any function here imports Ray

_graph_failed = False  # a compiled graph of this process failed (a worker or a node lost while it ran)


def graph_failed() -> None:
    """A compiled graph of this process failed: ``end_process`` skips the interpreter's shutdown."""
    global _graph_failed
    _graph_failed = True


def end_process(code: int):
    """Exit with ``code``. Ray 2.60 workaround: after a compiled graph failed, Ray can crash the process
    while the interpreter shuts down (a segmentation fault, after every result was saved and Ray itself
    was shut down); such a process skips that shutdown: its output is flushed, then it exits."""
    if _graph_failed:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def connect(cpus_needed: float) -> bool:
    """Join the cluster that RAY_ADDRESS names, or start a local one. True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    with keeping_sigterm_handler():
        _init(cpus_needed)
    return True


@contextlib.contextmanager
def keeping_sigterm_handler():
    """``ray.init`` replaces the SIGTERM handler with ``sys.exit`` (Ray 2.60); keep the caller's own, and its
    SIGHUP and SIGINT handlers too."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)} if main else {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)


def _init(cpus_needed: float) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        _check_reachable(os.environ["RAY_ADDRESS"])
        try:
            ray.init(logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot connect to the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']} "
                               f"({first_line(e)}); check that it runs (`ray status`) or unset "
                               "RAY_ADDRESS to start a local one") from None
    else:
        cores = os.cpu_count() or 1
        if cpus_needed > cores:  # an embedded cluster would offer them anyway, and start more processes than cores
            raise ClusterError(f"the workers need {cpus_needed:g} CPUs (workers × num_cpus) but this machine has "
                               f"{cores} cores, all that a local Ray cluster offers; lower workers or num_cpus, or "
                               "submit the job to a larger cluster (gradavg submit)")
        ensure_token()  # mode 0600: ray.init would write one every user can read
        # "local": a new embedded cluster, never one a `ray start` elsewhere on this machine left behind
        ray.init(address="local", num_cpus=max(1, math.ceil(cpus_needed)), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False, _system_config=RAY_SYSTEM_CONFIG)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray waits a long time for an address that does not answer; a plain connect fails fast."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"RAY_ADDRESS={address}: write HOST:PORT (the head's GCS port, 6379 by default)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e.strerror or e}); check "
                           "that it runs (`ray status`) or unset RAY_ADDRESS to start a local one") from None
