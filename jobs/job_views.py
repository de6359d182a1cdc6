"""What ``gradavg jobs list`` and ``gradavg jobs status JOB`` show of submitted jobs: when each was
submitted, its status, what it runs (the config and overrides as the user gave them, or a sweep) and
its MLflow run, found in the store the job tracks to (a job's metadata names it, ``jobs.submit``).
"""

from __future__ import annotations

import time

from jobs import runs, submit


def table(address: str | None) -> str:
    """Every job of the cluster, newest first, one row each, under a header; values are never cut."""
    jobs = submit.list_jobs(address)
    found = _runs_of(jobs)
    rows = [("SUBMITTED", "STATUS", "JOB", "COMMAND", "MLFLOW RUN")]
    for job in jobs:
        run = found.get(job.submission_id or "")
        rows.append((_when(job.start_time), str(job.status.value), job.submission_id or job.job_id or "?",
                     _what(job), run.info.run_id if run is not None else (job.metadata or {}).get(submit.RUN, "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows)


def status(address: str | None, job_id: str) -> str:
    """One job: its row of the table, its timings, its run (with its address in the UI, where it has one) and
    how far the run got."""
    job, run, client = _job_run(address, job_id)
    lines = [("job", job_id), ("status", str(job.status.value)), ("command", _what(job)),
             ("submitted", _when(job.start_time))]
    if job.end_time:
        lines.append(("ended", f"{_when(job.end_time)} (after {(job.end_time - job.start_time) / 1000:.1f} s)"))
    elif job.start_time:
        lines.append(("running for", f"{time.time() - job.start_time / 1000:.1f} s"))
    if job.message and str(job.status.value) == "FAILED":
        lines.append(("message", " ".join(job.message.split())[:300]))
    if run is not None:
        uri = tracking_of(job)
        lines += [("mlflow run", f"{run.info.run_id} ({run.info.status})"), ("in the UI", run_url(uri, run))]
        try:
            lines += _progress(client, run)
        except Exception:  # the store stopped answering since: the rest is still worth showing
            lines.append(("epoch", f"unknown (the store {uri} does not answer)"))
    elif (job.metadata or {}).get(submit.RUN):
        lines.append(("mlflow run", job.metadata[submit.RUN]))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def run_url_of(address: str, job_id: str) -> str:
    """A job's run's page in the MLflow UI, or "" where its run is not found."""
    job, run, _ = _job_run(address, job_id)
    return run_url(tracking_of(job), run) if run is not None else ""


def continue_hint(address: str, job_id: str) -> str:
    """What a stopped job's command says last: how to continue its run (or sweep), where it has a checkpoint."""
    job, run, client = _job_run(address, job_id)
    if run is None or str(job.status.value) != "STOPPED":
        return ""
    sweep = runs.SWEEP_TRIALS in run.data.tags
    what = f"gradavg: its {'sweep' if sweep else 'run'} {run.info.run_id} ended KILLED"
    if not sweep and not _has_checkpoint(client, run.info.run_id):
        return f"{what} before its first checkpoint; submit the job again to start over"
    return f"{what}; continue it: {runs.continue_command(run.info.run_id, tracking_of(job), sweep, address)}"


def _job_run(address: str, job_id: str) -> tuple:
    """A job, its MLflow run (None where not found) and a client of the run's store."""
    job, clients = submit.job_details(address, job_id), {}
    run = _runs_of([job], clients).get(job_id)
    return job, run, clients.get(tracking_of(job))


def _has_checkpoint(client, run_id: str) -> bool:
    try:
        return bool(client.list_artifacts(run_id, "checkpoints"))
    except Exception:  # the store does not say: the command that continues it says so itself, if it cannot
        return True


def run_url(uri: str, run) -> str:
    """The run's page in the MLflow UI of the tracking server ``uri`` (``jobs.store.ui_hint``)."""
    from jobs.store import run_path, ui_hint

    return ui_hint(uri, run_path(run.info.experiment_id, run.info.run_id))


def _what(job) -> str:
    """What a job runs, as the user wrote it: `run CONFIG key=value ...` or `sweep ...`; a job gradavg did
    not submit, by its whole entrypoint."""
    metadata = job.metadata or {}
    if submit.DESCRIBED in metadata:
        return f"{metadata.get(submit.KIND, 'run')} {metadata[submit.DESCRIBED]}"
    return job.entrypoint or ""


def _when(millis: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(millis / 1000)) if millis else ""


def _runs_of(jobs, clients: dict | None = None) -> dict:
    """Each job's MLflow run by the job's id: the run its metadata names (a sweep's parent, a resumed run) or
    the run tagged with the job's id (``jobs.runs.RAY_JOBS``), found in its store where that answers (whose
    client goes into ``clients``, by tracking URI, for the caller's further reads)."""
    from jobs.store import open_store

    by_uri: dict[str, list] = {}
    for job in jobs:
        if uri := tracking_of(job):
            by_uri.setdefault(uri, []).append(job)
    found = {}
    for uri, some in by_uri.items():
        try:
            client = open_store(uri, create=False)
            if clients is not None:
                clients[uri] = client
            named = {job.submission_id: job.metadata[submit.RUN] for job in some if submit.RUN in (job.metadata or {})}
            for job_id, run_id in named.items():
                found[job_id] = client.get_run(run_id)
            if len(named) < len(some):
                experiments = [e.experiment_id for e in client.search_experiments()]
                for run in client.search_runs(experiments, filter_string=f"tags.{runs.RAY_JOBS} LIKE 'raysubmit_%'",
                                              max_results=5000):
                    for job_id in run.data.tags[runs.RAY_JOBS].split(", "):
                        if runs.PARENT not in run.data.tags and job_id not in named:
                            found.setdefault(job_id, run)
        except Exception:  # a store that does not answer: its jobs' runs are left blank, the jobs still shown
            continue
    return found


def tracking_of(job) -> str:
    """The tracking URI a job's runs go to: as gradavg sent it, or the job's MLFLOW_TRACKING_URI (a job sent by
    Ray's own `ray job submit`); "" where neither says."""
    env = (job.runtime_env.get("env_vars") or {}) if isinstance(job.runtime_env, dict) else {}
    return (job.metadata or {}).get(submit.TRACKING) or env.get("MLFLOW_TRACKING_URI", "")


def _progress(client, run) -> list[tuple[str, str]]:
    """How far the run got: its latest epoch and accuracies; a sweep's trials."""
    tags, metrics = run.data.tags, run.data.metrics
    if runs.SWEEP_TRIALS in tags:
        done = tags.get(runs.SWEEP_FINISHED)
        return [("trials", tags[runs.SWEEP_TRIALS] + (f" ({done} finished)" if done else ""))]
    history = client.get_metric_history(run.info.run_id, "cost/train")
    if not history:
        return [("epoch", "none finished yet")]
    epoch = max(m.step for m in history)
    text = f"{epoch} of {tags.get(runs.EPOCHS, '?')}"
    for name in ("validation", "test"):
        if f"accuracy/{name}" in metrics:
            text += f", {name} accuracy {metrics[f'accuracy/{name}']:.2f}%"
    return [("epoch", text)]
