"""Submitting jobs to a Ray cluster through Ray Jobs, and watching them.

The job runs the same ``gradavg run`` with ``backend=ray``; the project goes along as
the job's working directory. The config is validated here, before anything is sent.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlsplit

from cluster import ray_settings
from cluster.auth import read_token, token_warning
from jobs.config import JobConfig, replace, show
from jobs.errors import UserError, first_line
from jobs.store import PROJECT_ROOT, TrackingError, check_reachable, git_commit

ray_settings()  # Ray's loopback and auth settings, before Ray is imported or started here

# Left behind: environments, tracking stores and caches are not part of the job.
EXCLUDES = [".venv", "venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "*.db", "__pycache__", "*.egg-info",
            ".pytest_cache", ".ruff_cache", "bench-results", ".gradavg", "*.npz.part",
            "block-*.x.npy", "block-*.y.npy", "train-rows.npy"]  # a sharded dataset never travels with a job
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


_WARNED: set[str] = set()


class SubmitError(UserError, RuntimeError):
    """The job cannot be sent, or the cluster cannot be reached; the message says what to do."""


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HOST:8265 (the Ray dashboard) or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    try:
        parts = urlsplit(address)
        parts.port  # noqa: B018 (raises for a port that is no number from 0 to 65535)
    except ValueError as e:
        raise SubmitError(f"--address {address}: not a valid address ({e}); write http://HOST:8265") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"--address {address}: write http://HOST:8265 (the Ray dashboard's address)")
    return address


def client(address: str | None):
    """A JobSubmissionClient that authenticates with the cluster's token when auth is on."""
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]:
        logging.getLogger(name).setLevel(logging.ERROR)  # not a line per file uploaded
    address = resolve_address(address)
    if (warning := token_warning()) and warning not in _WARNED:  # once a command, however many clients it makes
        _WARNED.add(warning)
        print(f"gradavg: warning: {warning}", file=sys.stderr)
    headers = {}
    if token := read_token():
        headers["Authorization"] = f"Bearer {token}"
    try:
        return JobSubmissionClient(address, headers=headers or None)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError, auth errors: Ray raises several
        raise SubmitError(f"cannot reach the Ray cluster at {address} ({first_line(e, 200)}); check the address "
                          "and that the cluster runs (`gradavg cluster up` starts one here)") from None


def check_tracking_uri(uri: str, address: str) -> None:
    """Refuse a tracking URI that the cluster's job cannot reach."""
    host = urlparse(address).hostname or ""
    remote = host not in LOOPBACK
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if parsed.hostname in LOOPBACK and remote:
            problem = f"--tracking-uri {uri} is this machine's loopback, which the cluster at {address} cannot reach"
        else:
            try:
                check_reachable(uri)
            except TrackingError as e:  # its advice, a sqlite file here, is one a job cannot use
                port = parsed.port or 5000
                start = (f"here (`mlflow server --host 127.0.0.1 --port {port}`, or `gradavg cluster up` for a "
                         "Ray head beside it)" if parsed.hostname in LOOPBACK
                         else f"on {parsed.hostname} (`mlflow server --host 0.0.0.0 --port {port}`)")
                raise SubmitError(f"{str(e).split('; ')[0]}; start one {start} and pass its http URL") from None
            return
    elif parsed.scheme in ("", "file", "sqlite"):
        path = uri.removeprefix("sqlite:///").removeprefix("file://") if parsed.scheme else uri
        if not os.path.isabs(path):
            problem = f"tracking URI {uri} is a path relative to this machine's folder, which the job does not run in"
        elif remote:
            problem = f"tracking URI {uri} is a path on this machine, which the cluster at {address} cannot reach"
        else:
            return
    else:
        return  # databricks, postgresql://… : reachable or not, the job will say
    raise SubmitError(f"{problem}; run an MLflow tracking server the cluster can reach, e.g. `mlflow server --host "
                      "0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db --artifacts-destination "
                      "./mlartifacts`, and pass --tracking-uri http://THAT_HOST:5000")


def entrypoint(cfg: JobConfig, tracking_uri: str, resume: str | None = None, force: bool = False) -> str:
    """The job's command: the resolved config, every key spelled out, on the cluster's Ray."""
    values = {**cfg.to_dict(), "backend": "ray"}
    args = ["run", "-", *(f"{key}={show(value, limit=None)}" for key, value in values.items())]
    args += ["--tracking-uri", tracking_uri]  # not --quiet: a job's log shows a line per epoch
    if resume:
        args += ["--resume", resume] + (["--force"] if force else [])
    return _command(args)


def _command(args: list[str]) -> str:
    """``gradavg ARGS`` as a job's shell command, each argument quoted, the shell replaced by Python."""
    return "exec python -m jobs.cli " + " ".join(shlex.quote(a) for a in args)


def check_data(cfg: JobConfig) -> None:
    """What can be checked here of the data a job will read on the cluster: ``shuffle=blocks`` needs a sharded
    folder; a sharded folder is read where the job runs (its blocks never travel with it), so it is named by an
    absolute path; where that path is here too, its manifest must fit the config."""
    from jobs.config import ConfigError, check_against_data
    from jobs.data import BUNDLED, load_dataset
    from jobs.run import check_shuffle
    from jobs.shards import is_sharded

    check_shuffle(cfg)  # (a path that is not here may be one on the cluster: not checked)
    if cfg.data not in BUNDLED and not cfg.data.startswith("synthetic:") and is_sharded(cfg.data):
        if not Path(cfg.data).is_absolute():
            raise ConfigError(f"data={cfg.data}: a sharded folder does not travel with a job (its blocks are left "
                              f"out); name it by a path every node sees, e.g. data={Path(cfg.data).resolve()}")
        data = load_dataset(cfg.data, cfg.validation_size, cfg.test_size, rows=False)
        check_against_data(cfg, data.n_inputs, data.n_classes, data.max_label)


# What a job's metadata says of it, for `gradavg jobs list` and `jobs status`
KIND, DESCRIBED, TRACKING, RUN = "gradavg_kind", "gradavg_command", "gradavg_tracking_uri", "gradavg_run"


def submit(cfg: JobConfig, address: str | None, tracking_uri: str, resume: str | None = None,
           force: bool = False, described: str = "") -> str:
    """Send a training job; ``described``: its config and overrides as the user gave them (its row of
    `gradavg jobs list`)."""
    cfg = replace(cfg, backend="ray")
    metadata = {KIND: "run", DESCRIBED: described or cfg.data, "experiment": cfg.experiment}
    return send(entrypoint(cfg, tracking_uri, resume, force), address, tracking_uri,
                {**metadata, **({RUN: resume} if resume else {})})


def send(command: str, address: str | None, tracking_uri: str, metadata: dict[str, str]) -> str:
    """Submit ``command`` as a Ray job running in a copy of the project; return the job's id. The job's
    environment names the cluster (``jobs.runs.SUBMITTED_TO``: its hints say how to continue it there) and
    the job's id (``jobs.runs.JOB_ID``: its run is tagged with it, for `gradavg jobs list` to find)."""
    from jobs import runs

    address = resolve_address(address)
    check_tracking_uri(tracking_uri, address)
    jobs = client(address)
    job_id = f"raysubmit_{secrets.token_hex(8)}"  # chosen here, so that the job knows it
    # a stopped job gets 30 s (Ray's default: 3) to end its runs KILLED before it is killed outright
    env_vars = {"PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": tracking_uri, "RAY_JOB_STOP_WAIT_TIME_S": "30",
                runs.SUBMITTED_TO: address, runs.JOB_ID: job_id}
    if commit := git_commit():
        env_vars["GRADAVG_GIT_COMMIT"] = commit  # the job's copy of the project has no .git
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env_vars}
    try:
        return jobs.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=job_id,
                               metadata={**metadata, TRACKING: tracking_uri})
    except Exception as e:
        raise SubmitError(f"the cluster at {address} refused the job: {first_line(e, 300)}") from None


def sweep_entrypoint(parent_id: str, tracking_uri: str, at_once: int | None, register: str | None,
                     allow_pickle: bool = False) -> str:
    """A submitted sweep's command: the sweep its parent run holds, its trials as Ray tasks. The job reads
    its plan back from the store, which never grants ``allow_pickle``: the submitting command line does."""
    args = ["sweep", "--resume", parent_id, "--tracking-uri", tracking_uri, "--trials-on-ray"]
    args += ["--allow-pickle"] if allow_pickle else []
    args += ["--at-once", str(at_once)] if at_once else []
    args += ["--register", register] if register else []
    return _command(args)


def status(address: str | None, job_id: str) -> str:
    jobs = client(address)
    try:
        return str(jobs.get_job_status(job_id).value)
    except RuntimeError as e:
        raise SubmitError(f"no job {job_id!r} at {resolve_address(address)} ({first_line(e, 120)}); "
                          f"`gradavg jobs list --address {resolve_address(address)}` shows the jobs") from None


def wait(address: str | None, job_id: str, timeout: float | None = None, poll: float = 0.5) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = status(address, job_id)
        if state in TERMINAL:
            return state
        if deadline is not None and time.monotonic() > deadline:
            return state
        time.sleep(poll)


def logs(address: str | None, job_id: str) -> str:
    status(address, job_id)  # a clear error for an unknown job
    return client(address).get_job_logs(job_id)


def follow(address: str | None, job_id: str, stream=None) -> str:
    """Print the job's log as it grows until the job ends; return its final status."""
    stream = stream or sys.stdout
    status(address, job_id)
    jobs = client(address)

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()

    asyncio.run(tail())
    return wait(address, job_id)


def stop(address: str | None, job_id: str) -> bool:
    status(address, job_id)
    return client(address).stop_job(job_id)


def list_jobs(address: str | None) -> list:
    """The cluster's jobs, newest first (Ray's ``JobDetails``)."""
    return sorted(client(address).list_jobs(), key=lambda job: job.start_time or 0, reverse=True)


def job_details(address: str | None, job_id: str):
    status(address, job_id)  # a clear error for an unknown job
    return client(address).get_job_info(job_id)
