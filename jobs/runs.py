"""A run's life and its tags. Every MLflow run gradavg makes is opened (``open_run``), reopened
(``reopen``, by a driver that claims it, ``jobs.claims.take``; ``active``, for MLflow's calls that
log to the active run), closed (``close``, ``try_close``) or deleted (``delete``) by a function of
this module, and every tag gradavg writes or reads is named here, once, and written here (as a run
is opened or reopened, and by ``set_tags``, ``set_tag`` and ``renew_claim``). A run to resume is
read here too (``fetch_checkpoint``).

A job's run is opened by ``jobs.tracking`` (a sweep's trial is a job's run with its parent and its
number), a sweep's parent run by ``jobs.sweep_run``; ``jobs.claims.repair`` closes the runs a dead
driver left RUNNING. A backend names its own tags (``Backend.tags``: backend, threads or workers,
transport): ``cluster`` imports nothing of ``jobs`` but its error kinds (``jobs.errors``).
"""

from __future__ import annotations

import os
import shlex
import time
from contextlib import contextmanager

from jobs.errors import reason
from jobs.store import TrackingError, absolute_uri, git_commit, open_store, process_uri, program

# What started a run: its mlflow.source.name
FROM_RUN = "gradavg run"
FROM_SWEEP = "gradavg sweep"

# Every run: where it came from, and what happened (its description, in the UI's Overview)
DESCRIPTION = "mlflow.note.content"
NAME = "mlflow.runName"  # set again by a resume that changes a value the name states (jobs.config.renamed)
SOURCE = "mlflow.source.name"
VERSION = "gradavg_version"
GIT_COMMIT = "git_commit"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"

RAY_JOBS = "ray_jobs"  # the submitted Ray jobs that drove the run, in order: "ID" or "ID, ID" for a resumed one

# Its driver, and the driver's claim of it (jobs.claims)
DRIVER_HOST = "driver_host"
DRIVER_PID = "driver_pid"
DRIVER_STARTED = "driver_started"
DRIVER_CLAIM = "driver_claim"
DRIVER_SEEN = "driver_seen"

# A job's run: its data, and how its training went
DATASET = "dataset"
DATASET_DIGEST = "dataset_digest"
EPOCHS = "epochs"  # the epochs it trains to: set as it opens, and again by each resume (which may extend it)
DATA_CONTEXT = "mlflow.data.context"  # a tag of the run's dataset input, not of the run
RESUMED = "resumed"  # how many times
FORCED = "forced"  # what a --force resume changed, from which epoch (its params keep the values it started with)
STOPPED_EPOCH = "stopped_epoch"
STOPPED_REASON = "stopped_reason"
KEPT_EPOCH = "kept_epoch"  # the epoch whose weights are the run's model and weights.npz (keep)
WORKER_FAILURES = "worker_failures"
LAST_WORKER_FAILURE = "last_worker_failure"

# A sweep's trial: its parent run, its number, and why it failed
PARENT = "mlflow.parentRunId"
TRIAL = "sweep_trial"
FAILURE = "failure"

# A sweep's parent run: what it sweeps, how its trials ended, the best one and its registered model
SWEEP_KEYS = "sweep_keys"
SWEEP_TRIALS = "sweep_trials"
SWEEP_FINISHED = "sweep_finished"
SWEEP_FAILED = "sweep_failed"
BEST_RUN_ID = "best_run_id"
BEST_TRIAL = "best_trial"
BEST_ACCURACY = "best_validation_accuracy"
BEST_EPOCH = "best_epoch"
BEST_VALUE = "best."  # and a swept key: the best trial's value of the key
REGISTERED_MODEL = "registered_model"
REGISTER_AS = "register_as"  # the name a sweep was started with, --register NAME


# A submitted job's environment: the address of the cluster it was submitted to (``jobs.submit``), so that
# what it prints says how to continue it there
SUBMITTED_TO = "GRADAVG_SUBMITTED_TO"
JOB_ID = "GRADAVG_JOB_ID"  # and its Ray job's id: the run is tagged RAY_JOBS with it


def continue_command(run_id: str, uri: str, sweep: bool = False, address: str | None = None,
                     register: str | None = None) -> str:
    """The command that continues a run (or, ``sweep``, a sweep) from its last checkpoint, to paste as it
    is: on the cluster at ``address`` (by default, the one a submitted job runs on), with the store it
    tracks to; a sweep that was to ``register`` its best model still does."""
    address = address or os.environ.get(SUBMITTED_TO)
    if sweep:
        command = f"sweep --resume {run_id}" + (f" --address {shlex.quote(address)}" if address else "")
        command += f" --register {shlex.quote(register)}" if register else ""
    elif address:
        command = f"submit --resume {run_id} --address {shlex.quote(address)}"
    else:
        command = f"run --resume {run_id}"
    # the store, in any folder; every part quoted for the shell (a folder's name may hold a space or a quote)
    return f"{shlex.quote(program('gradavg'))} {command} --tracking-uri {shlex.quote(absolute_uri(uri))}"


def artifact_image(run_id: str, path: str, text: str) -> str:
    """Markdown that shows a run's image artifact in a description: MLflow's UI renders a description as
    markdown, and serves an artifact at ``get-artifact`` beside its pages (``mlflow ui``, ``mlflow server``)."""
    from urllib.parse import quote

    return f"![{text}](get-artifact?path={quote(path, safe='')}&run_uuid={run_id})"


def job_tag(before: str = "") -> dict[str, str]:
    """In a submitted job, ``{RAY_JOBS: ...}`` with its id after those that drove the run ``before`` (the run
    it opens or continues is tagged with it); else nothing."""
    job = os.environ.get(JOB_ID) or _ray_job_id()
    return {RAY_JOBS: ", ".join([*filter(None, before.split(", ")), job])} if job else {}


def _ray_job_id() -> str | None:
    """The submission id of the Ray job this process is the entrypoint of, where Ray says it (a job sent by
    Ray's own `ray job submit`: Ray passes its metadata to the entrypoint, in Ray 2.60)."""
    import json

    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"] or None
    except (KeyError, ValueError, TypeError):
        return None


def run_tags(source: str, driver: dict[str, str]) -> dict[str, str]:
    """The tags every run gradavg opens starts with: what opened it (``source``), the code's version and
    commit, and its ``driver`` (``jobs.claims.driver_tags``: where it runs and, unless another process will
    drive the run, its claim)."""
    from jobs import __version__

    tags = {VERSION: __version__, **driver, SOURCE: source, **job_tag()}
    if commit := git_commit():
        tags.update({GIT_COMMIT: commit, MLFLOW_GIT_COMMIT: commit})
    return tags


# What an experiment holds, for MLflow's UI: training runs (MLflow 3.17's ExperimentKind). Its UI reads this tag
# only where it shows no "GenAI | Model training" switch; where it does (3.17's default), the switch or the
# address decides (``jobs.store.run_path``), and every address gradavg prints opens on the training runs
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING = "custom_model_development"


def experiment_id_of(client, name: str) -> str:
    """The id of the experiment called ``name``, created if there is none, and marked as one of training
    runs (``EXPERIMENT_KIND``), a new one or one that was not."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND: TRAINING})
        except MlflowException:  # another job created it a moment ago
            experiment = client.get_experiment_by_name(name)
    if experiment.tags.get(EXPERIMENT_KIND) != TRAINING:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, TRAINING)
    return experiment.experiment_id


def open_run(client, experiment: str, name: str | None, tags: dict[str, str],
             params: dict[str, str]) -> tuple[str, str]:
    """A new run in ``experiment`` (created if there is none) with its ``tags`` (over MLflow's own) and
    ``params``: (run id, experiment id)."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking.context.registry import resolve_tags

    experiment_id = experiment_id_of(client, experiment)
    run = client.create_run(experiment_id, run_name=name, tags=resolve_tags(tags))
    try:
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
    except BaseException as e:  # not left RUNNING, unknown to the caller
        try_close(client, run.info.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return run.info.run_id, experiment_id


def reopen(client, run_id: str, tags: dict[str, str]) -> None:
    """Mark the run RUNNING again, with ``tags``: its new driver's claim (a driver reopens a run only by
    claiming it, ``jobs.claims.take``, which calls this) and what else the driver says."""
    set_tags(client, run_id, tags)
    client.update_run(run_id, status="RUNNING")


def renew_claim(client, run_id: str) -> None:
    """This process, the driver of ``run_id``, was seen now (``jobs.claims``)."""
    client.set_tag(run_id, DRIVER_SEEN, str(int(time.time())))


@contextmanager
def active(uri: str, run_id: str):
    """``run_id`` as the process's active run, for MLflow's calls that log to it (a model is linked to the
    active run). MLflow marks the run RUNNING as it enters and ends it as it leaves (FINISHED, or FAILED on
    an error); its driver then closes it with the job's own status."""
    import mlflow

    with process_uri(uri), mlflow.start_run(run_id=run_id):
        yield


def set_tags(client, run_id: str, tags: dict[str, str], metrics=()) -> None:
    """Write ``tags`` (and ``metrics``) to the run, in one request."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, metrics=list(metrics), tags=[RunTag(k, v) for k, v in tags.items()])


def set_tag(client, run_id: str, key: str, value: str) -> None:
    """Write one tag to the run."""
    client.set_tag(run_id, key, value)


def close(client, run_id: str, status: str) -> None:
    """End the run with ``status``: FINISHED, FAILED or KILLED."""
    client.set_terminated(run_id, status)


def try_close(client, run_id: str, status: str) -> None:
    """One try to end the run with ``status`` where the store has been failing: if it answers, the run is
    not left RUNNING (which would look driven); if not, ``gradavg runs repair`` ends it later."""
    try:
        client.set_terminated(run_id, status)
    except Exception:
        pass


def delete(client, run_id: str) -> None:
    """Delete the run (a sweep's trial stopped before its first checkpoint, for a new run to take its place)."""
    client.delete_run(run_id)


def fetch_checkpoint(uri: str, run_id: str):
    """The run that ``--resume RUN_ID`` names and its last checkpoint: (run, TrainingState, JobConfig)."""
    from mlflow.exceptions import MlflowException

    from jobs import checkpoint

    client = open_store(uri, create=False)
    run = get_run(client, run_id, uri, "--resume")
    if SWEEP_KEYS in run.data.tags:
        raise TrackingError(f"--resume {run_id}: that run is a sweep's; continue it with "
                            f"`{continue_command(run_id, uri, sweep=True)}`")
    try:
        path = client.download_artifacts(run_id, "checkpoints/checkpoint.npz")
    except (MlflowException, OSError):
        raise TrackingError(f"--resume {run_id}: the store holds no checkpoint of this run (it ran with "
                            "checkpoint_every=0, or stopped, or lost its store, before its first checkpoint was "
                            "sent); start a new run (`gradavg runs repair` ends this one if it is left "
                            "RUNNING)") from None
    try:
        state, cfg = checkpoint.load(path)
    except Exception as e:  # a damaged file, or one that is not a checkpoint: never taken for a good one
        raise TrackingError(f"--resume {run_id}: its checkpoint cannot be used ({reason(e)}); "
                            "start a new run instead") from None
    return run, state, cfg


def get_run(client, run_id: str, uri: str, what: str):
    """The run ``run_id``, or a TrackingError that says ``what`` named no run in the store."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"{what} {run_id}: no such run in {uri}; check the id (`gradavg run` prints it) "
                            "and the tracking URI") from None
