"""Shared fixtures: a template MLflow sqlite store made once per session and copied per test.

Creating a fresh store runs MLflow's migrations (seconds); copying one takes a fraction.
"""

from __future__ import annotations

import multiprocessing.process
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# Every Ray process that tests start listens on loopback and reports nothing outside.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

# The tests play a terminal's signals (Ctrl-C's SIGINT, a closed terminal's SIGHUP) on the jobs they run, in this
# process and in the ones it starts. A job started with a signal ignored keeps it ignored (jobs.stopping.
# IGNORED_AT_START), and a process inherits what its parent ignores: a test run started by a script in the
# background (SIGINT ignored) or under nohup (SIGHUP ignored) would find every job deaf to them. So this process
# ignores neither: SIGINT interrupts as Python's default does; SIGHUP gets a handler that does nothing, so that
# the test run outlives its terminal (but while a test runs a job in this process, which installs its own; the
# `_not_stopping` fixture puts it back) and the processes it starts hear it (a handler is not inherited).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, lambda signum, frame: None)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray cluster of 3 CPUs on 127.0.0.1 for one test module (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, object_store_memory=300 * 1024**2,
             logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def template_store(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the schema
    return db


@pytest.fixture
def tracking_uri(template_store, tmp_path, monkeypatch) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(template_store, db)
    monkeypatch.chdir(tmp_path)  # artifacts land under tmp_path/mlruns
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def holding_at(epoch: int) -> dict[str, str]:
    """The environment of a process whose runs hold after ``epoch`` (``jobs.train.hold_after``) until killed."""
    from jobs.train import HOLD_AFTER_EPOCH

    return {**os.environ, "PYTHONPATH": str(ROOT), HOLD_AFTER_EPOCH: str(epoch)}


def error_line(stderr: str) -> str:
    """The one error line a failed command printed (progress lines may come before it)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert all(line.startswith(("gradavg: ", "epoch ")) for line in lines), stderr  # no message runs on
    errors = [line for line in lines if line.startswith("gradavg: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


# ---- Tiers ---------------------------------------------------------------------------------------------
# A bare `pytest` runs the fast tier: every test that starts no Ray cluster, opens no tracking store, starts
# no process and no server (under a minute). `pytest --all` runs everything (CI does); naming files or tests
# runs them whole. Each test is put in its tiers by what it uses: its fixtures, and the names and strings in
# its code and in the code of the helpers, classes and fixtures it calls from the tests' own modules. A test
# the marks miss is caught in the fast tier: starting a process there fails the test, naming the mark.
TIERS = {  # mark: (fixtures, names, words in strings) that put a test in it
    "ray": ({"local_ray"}, {"ray", "RayBackend", "local_cluster"}, ("backend=ray", "backend: ray")),
    "store": ({"tracking_uri", "template_store"}, {"MlflowClient", "mlflow", "tracking_uri"}, ()),
    "subprocess": (set(), {"subprocess", "Popen", "multiprocessing", "psutil", "fork"}, ()),
    "server": (set(), {"mlflow_server", "start_server"}, ("mlflow server", "ray start")),
}
SLOW_TIERS = ("slow", *TIERS)


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", help="run every tier: Ray, stores, processes, servers (as CI does)")


def pytest_configure(config):
    for mark in TIERS:
        config.addinivalue_line("markers", f"{mark}: put in its tier by the conftest (what the test uses)")


def _code_uses(function, module_globals, seen) -> tuple[set[str], set[str]]:
    """The global names and string constants in ``function``'s code, followed through the functions and
    classes of the tests' own modules that it names."""
    names, strings = set(), set()
    codes = []
    if isinstance(function, type):  # its methods, and those of the classes of the tests' modules it derives from
        codes = [f.__code__ for c in function.__mro__ if _ours(c) for f in vars(c).values() if hasattr(f, "__code__")]
    elif hasattr(function, "__code__"):
        codes = [function.__code__]
    while codes:
        code = codes.pop()
        if code in seen:
            continue
        seen.add(code)
        names.update(code.co_names)
        for const in code.co_consts:
            if isinstance(const, str):
                strings.add(const)
            elif hasattr(const, "co_names"):
                codes.append(const)
        for name in code.co_names:
            target = module_globals.get(name)
            if _ours(target) and target is not function:
                more_names, more_strings = _code_uses(target, vars(sys.modules[target.__module__]), seen)
                names |= more_names
                strings |= more_strings
    return names, strings


def _ours(thing) -> bool:
    """Whether ``thing`` (a function, class or fixture) is defined in the tests' own modules."""
    return getattr(thing, "__module__", "").startswith(("test_", "conftest", "tests."))


GUARD = "_fast_tier_starts_no_process"  # the autouse fixture below: it names processes, and uses none


def tiers_of(item) -> set[str]:
    functions = [item.function]
    for name in set(item.fixturenames) - {GUARD}:
        functions += [d.func for d in item._fixtureinfo.name2fixturedefs.get(name, ()) if _ours(d.func)]
    names, strings, seen = set(), set(), set()
    for function in functions:
        more_names, more_strings = _code_uses(function, vars(sys.modules[function.__module__]), seen)
        names |= more_names
        strings |= more_strings
    names |= set(item.fixturenames) - {GUARD}
    marks = {m.name for m in item.iter_markers()}
    for mark, (fixtures, words, phrases) in TIERS.items():
        if names & (fixtures | words) or any(p in s for s in strings for p in phrases):
            marks.add(mark)
    return marks & set(SLOW_TIERS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in tiers_of(item) - {m.name for m in item.iter_markers()}:
            item.add_marker(mark)
    named = [a for a in config.args if Path(a).resolve() != ROOT / "tests"]
    if config.getoption("--all") or config.option.markexpr or named:
        return
    slow = [i for i in items if any(i.get_closest_marker(m) for m in SLOW_TIERS)]
    config._gradavg_fast = len(slow)
    if slow:
        config.hook.pytest_deselected(items=slow)
        slow = set(slow)
        items[:] = [i for i in items if i not in slow]


LEFT_BEHIND = ("mlruns", "mlartifacts", "mlflow.db")  # what a test run in the project's folder would leave


def pytest_sessionstart(session):
    session.config._gradavg_before = {name for name in LEFT_BEHIND if (ROOT / name).exists()}


def pytest_sessionfinish(session, exitstatus):
    """A test that tracks to the project's folder (not its own temporary one) fails the session."""
    left = {name for name in LEFT_BEHIND if (ROOT / name).exists()} - getattr(session.config, "_gradavg_before", set())
    if left:
        session.config.get_terminal_writer().line(f"tests left {', '.join(sorted(left))} in {ROOT}: a test tracked "
                                                  "outside its temporary folder", red=True)
        session.exitstatus = 1


def pytest_report_header(config):
    if not (config.getoption("--all") or config.option.markexpr):
        return "tiers: a bare `pytest` runs the fast tier (no Ray, store, process or server); `pytest --all` runs all"
    return None


@pytest.fixture(autouse=True)
def _not_stopping():
    """A test that stopped a job in this process (a signal to itself, ``main`` interrupted) leaves the next one
    not stopping, and the signals' handlers as they were."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    hook = sys.unraisablehook
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    sys.unraisablehook = hook
    if (stopping := sys.modules.get("jobs.stopping")) is not None:
        stopping.reset()


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """In the fast tier, a test that starts a process was missed by ``tiers_of``: fail it, naming the fix."""
    if getattr(request.config, "_gradavg_fast", None) is None:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts a process, so it is not a fast-tier test: mark it "
                           "@pytest.mark.subprocess (or teach tests/conftest.py's TIERS what it uses)")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
