"""Two real Ray nodes on one machine: each in a network namespace of its own, joined by a veth pair.

Each node has its own address and their traffic crosses TCP between them, as on a real
cluster (``ray.cluster_utils.Cluster`` puts every node on one address instead). Both still
share this machine's disk and shared memory. Needs root and ``ip`` (iproute2); traffic
stays inside the two namespaces made here, which are deleted on the way out.

Used by the multi-node tests and by ``python -m bench --only nodes``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import RAY_SYSTEM_CONFIG

HEAD_IP, WORKER_IP, PORT = "10.231.0.1", "10.231.0.2", 6379


def available() -> str | None:
    """Why two namespaced nodes cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need `ip` (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"`ip netns` fails here ({probe.stderr.strip()})"


@dataclass
class Nodes:
    head_ns: str
    worker_ns: str
    folder: Path
    head: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    address: str = f"{HEAD_IP}:{PORT}"

    def env(self) -> dict[str, str]:
        """The environment of a process that runs inside the head's namespace: the nodes' addresses
        are the namespaces' own, so Ray must not be kept on loopback there."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))
        return env

    def run(self, args: list[str], env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run a command in the head's namespace, with RAY_ADDRESS naming the head: a driver there
        sees both nodes."""
        env = {**self.env(), "RAY_ADDRESS": self.address, **(env_extra or {})}
        return subprocess.run(["ip", "netns", "exec", self.head_ns, *args], env=env, **kwargs)

    def start_worker_node(self, timeout: float = 120) -> None:
        """The second node joins the head (again, after it was stopped or lost)."""
        if self.worker is not None:
            _stop(self.worker)
        # a node lost a moment ago still counts as alive until the head notices: wait for a new one
        before = set(_alive_nodes(self) or {}) if self.worker is not None else set()
        self.worker = _ray_start(self.worker_ns, self.folder / "worker.log", self.env(), "--address",
                                 self.address, "--node-ip-address", WORKER_IP)
        _wait_for_new_worker(self, before, timeout)


def kill_everything_in(ns: str) -> None:
    """SIGKILL every process in namespace ``ns``: a node lost outright (its raylet, object store
    and workers; Ray starts workers in process groups of their own)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Signal the leader of ``ray start --block``'s group so Ray stops in order; then the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _ray_start(ns: str, log: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with open(log, "wb") as out:
        return subprocess.Popen(["ip", "netns", "exec", ns, ray_cli, "start", "--block", "--disable-usage-stats",
                                 "--num-cpus", "1", "--object-store-memory", str(200 * 1024**2), *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _alive_nodes(nodes: Nodes) -> dict[str, str] | None:
    """Node id -> IP of every node the head counts as alive; None while the head does not answer."""
    code = ("import json, ray; ray.init(logging_level='ERROR'); "
            "print(json.dumps({n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}))")
    proc = nodes.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    # Ray may print warnings of its own after the line (a raylet's lagging heartbeats on a busy machine)
    found = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(found[-1]) if found else None


def _wait_for_new_worker(nodes: Nodes, before: set[str], timeout: float) -> None:
    """Until exactly two nodes are alive: the head and a worker node that is not one of ``before``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in (nodes.head, nodes.worker):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"a Ray node exited early (status {proc.returncode})")
        alive = _alive_nodes(nodes) or {}
        workers = {node for node, ip in alive.items() if ip == WORKER_IP}
        if len(alive) == 2 and len(workers) == 1 and not workers & before:
            return
        time.sleep(1)
    raise RuntimeError(f"the two Ray nodes did not both come up within {timeout:.0f} s")


@contextlib.contextmanager
def two_nodes(folder: Path, timeout: float = 120):
    """A Ray head in one new namespace and a worker node in another, 1 CPU each; gone afterwards."""
    from cluster.auth import ensure_token

    ensure_token()  # `ray start` does not write the token that token authentication needs
    tag = f"{os.getpid() % 100000}"
    head_ns, worker_ns = f"gradavg-a{tag}", f"gradavg-b{tag}"
    veth_a, veth_b = f"gva{tag}", f"gvb{tag}"
    made: list[str] = []
    try:
        for ns in (head_ns, worker_ns):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
        _sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        for ns, veth, ip in ((head_ns, veth_a, HEAD_IP), (worker_ns, veth_b, WORKER_IP)):
            _sh("ip", "link", "set", veth, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
            _sh("ip", "-n", ns, "link", "set", veth, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        nodes = Nodes(head_ns, worker_ns, folder)
        nodes.head = _ray_start(head_ns, folder / "head.log", nodes.env(), "--head", "--node-ip-address", HEAD_IP,
                                "--port", str(PORT), "--include-dashboard", "false",
                                "--system-config", json.dumps(RAY_SYSTEM_CONFIG))
        try:  # the worker node joins as soon as the head's GCS answers (ray start retries until then)
            nodes.start_worker_node(timeout)
            yield nodes
        finally:
            if nodes.worker is not None:
                _stop(nodes.worker)  # the worker node first, then the head
            _stop(nodes.head)
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
