"""The ``gradavg`` command line: its parser, and the exit status of each way a command ends (what each
command does is ``jobs.commands``).

Errors are one line on stderr. Exit status 2 means a user's mistake (a config, a path,
an unreachable server), 1 a failed job, and 128 + the signal's number one that was stopped (Ctrl-C 130,
SIGTERM 143, SIGHUP 129), as a shell reports a process a signal ended.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import traceback
import warnings

from jobs.commands import (
    cmd_cluster,
    cmd_data,
    cmd_evaluate,
    cmd_gradcheck,
    cmd_jobs,
    cmd_keys,
    cmd_run,
    cmd_runs,
    cmd_submit,
    cmd_sweep,
)
from jobs.errors import one_line

EPILOG = """examples:
  gradavg run configs/digits.yaml
  gradavg run configs/nielsen-ch1.yaml epochs=5 eta=2.0
  gradavg run configs/digits.yaml backend=ray workers=2 chunk_size=5
  gradavg run --resume RUN_ID
  gradavg gradcheck configs/digits.yaml
  gradavg evaluate runs:/RUN_ID --data digits
  gradavg sweep configs/digits.yaml validation_size=300 eta=0.5,3.0
  gradavg cluster up
  gradavg submit configs/digits.yaml workers=2 --address http://127.0.0.1:8265 \\
      --tracking-uri http://127.0.0.1:5000 --follow

Any config key can be overridden with key=value; `gradavg keys` lists them."""

SWEEP_EPILOG = """examples:
  gradavg sweep configs/sweep-eta.yaml
  gradavg sweep configs/digits.yaml validation_size=300 eta=0.5,3.0 lmbda=0,1
  gradavg sweep configs/digits.yaml validation_size=300 eta='log(0.1,10)' --samples 8 --scheduler asha
  gradavg sweep configs/sweep-eta.yaml --address http://127.0.0.1:8265 --tracking-uri http://127.0.0.1:5000
  gradavg sweep --resume PARENT_RUN_ID"""


def main(argv: list[str] | None = None) -> int:
    """Run a command; what it prints shows no password of a URI (``jobs.store.masked``), wherever
    the text came from (an error of MLflow's, a URI the user gave)."""
    from jobs.store import masked

    saved = sys.stdout, sys.stderr, warnings.showwarning
    sys.stdout, sys.stderr = _Masking(sys.stdout, masked), _Masking(sys.stderr, masked)
    warnings.showwarning = _show_warning
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr, warnings.showwarning = saved


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The compiled kernels' cache's warnings as one line of gradavg's; others as Python shows them."""
    cache = sys.modules.get("core.kernel_cache")
    if cache is not None and issubclass(category, cache.KernelCacheWarning):
        _say(f"gradavg: warning: {message}")
    else:
        warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))


class _Masking:
    """A text stream that passes each write through ``mask``; everything else is the stream's own."""

    def __init__(self, stream, mask):
        self._stream, self._mask = stream, mask

    def write(self, text: str) -> int:
        return self._stream.write(self._mask(text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = _parse(parser, sys.argv[1:] if argv is None else argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if args.command in HEAVY_COMMANDS and (problem := _limits_problem()):  # before anything large is imported
        _say(f"gradavg: error: {problem}")
        return 2
    from jobs.errors import JobFailed, UserError

    try:
        return args.handler(args)
    except UserError as e:
        print(f"gradavg: error: {one_line(e)}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"gradavg: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from jobs.stopping import exit_status
        from jobs.store import program

        if hint := getattr(e, "hint", ""):  # jobs.stopping.Interrupted: what was stopped, and how to continue it
            again = f": cd {shlex.quote(os.getcwd())} && " \
                f"{shlex.join([program('gradavg'), *(sys.argv[1:] if argv is None else argv)])}" \
                if e.start_over else ""  # as typed, in the folder it was typed in: its paths may be relative
            _say(f"gradavg: interrupted: {hint}{again}")
        else:
            _say("gradavg: interrupted" + _unopened(args))
        return exit_status()
    except MemoryError:  # a run in progress has ended FAILED
        _say("gradavg: error: this process ran out of memory (MemoryError); free some, raise its limit (ulimit -v), "
             "or use a smaller network or dataset")
        return 1


def _unopened(args) -> str:
    """What an interrupt that names nothing it stopped means for the command."""
    if args.command == "data":
        return " (the folder was not written)"
    if args.command in ("run", "sweep") and not getattr(args, "address", None):
        return f" before the {args.command} was claimed: nothing was changed" if args.resume else \
            " before a run was opened: nothing was recorded"
    return " (a run in progress ends KILLED)"


# Commands that load the compiled kernels, SciPy's BLAS and MLflow: they reserve about 1.2 GiB of address
# space up front (measured: a tracked run of configs/nielsen-ch1.yaml needs between 1.15 and 1.24 GiB). Under
# a lower `ulimit -v`, imports fail one allocation after another and the process spins for minutes.
HEAVY_COMMANDS = ("run", "sweep", "gradcheck", "evaluate")
ADDRESS_SPACE = 3 * 2**29  # 1.5 GiB
OPEN_FILES = 64  # a tracked run of configs/digits.yaml needed 20 (measured with ulimit -n); with room to spare


def _limits_problem() -> str | None:
    """What this process's limits (``ulimit -n``, ``ulimit -v``) leave too small for a heavy command, or None."""
    import resource

    files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if files != resource.RLIM_INFINITY and files < OPEN_FILES:
        return (f"this process may open at most {files} files at once (ulimit -n {files}), but gradavg needs "
                f"about {OPEN_FILES} (the tracking store, its plots and model files); raise the limit, e.g. "
                "`ulimit -n 1024`")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft < ADDRESS_SPACE:
        return (f"this process may use at most {soft / 2**20:,.0f} MiB of address space (ulimit -v "
                f"{soft // 1024}), but gradavg needs about {ADDRESS_SPACE / 2**30:.1f} GiB (the compiled "
                "kernels, SciPy's BLAS and MLflow reserve much of it when loaded); raise the limit, e.g. "
                f"`ulimit -v {ADDRESS_SPACE // 1024}` or `ulimit -v unlimited`")
    return None


def _say(line: str) -> None:
    """One last line on stderr, if it can still be written (a closed terminal's cannot)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options may stand anywhere, before or after key=value overrides."""
    commands = parser.commands
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


class _Parser(argparse.ArgumentParser):
    """A mistake on the command line is one line, as every other mistake is: what is wrong, and where the usage is
    (argparse prints the whole usage first)."""

    def error(self, message: str):
        flags = re.findall(r"--([\w-]+)", message) if message.startswith("unrecognized arguments") else []
        from jobs.config import KEYS

        keys = [k for f in flags if (k := f.replace("-", "_")) in KEYS]  # --epochs 5, --init-scale 0.1
        advice = f" (config keys are written key=value, e.g. {keys[0]}=...)" if keys else ""
        self.exit(2, f"{self.prog}: error: {message}{advice}; `{self.prog} --help` shows the usage\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradavg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train neural networks by backpropagation, averaging gradient sums exactly, "
                    "in one process or on a Ray cluster, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_training, _add_sweep, _add_cluster, _add_data):
        add(sub)
    parser.commands = sub.choices  # for _parse
    return parser


def _add_training(sub) -> None:
    """run, gradcheck, evaluate, submit."""
    run = sub.add_parser("run", help="train a network from a YAML config", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", nargs="?", help="a YAML job config, e.g. configs/digits.yaml ('-' for none: "
                                                "defaults and overrides only; with --resume: optional, the run's "
                                                "own config by default)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                            "sqlite:///mlflow.db here)")
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    run.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint, with "
                                                        "its own config (and any key=value overrides)")
    run.add_argument("--force", action="store_true", help="with --resume: accept a config that changes the result")
    run.set_defaults(handler=cmd_run)

    check = sub.add_parser("gradcheck", help="check backprop against finite differences")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.add_argument("--examples", type=int, default=5, help="examples of the data to check on (default 5)")
    check.add_argument("--tolerance", type=float, help="largest relative error accepted (default: 1e-7 for "
                                                        "float64, 1e-4 for float32)")
    check.set_defaults(handler=cmd_gradcheck)

    evaluate = sub.add_parser("evaluate", help="accuracy and cost of a saved model on a dataset")
    evaluate.add_argument("model", help="a weights.npz file; a run's weights, runs:/RUN_ID; a logged model, "
                                        "models:/m-ID; or a registered one, models:/NAME/VERSION")
    evaluate.add_argument("--data", default=None, help="dataset (default: the run's own, or digits)")
    evaluate.add_argument("--split", choices=("test", "validation", "train"), default="test",
                          help="which examples (default test; validation and train as the run split its data)")
    evaluate.add_argument("--tracking-uri", help="the MLflow store of runs:/ and models:/ (default: "
                                                 "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    evaluate.add_argument("--allow-pickle", action="store_true",
                          help="the data may be the book's pickled mnist.pkl.gz (unpickling can run code: only for "
                               "files you trust); never taken from the evaluated run")
    evaluate.set_defaults(handler=cmd_evaluate)

    submit = sub.add_parser("submit", help="submit a training job to a Ray cluster (Ray Jobs)")
    submit.add_argument("config", nargs="?", help="a YAML job config (with --resume: optional, the run's own by "
                                                  "default)")
    submit.add_argument("overrides", nargs="*", metavar="key=value")
    submit.add_argument("--address", help="the cluster's dashboard, http://HOST:8265 (default: $RAY_ADDRESS)")
    submit.add_argument("--tracking-uri", help="MLflow tracking URI the cluster can reach (default: "
                                               "$MLFLOW_TRACKING_URI)")
    submit.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    submit.add_argument("--force", action="store_true", help="with --resume: accept a config that changes the result")
    submit.add_argument("--follow", action="store_true", help="stream the job's log until it ends; exit 0 only "
                                                              "if it SUCCEEDED")
    submit.set_defaults(handler=cmd_submit)


def _add_sweep(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="train a config with several values of some keys, as one MLflow parent run",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SWEEP_EPILOG)
    sweep.add_argument("config", nargs="?", help="a YAML job config, its sweep: section too ('-' for none)")
    sweep.add_argument("overrides", nargs="*", metavar="key=values",
                       help="key=A,B,C sweeps a key over values; key=log(A,B) or key=[A,B] draws it from a range "
                            "(with --samples); key=value sets it for every trial")
    sweep.add_argument("--samples", type=int, help="how many values to draw from the ranges")
    sweep.add_argument("--at-once", type=int, help="trials run at the same time (default: as many as there are "
                                                   "cores, or the cluster's CPUs, for threads per trial)")
    sweep.add_argument("--scheduler", choices=("none", "asha"), default="none",
                       help="asha: stop trials whose validation accuracy is not in the top 1/REDUCTION of those that "
                            "reached the same epoch (at epochs GRACE, GRACE·REDUCTION, ...)")
    sweep.add_argument("--grace", type=int, help="with asha: the first epoch a trial can be stopped at (default 1)")
    sweep.add_argument("--reduction", type=int, help="with asha: keep the top 1/REDUCTION at each rung (default 3)")
    sweep.add_argument("--register", metavar="NAME", help="register the best trial's model as models:/NAME/VERSION")
    sweep.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                              "sqlite:///mlflow.db here)")
    sweep.add_argument("--address", help="run the sweep as one Ray job on this cluster, http://HOST:8265")
    sweep.add_argument("--follow", action="store_true", help="with --address: stream the job's log until it ends")
    sweep.add_argument("--resume", metavar="PARENT_RUN_ID", help="continue a sweep: finished trials are kept, the "
                                                                 "others resume from their checkpoints")
    sweep.add_argument("--allow-pickle", action="store_true",
                       help="with --resume: the trials may read the book's pickled mnist.pkl.gz (a resumed plan's "
                            "allow_pickle is never taken from the store)")
    sweep.add_argument("--trials-on-ray", action="store_true", help=argparse.SUPPRESS)  # a submitted sweep's driver
    sweep.set_defaults(handler=cmd_sweep)


def _add_cluster(sub) -> None:
    """jobs, cluster, runs."""
    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop submitted jobs")
    jobs.add_argument("action", choices=("list", "status", "logs", "stop"))
    jobs.add_argument("job_id", nargs="?", help="the id `gradavg submit` printed")
    jobs.add_argument("--address", help="the cluster's dashboard (default: $RAY_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    jobs.set_defaults(handler=cmd_jobs)

    cluster = sub.add_parser("cluster", help="start or stop a local Ray head and MLflow server on 127.0.0.1")
    cluster.add_argument("action", choices=("up", "down"))
    cluster.add_argument("--state-dir", default=".gradavg", help="where the servers keep their state and logs "
                                                                 "(default .gradavg)")
    cluster.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    cluster.add_argument("--dashboard-port", type=int, default=8265)
    cluster.add_argument("--mlflow-port", type=int, default=5000)
    cluster.set_defaults(handler=cmd_cluster)

    runs = sub.add_parser("runs", help="settle MLflow runs whose driver was killed outright")
    runs.add_argument("action", choices=("repair",))
    runs.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to end KILLED (default: every RUNNING run "
                                                                    "whose driver on this machine is gone)")
    runs.add_argument("--tracking-uri")
    runs.set_defaults(handler=cmd_runs)


def _add_data(sub) -> None:
    """data, keys."""
    data = sub.add_parser("data", help="write a dataset as a folder of blocks (a sharded dataset), or check one",
                          description="shard: write SOURCE (a bundled name, an .npz, an IDX folder, ...) as a folder "
                                      "of blocks that Ray workers load one share each (train it with data=OUT, "
                                      "shuffle=blocks); check: verify every block of a folder against its manifest.")
    data.add_argument("action", choices=("shard", "check"))
    data.add_argument("source", help="shard: the dataset to write; check: a sharded folder")
    data.add_argument("out", nargs="?", help="shard: the new folder")
    data.add_argument("--rows-per-block", type=int, default=1000, help="examples per block (default 1000)")
    data.add_argument("--validation-size", type=int,
                      help="training examples held out for validation, as a job's validation_size (default 0; a "
                           "sharded source: its own)")
    data.add_argument("--test-size", type=int, help="examples held out for test where the source has no test set "
                                                    "(default: the dataset's default, as a job's test_size)")
    data.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                      help="how the rows are stored (float32: half the size; a float64 network then trains on "
                           "float32-rounded inputs)")
    data.add_argument("--allow-pickle", action="store_true", help="the source may be the book's pickled "
                                                                  "mnist.pkl.gz (unpickling can run code)")
    data.set_defaults(handler=cmd_data)

    keys = sub.add_parser("keys", help="list the config keys, their defaults and what is valid")
    keys.set_defaults(handler=cmd_keys)


def entry() -> None:
    """The ``gradavg`` command. A Ray job ends as Ray's compiled graphs need (``cluster.connect.end_process``),
    also when an error escapes."""
    try:
        try:
            code = main()
        except SystemExit as e:  # argparse's --help and usage errors
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
        sys.stdout.flush()  # here, where a failed write can still be told (not in the interpreter's exit)
    except BrokenPipeError:  # `gradavg keys | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except OSError as e:  # `gradavg keys > /dev/full`: the output could not be written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _say(f"gradavg: error: the output cannot be written ({e.strerror or e}); write it where there is room")
        code = 1
    except Exception:
        if "cluster.connect" not in sys.modules:
            raise
        traceback.print_exc()
        code = 1
    if "jobs.stopping" in sys.modules:  # done: a Ctrl-C while the interpreter exits would only change the status
        sys.modules["jobs.stopping"].ignore_stop_signals()
    if "cluster.connect" in sys.modules:
        sys.modules["cluster.connect"].end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
