"""``gradavg cluster up|down``: a Ray head and an MLflow tracking server on 127.0.0.1.

For trying the whole path (submit, track, review) on one machine. Each server runs in a
process group of its own, recorded in ``STATE/cluster.json``; ``down`` signals exactly
those groups, never every Ray process on the machine (as ``ray stop`` would).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster import RAY_SYSTEM_CONFIG, ray_settings
from cluster.auth import ensure_token, read_token, token_warning
from jobs.errors import UserError
from jobs.store import free_port, program

ray_settings()  # Ray's loopback and auth settings, before Ray is imported or started here


class ClusterUpError(UserError, RuntimeError):
    """A server did not come up; the message says which and where its log is."""


@dataclass
class Servers:
    state_dir: str
    ray_pgid: int
    ray_port: int
    dashboard: str  # http://127.0.0.1:PORT, the address for `gradavg submit --address`
    mlflow_pgid: int
    tracking_uri: str  # http://127.0.0.1:PORT


def status_command(servers: Servers) -> str:
    """Ray's own `ray status` against this head, as it works: with the loopback setting (without it, Ray's CLI
    rewrites 127.0.0.1 to the machine's address, where the head does not listen) and its authentication."""
    return (f"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token {program('ray')} status "
            f"--address 127.0.0.1:{servers.ray_port}")


def _check_free(port: int, option: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ClusterUpError(f"port {port} is taken by another process; pass {option} PORT") from None


def _listens(pgid: int, port: int) -> bool:
    """Whether a process of group ``pgid`` listens on ``port``: a server that answers may be someone else's."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                                    for c in proc.net_connections("tcp")):
                return True
        except (psutil.Error, OSError):
            pass  # gone meanwhile, or not ours to look at
    return False


def _cli(name: str) -> str:
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


def _spawn(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # its own process group, for `down`


def up(state_dir: str | os.PathLike = ".gradavg", num_cpus: int | None = None, dashboard_port: int = 8265,
       mlflow_port: int = 5000, timeout: float = 180.0) -> Servers:
    state = Path(state_dir).resolve()
    if (state / "cluster.json").exists():
        raise ClusterUpError(f"{state / 'cluster.json'} exists: a cluster from here is up; "
                             "`gradavg cluster down` stops it first")
    _check_free(dashboard_port, "--dashboard-port")
    _check_free(mlflow_port, "--mlflow-port")
    _private_folder(state)
    ensure_token()
    if warning := token_warning():
        print(f"gradavg: warning: {warning}", file=sys.stderr)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # jobs find this python
    env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", "15")  # time for a stopped job to end its MLflow run
    ray_port, agent_port = free_port(), free_port()
    # Ray's other ports are fixed by default (the job agent's 52365, workers' 10002-19999): beside another Ray
    # the agent cannot listen and every submit fails. Ray picks the rest free itself; 0 lets workers do so too.
    # A Ray temporary folder of its own: Ray Jobs sends a job to the head named in the folder's
    # ray_current_cluster, which in the shared /tmp/ray is whichever head on the machine started last.
    # Short, under the system's temp folder: Ray's socket paths inside it must fit in 107 characters.
    ray_temp = Path(tempfile.gettempdir()) / f"gradavg-ray-{ray_port}"
    ray = _spawn([_cli("ray"), "start", "--head", "--block", "--port", str(ray_port), "--temp-dir", str(ray_temp),
                  "--node-ip-address",
                  "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                  "--dashboard-agent-listen-port", str(agent_port), "--min-worker-port", "0", "--max-worker-port", "0",
                  "--ray-client-server-port", str(free_port()), "--num-cpus", str(num_cpus or os.cpu_count() or 1),
                  "--disable-usage-stats", "--include-dashboard", "true",
                  # the inline limits the tasks transport wants (cluster.driver); compiled graphs need none
                  "--system-config", json.dumps(RAY_SYSTEM_CONFIG)], state / "ray.log", env)
    mlflow_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = _spawn([_cli("mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                     "--artifacts-destination", str(state / "mlartifacts")], state / "mlflow.log", mlflow_env)
    servers = Servers(str(state), ray.pid, ray_port, f"http://127.0.0.1:{dashboard_port}", mlflow.pid,
                      f"http://127.0.0.1:{mlflow_port}")
    (state / "cluster.json").write_text(json.dumps(asdict(servers), indent=2))
    try:
        _wait_healthy(ray, f"{servers.dashboard}/api/version", state / "ray.log", timeout,
                      "pass --dashboard-port PORT", auth=True)
        # the job agent runs every submitted job: a head without one refuses them all
        _wait_healthy(ray, f"http://127.0.0.1:{agent_port}/api/local_raylet_healthz", state / "ray.log", timeout,
                      "run `gradavg cluster up` again, which picks another", auth=True)
        _wait_healthy(mlflow, f"{servers.tracking_uri}/health", state / "mlflow.log", timeout,
                      "pass --mlflow-port PORT")
    except BaseException:
        down(state)
        raise
    return servers


def _private_folder(folder: Path) -> None:
    """The state folder holds the tracking store and the servers' logs: made its owner's alone (0700); a
    folder that exists is left as its owner set it, but the store in it is made 0600 (``private_file``)."""
    from jobs.store import private_file

    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_file(folder / "mlflow.db")
    except OSError as e:
        raise ClusterUpError(f"--state-dir {folder}: cannot be made ({e.strerror or e}); pass a folder you can "
                             "write") from None


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float, fix: str,
                  auth: bool = False) -> None:
    """Wait until ``url`` answers from a process of ``proc``'s group; another process on its port is an error."""
    headers = {"Authorization": f"Bearer {token}"} if auth and (token := read_token()) else {}
    port = urllib.parse.urlsplit(url).port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterUpError(f"{url.split('/')[2]} exited with status {proc.returncode} while starting; see {log}")
        if _accepts(port):
            if not _listens(proc.pid, port):  # asked second: a listener of ours does not stop listening
                raise ClusterUpError(f"port {port} is taken by another process; {fix}")
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.5)
    raise ClusterUpError(f"{url} did not answer within {timeout:.0f} s; see {log}")


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def down(state_dir: str | os.PathLike = ".gradavg", grace: float = 40.0) -> list[str]:
    """Stop the process groups ``up`` started; return what was stopped."""
    state = Path(state_dir).resolve()
    record = state / "cluster.json"
    if not record.exists():
        return []
    servers = Servers(**json.loads(record.read_text()))
    stopped = []
    if jobs := _stop_jobs(servers):
        stopped.append(f"{jobs} running job{'s' if jobs > 1 else ''} (each ends its run KILLED)")
    # Ray before MLflow: a job still closing its run needs the tracking server
    for name, pgid in (("Ray head", servers.ray_pgid), ("MLflow server", servers.mlflow_pgid)):
        if _stop_group(pgid, grace):
            stopped.append(name)
    shutil.rmtree(Path(tempfile.gettempdir()) / f"gradavg-ray-{servers.ray_port}", ignore_errors=True)
    record.unlink()
    return stopped


def _stop_jobs(servers: Servers, grace: float = 45.0) -> int:
    """Stop the head's running jobs and wait until each has ended (a gradavg job ends its run KILLED; it
    has 30 s for that, see ``jobs.submit.send``); return how many were stopped. A head that does not
    answer has no jobs to stop."""
    try:
        os.killpg(servers.ray_pgid, 0)
    except ProcessLookupError:
        return 0
    from jobs.submit import client as jobs_client  # authenticated with the cluster's token

    try:
        client = jobs_client(servers.dashboard)
        running = [job.submission_id for job in client.list_jobs() if not job.status.is_terminal()]
        for job_id in running:
            client.stop_job(job_id)
        deadline = time.monotonic() + grace
        waiting = list(running)
        while waiting and time.monotonic() < deadline:
            time.sleep(0.5)
            waiting = [job_id for job_id in waiting if not client.get_job_status(job_id).is_terminal()]
    except Exception:  # a head that does not answer: stopping its process group is all that is left to do
        return 0
    return len(running)


def _stop_group(pgid: int, grace: float) -> bool:
    """Stop the group whose leader ``up`` started: the leader first, then what it left, then SIGKILL.

    ``ray start --block`` stops Ray's processes in order (seconds); a signal to the whole group kills
    the GCS first and Ray then waits 30 s for it. MLflow's leader leaves its worker behind.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    _signal(pgid, signal.SIGTERM)
    leader_alive = True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pgid)
        if leader_alive and not _alive(pgid):
            leader_alive = False
            _signal(-pgid, signal.SIGTERM)
        if not _alive(-pgid):
            return True
        time.sleep(0.2)
    _signal(-pgid, signal.SIGKILL)
    return True


def _signal(pid: int, signum: int) -> None:
    """Signal a process (``pid``) or a process group (``-pgid``) that may be gone already."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    """Collect the leader's exit status when this process started it (``up`` and ``down`` in one process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
