"""A run has at most one driver: the process that trains it (or drives a sweep) claims it with tags
(named in ``jobs.runs``) as it reopens the run (``take``); ``repair`` ends the runs whose driver is gone.

MLflow has no compare-and-set, so a claim is a write read back: a driver that resumes a run
(1) refuses if the run is RUNNING under a live claim of another process, (2) writes its own claim
(host, pid, the pid's start time, a random token) and marks the run RUNNING, (3) waits
``SETTLE_SECONDS``, (4) reads the claim back and refuses unless it is still its own. Two drivers
that write within ``SETTLE_SECONDS`` of each other both read back the later one's claim, so exactly
one goes on; a driver that writes later than that reads the earlier claim in (1) and refuses. (The
time from a read in (1) to the write in (2) is one request, far below ``SETTLE_SECONDS``.)

A claim is live while its process is: on this host, its pid runs and started when the claim says
(a pid used again by another process is no driver); on another host, while its driver has been
seen (``driver_seen``, renewed every ``HEARTBEAT_SECONDS``: ``jobs.runs.renew_claim``) within
``STALE_SECONDS``.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

from jobs import runs
from jobs.errors import UserError
from jobs.runs import DRIVER_CLAIM, DRIVER_HOST, DRIVER_PID, DRIVER_SEEN, DRIVER_STARTED
from jobs.store import open_store

SETTLE_SECONDS = 1.0
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 300.0


class DriverConflict(UserError, RuntimeError):
    """Another live process drives the run; the message names it."""


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.Error, OSError):
        return None


def driver_tags(claim: bool = True) -> dict[str, str]:
    """Where this process runs (so that `gradavg runs repair` can tell a dead driver) and, with ``claim``,
    a claim of the run these tags go to."""
    tags = {DRIVER_HOST: socket.gethostname(), DRIVER_PID: str(os.getpid())}
    if claim:
        tags.update({DRIVER_STARTED: str(_process_started(os.getpid())), DRIVER_CLAIM: secrets.token_hex(8),
                     DRIVER_SEEN: str(int(time.time()))})
    return tags


def alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that ``tags`` name still runs: True, False, or None where this host cannot
    tell (another host's driver that sent no heartbeat)."""
    host, pid = tags.get(DRIVER_HOST), tags.get(DRIVER_PID, "")
    if host == socket.gethostname():
        if not pid.isdigit():
            return False
        started = _process_started(int(pid))
        if started is None:
            return False
        claimed = tags.get(DRIVER_STARTED, "None")
        return claimed == "None" or abs(float(claimed) - started) < 1.0
    seen = tags.get(DRIVER_SEEN, "")
    if not seen.isdigit():
        return None
    return time.time() - int(seen) < STALE_SECONDS


def live_driver(run) -> str | None:
    """The live driver of ``run`` other than this process, described, or None."""
    tags = run.data.tags
    if run.info.status != "RUNNING" or DRIVER_CLAIM not in tags:
        return None
    if tags.get(DRIVER_HOST) == socket.gethostname() and tags.get(DRIVER_PID) == str(os.getpid()):
        return None  # this process: a driver of an earlier attempt in it has ended
    if not alive(tags):
        return None
    seen = tags.get(DRIVER_SEEN, "")
    since = f", seen {int(time.time()) - int(seen)} s ago" if seen.isdigit() else ""
    return f"pid {tags.get(DRIVER_PID)} on {tags.get(DRIVER_HOST)}{since}"


def refuse_if_driven(run, what: str) -> None:
    """A DriverConflict when a live process other than this one drives ``run``."""
    if driver := live_driver(run):
        raise DriverConflict(f"{what}: its driver ({driver}) is still running; wait for it to end or stop it "
                             "(Ctrl-C, `gradavg jobs stop`, or kill that pid): a second driver would log every "
                             "step twice")


def take(client, run_id: str, what: str, tags: dict[str, str] | None = None) -> None:
    """Claim ``run_id`` for this process and reopen it (RUNNING), with ``tags`` besides; a DriverConflict when
    another live process drives it or claims it at the same moment."""
    refuse_if_driven(client.get_run(run_id), what)
    mine = driver_tags()
    runs.reopen(client, run_id, {**mine, **(tags or {})})
    time.sleep(SETTLE_SECONDS)
    now = client.get_run(run_id).data.tags
    if now.get(DRIVER_CLAIM) != mine[DRIVER_CLAIM]:
        raise DriverConflict(f"{what}: another driver (pid {now.get(DRIVER_PID)} on {now.get(DRIVER_HOST)}) took this "
                             "run at the same moment, and drives it; this one stops")


def repair(uri: str, run_ids: list[str] | None = None) -> list[tuple[str, str]]:
    """End RUNNING runs whose driver is gone as KILLED; return (run id, what was done)."""
    client = open_store(uri, create=False)
    if run_ids:
        found = [runs.get_run(client, r, uri, "gradavg runs repair") for r in run_ids]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'") if ids else []
    done = []
    for run in found:
        if run.info.status != "RUNNING":
            done.append((run.info.run_id, f"left as {run.info.status}"))
            continue
        tags = run.data.tags
        host, pid, live = tags.get(DRIVER_HOST), tags.get(DRIVER_PID), alive(tags)
        if live and host == socket.gethostname():
            done.append((run.info.run_id, f"left RUNNING: its driver (pid {pid}) is still running"))
        elif host != socket.gethostname() and not run_ids:
            done.append((run.info.run_id, f"left RUNNING: its driver ran on {host}; name the run to end it"))
        elif live:  # named, on another host, heard from lately
            done.append((run.info.run_id, f"left RUNNING: its driver (pid {pid} on {host}) was seen within "
                                          f"{STALE_SECONDS:.0f} s"))
        else:
            runs.close(client, run.info.run_id, "KILLED")
            done.append((run.info.run_id, "ended KILLED (its driver is gone)"))
    return done
