"""The MLflow store a job tracks to: its URI, whether it can be used, and how it is called
(``open_store``, ``retry_locked``, ``process_uri``). The runs in it, and their tags, are
``jobs.runs``'s; tracking a running job is ``jobs.tracking``.

The tracking URI is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own
default (``sqlite:///mlflow.db`` in the working directory). Every call to a tracking server
has a bounded time (``bound_requests``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote, urlparse, urlsplit

from jobs.errors import UserError, reason

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Each request to a tracking server: at most 15 s, tried 3 times, 1 s and 2 s apart (MLflow's own
# defaults, 120 s and 7 tries, kept a process waiting 13 minutes on a dead server). Set these
# variables to choose others.
REQUEST_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used; the message says how to fix it."""


_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*):[^\s/@]+@")


def masked(text: str) -> str:
    """``text`` with the password of every URI in it replaced: ``http://user:***@host/``."""
    return _PASSWORD.sub(r"\1:***@", text)


def resolve_uri(cli_uri: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default; checked (``check_uri``)."""
    import mlflow

    if cli_uri is not None:
        return check_uri(cli_uri, "--tracking-uri")
    if (env := os.environ.get("MLFLOW_TRACKING_URI")) is not None:
        return check_uri(env, "MLFLOW_TRACKING_URI")
    return mlflow.get_tracking_uri()


def check_uri(uri: str, where: str) -> str:
    """A tracking URI that can hold a job's run, or a TrackingError naming what is wrong with it."""
    if not uri.strip():
        raise TrackingError(f"{where} is blank; unset it for ./mlflow.db, or give http://HOST:PORT or "
                            "sqlite:///PATH.db")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (raises for a port that is no number from 0 to 65535)
    except ValueError as e:
        raise TrackingError(f"{where} {masked(uri)}: not a valid URI ({e}); write http://HOST:PORT or "
                            "sqlite:///PATH.db") from None
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise TrackingError(f"{where} {masked(uri)}: names no host; write http://HOST:PORT")
    if parts.scheme in ("", "file") and (problem := _not_a_store(uri, where)):
        raise TrackingError(problem)
    if parts.scheme == "sqlite" and _sqlite_path(uri) is None:
        raise TrackingError(f"{where} {uri}: an in-memory store is gone when the process ends (and a job's other "
                            "processes cannot see it); write sqlite:///PATH.db for a file")
    return uri


def _not_a_store(uri: str, where: str) -> str | None:
    """What a path given as a tracking URI needs, or None where MLflow takes it: a sqlite file is named
    ``sqlite:///PATH``; a server, ``http://HOST:PORT``; a folder is MLflow's file store, which MLflow 3 opens only
    when ``MLFLOW_ALLOW_FILE_STORE`` says so (its "maintenance mode")."""
    if re.fullmatch(r"/*[\w.-]+:\d+/?", uri):  # a server's address without its scheme
        return f"{where} {uri}: a tracking server is named with its scheme; write http://{uri.strip('/')}"
    path = Path(unquote(urlsplit(uri).path) if uri.startswith("file:") else uri).expanduser().absolute()
    if path.suffix in (".db", ".sqlite", ".sqlite3") or path.is_file():
        return f"{where} {uri}: a file is named by a URI; write sqlite:///{path}"
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1"):
        return None  # MLflow's own opt-out: its file store, as the user asked
    return (f"{where} {uri}: a folder of runs is MLflow's file store, which MLflow 3 opens only with "
            f"MLFLOW_ALLOW_FILE_STORE=true; write sqlite:///PATH.db (`mlflow migrate-filestore` moves a folder's runs "
            f"into one) or http://HOST:PORT")


def bound_requests() -> None:
    for key, value in REQUEST_LIMITS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the run's own last lines say where


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before training, when a tracking server does not answer: its health and its API."""
    if not uri.startswith(("http://", "https://")):
        return
    base, headers = _without_credentials(uri.rstrip("/"))
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=timeout) as reply:
                if reply.status == 200:
                    continue
                problem = f"answered HTTP {reply.status} to {path}"
        except urllib.error.HTTPError as e:
            problem = f"answered HTTP {e.code} to {path}"
        except (urllib.error.URLError, OSError) as e:  # refused, unknown host, timed out
            problem = f"cannot be reached ({getattr(e, 'reason', e)})"
        raise TrackingError(f"MLflow tracking server {uri} {problem}; start one with `gradavg cluster up` or "
                            "`mlflow server --host 127.0.0.1 --port 5000`, or pass --tracking-uri sqlite:///mlflow.db")


# A sqlite store held locked by another process (a long write, a backup) is waited for this long, a call
# tried again every second, before it counts as failed.
LOCK_WAIT_SECONDS = 60.0


def is_locked(error: BaseException) -> bool:
    return "database is locked" in str(error)


def retry_locked(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, tried again while a sqlite store is locked, for up to ``LOCK_WAIT_SECONDS``."""
    import time

    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_locked(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _answering_client(client_class, uri: str):
    client = client_class(uri)  # a sqlite store checks its tables here, and a new one creates them
    client.search_experiments(max_results=1)
    return client


def _without_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``http://user:password@host/`` as ``http://host/`` and the Basic authorization header that MLflow's
    client sends for it (urllib would take the credentials for part of the host name)."""
    import base64

    parts = urlsplit(uri)
    if parts.username is None:
        return uri, {}
    netloc = parts.netloc.rpartition("@")[2]
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return parts._replace(netloc=netloc).geturl(), {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def open_store(uri: str, create: bool = True):
    """An MlflowClient for ``uri`` whose store answers, or a TrackingError that says why not.

    ``create=False`` (evaluating, repairing) refuses to make a new local store where none is.
    A new sqlite store is created under a lock on its folder: two jobs started at once on a new
    file would otherwise both create its tables, and one would fail.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "urllib3", "alembic", "sqlalchemy"):  # our own line says what failed, and says it once:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)  # their tracebacks (hundreds of lines) say no more
    bound_requests()
    check_reachable(uri)
    db = _sqlite_path(uri)
    if db is not None:
        _check_sqlite(uri, db, create)
    try:
        if db is not None and create:
            private_file(db)
        with _folder_lock(db.parent if db is not None else None):
            client = retry_locked(_answering_client, MlflowClient, uri)
    except MlflowException as e:
        scheme = urlparse(uri).scheme
        problem = (f"MLflow has no tracking store for the scheme {scheme!r}" if "scheme" in str(e).lower()
                   else reason(e))
        raise TrackingError(f"--tracking-uri {uri}: {problem}; use http://HOST:PORT, sqlite:///PATH.db or "
                            "leave it unset for ./mlflow.db") from None
    except Exception as e:  # sqlalchemy's and sqlite's own errors: a damaged or unwritable file
        half = ("it was left half-created (a process stopped while MLflow made its tables): move it aside, or "
                if "_alembic_tmp" in str(e) else "")
        raise TrackingError(f"tracking store {uri} cannot be used ({reason(e)}); {half}pass --tracking-uri of a "
                            "working store") from None
    return client


def private_file(path: Path) -> None:
    """Create ``path`` empty, readable and writable by its owner only (0600), unless it exists: a new
    sqlite store (SQLite takes an empty file as a new database, and gives its journals the same mode)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def absolute_uri(uri: str) -> str:
    """``uri`` as a printed command names it, for the same store in any folder it is pasted in: a relative
    ``sqlite:///PATH`` made absolute (from this process's folder), any other URI as it is."""
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{Path.cwd() / path}" + (f"?{query}" if query else "")


def _sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URI; None for any other URI and for an in-memory ``sqlite://``."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]  # sqlite:////abs/path keeps its leading /
    return Path(path) if path and path != ":memory:" else None


def _check_sqlite(uri: str, db: Path, create: bool) -> None:
    if create and "mode=ro" in uri.partition("?")[2]:
        raise TrackingError(f"tracking store {uri} is opened read-only (mode=ro), but a job writes its run there; "
                            "drop ?mode=ro")
    if db.exists():
        try:
            with open(db, "rb") as f:
                header = f.read(16)
        except OSError as e:
            raise TrackingError(f"tracking store {db} cannot be read ({e.strerror}); check its permissions") from None
        if header and header != b"SQLite format 3\x00":
            raise TrackingError(f"tracking store {db} is not an SQLite database (damaged, or another file); "
                                "move it aside or pass another --tracking-uri")
        if create and not (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)):
            raise TrackingError(f"tracking store {db} is read-only; make it and its folder writable or pass "
                                "another --tracking-uri")
    elif not create:
        raise TrackingError(f"no tracking store at {db}; pass the --tracking-uri of the store the run is in "
                            "(or set MLFLOW_TRACKING_URI)")
    elif not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
        raise TrackingError(f"tracking store {db} cannot be created: {db.parent} is not a writable folder; "
                            "pass another --tracking-uri")


@contextmanager
def _folder_lock(folder: Path | None):
    if folder is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def process_uri(uri: str):
    """``uri`` as the process's tracking URI, for the MLflow calls that take no other (logging a model,
    resolving a models:/ URI); afterwards back to ``MLFLOW_TRACKING_URI`` or MLflow's default."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")  # MLflow sets and unsets it along with its own
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def git_commit() -> str | None:
    """The project's commit; a submitted job's copy of it has no .git, and gets the commit from submit."""
    if commit := os.environ.get("GRADAVG_GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ui_hint(uri: str, path: str) -> str:
    """Where to look at ``path`` (``#/experiments/ID/runs/ID``) in the MLflow UI: the tracking server's page;
    for a local store, the command that starts a UI on it, on a port free now, and then the page."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    port = free_port()
    return (f"{shlex.quote(program('mlflow'))} ui --backend-store-uri {shlex.quote(absolute_uri(uri))} "
            f"--host 127.0.0.1 --port {port}, then open "
            f"http://127.0.0.1:{port}/{path}")


def program(name: str) -> str:
    """How a command this process prints runs ``name`` (gradavg, mlflow, ray) when pasted: by its bare name
    where the shell finds this environment's, else by its path in this environment (a venv that is not
    activated, as the README's install leaves it)."""
    import shutil

    beside = Path(sys.executable).with_name(name)
    if not beside.exists():
        return name
    found = shutil.which(name)
    return name if found and Path(found).resolve() == beside.resolve() else str(beside)


TRAINING_VIEW = "workflowType=machine_learning"


def run_path(experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, from its root, in the UI's view of training runs: MLflow 3.17's UI opens
    an experiment on its GenAI pages (traces, evaluations) unless the address or the browser's last choice
    ("GenAI | Model training", top left) says ``workflowType=machine_learning``; it does not read the
    experiment's kind tag (``jobs.runs.EXPERIMENT_KIND``) while that switch is shown."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def model_version_path(name: str, version: str) -> str:
    """A registered model version's page in the MLflow UI, from its root, in the UI's view of training runs
    (without it, MLflow 3.17 shows the page beside its GenAI menu: prompts, AI gateway)."""
    return f"#/models/{quote(name, safe='')}/versions/{version}?{TRAINING_VIEW}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (one the system picks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_models(uri: str, experiment_id: str, run_id: str) -> list:
    """The models a run logged (MLflow 3's logged models, READY or not)."""
    import mlflow

    with process_uri(uri):  # the fluent search takes no other store
        return mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                           filter_string=f"source_run_id = '{run_id}'")
