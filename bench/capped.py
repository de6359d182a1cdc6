"""Data larger than one node: a driver run in the head node's namespace (``bench.two_nodes``) that
trains a sharded dataset on one Ray worker per node, each worker's memory capped below the whole
training set but above its share, and saves the final weights.

The cap is a memory cgroup per worker process (cgroup v1 ``memory.limit_in_bytes``; cgroup v2
``memory.max`` where that is what the machine has), which the kernel enforces by killing the
process. A worker is put in its cgroup once it has started, before it is given its blocks, and a
kernel moves no memory a process already holds into a new cgroup: the cap counts what the worker
allocates from then on (its blocks, its buffers, the compiled kernels it loads), not the ~250 MiB
of Python, numpy and Ray it started with. A worker that outgrows it dies and the job stops
(``max_worker_failures=0``).

    python -m bench.capped FOLDER CAP_BYTES SHUFFLE OUT.npy

prints one JSON line: the workers' nodes, their caps, their peak memory and the job's outcome.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified")

OVERRIDES = ["sizes=[784,30,10]", "dtype=float32", "batch_size=1000", "chunk_size=500", "epochs=1", "eta=0.5",
             "track=false", "diagnostics=false", "log_every=100000", "max_worker_failures=0"]


def memory_root() -> Path:
    """Where the memory cgroups are: /sys/fs/cgroup/memory, or, inside ``ip netns exec`` (which mounts a
    sysfs of its own, without them), the same hierarchy mounted again in this process's mount namespace."""
    global V1
    if not (V1 / "memory.limit_in_bytes").exists() and not (V2 / "cgroup.controllers").exists():
        import subprocess
        import tempfile

        mounted = Path(tempfile.mkdtemp(prefix="gradavg-cgroup-"))
        subprocess.run(["mount", "-t", "cgroup", "-o", "memory", "none", str(mounted)], check=True,
                       capture_output=True)
        V1 = mounted
    return V1


def cgroups_available() -> str | None:
    """Why a process cannot be capped here, or None."""
    if os.geteuid() != 0:
        return "memory cgroups need root"
    if (V1 / "memory.limit_in_bytes").exists() or (V2 / "cgroup.controllers").exists() and \
            "memory" in (V2 / "cgroup.controllers").read_text():
        return None
    return "no memory cgroup controller is mounted"


def cap(pid: int, limit: int, name: str) -> Path:
    """Put process ``pid`` (its memory too) in a new memory cgroup of ``limit`` bytes; the cgroup's folder."""
    memory_root()
    if (V1 / "memory.limit_in_bytes").exists():
        group = V1 / name
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        (group / "cgroup.procs").write_text(str(pid))
        return group
    group = V2 / name
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(str(limit))
    (group / "cgroup.procs").write_text(str(pid))
    return group


def peak(group: Path) -> int:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if (group / name).exists():
            return int((group / name).read_text())
    return -1


def release(group: Path, seconds: float = 10.0) -> None:
    """Remove a cgroup once its process has ended (the job's workers end a moment after it closes)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            group.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                return  # still in use: an empty cgroup left behind holds no memory
            time.sleep(0.2)


def main() -> None:
    from cluster.connect import end_process
    from cluster.driver import RayBackend
    from jobs.config import load_config
    from jobs.data import load_dataset
    from jobs.train import train

    folder, limit, shuffle, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    groups: list[Path] = []

    class Capped(RayBackend):
        def _place_blocks(self):
            import time

            import ray

            started = time.perf_counter()

            self.nodes_of = ray.get([actor.node_id.remote() for actor in self.actors])
            for k, pid in enumerate(self.pids):
                groups.append(cap(pid, limit, f"gradavg-cap-{os.getpid()}-{k}"))
            super()._place_blocks()
            self.load_seconds = time.perf_counter() - started

        def close(self):
            self.peaks = [peak(g) for g in groups]
            super().close()

    cfg = load_config(None, [f"data={folder}", f"shuffle={shuffle}", *OVERRIDES])
    backend = Capped(2, cfg.chunk_size, max_worker_failures=0)
    report = {"cap": limit}
    try:
        state = train(cfg, load_dataset(folder, rows=False), backend)
        np.save(out, state.network.params)
        report.update(outcome="trained", test_accuracy=state.history[-1].test_accuracy,
                      rate=state.history[-1].examples_per_second, load=backend.load_seconds)
    except Exception as error:  # the worker killed at its cap: the outcome, not a crash of this driver
        report.update(outcome=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    report.update(peaks=getattr(backend, "peaks", []), nodes=len(set(getattr(backend, "nodes_of", []))))
    for group in groups:
        release(group)
    print(json.dumps(report))
    end_process(0)


if __name__ == "__main__":
    main()
