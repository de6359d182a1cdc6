"""The ``gradavg`` command line.

Errors are one line on stderr. Exit status 2 means a user's mistake (a config, a path,
an unreachable server), 1 a failed job, 130 an interrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

from jobs.errors import UsageError, one_line

EPILOG = """examples:
  gradavg run configs/digits.yaml
  gradavg run configs/nielsen-ch1.yaml epochs=5 eta=2.0
  gradavg run configs/digits.yaml backend=ray workers=2
  gradavg gradcheck configs/digits.yaml
  gradavg evaluate runs:/RUN_ID --data digits
  gradavg sweep configs/digits.yaml validation_size=300 eta=0.5,3.0
  gradavg cluster up
  gradavg submit configs/digits.yaml workers=2 --address http://127.0.0.1:8265 \
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
    from jobs.train import DivergedError  # not yet a JobFailed

    try:
        return args.handler(args)
    except UserError as e:
        print(f"gradavg: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (JobFailed, DivergedError) as e:
        print(f"gradavg: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("gradavg: interrupted (" + ("the folder was not written)" if args.command == "data" else
                                         "a run in progress ends KILLED)"))
        return 130
    except MemoryError:  # a run in progress has ended FAILED
        _say("gradavg: error: this process ran out of memory (MemoryError); free some, raise its limit (ulimit -v), "
             "or use a smaller network or dataset")
        return 1


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradavg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train neural networks by backpropagation, averaging gradient sums exactly, "
                    "in one process or on a Ray cluster, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train a network from a YAML config", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", nargs="?", help="a YAML job config, e.g. configs/digits.yaml ('-' for none: "
                                                "defaults and overrides only)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                            "sqlite:///mlflow.db here)")
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    run.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
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
    evaluate.add_argument("model", help="a weights.npz file or runs:/RUN_ID")
    evaluate.add_argument("--data", default=None, help="dataset (default: the run's own, or digits)")
    evaluate.add_argument("--split", choices=("test", "validation", "train"), default="test")
    evaluate.add_argument("--tracking-uri")
    evaluate.add_argument("--allow-pickle", action="store_true",
                          help="the data may be the book's pickled mnist.pkl.gz (unpickling can run code: only for "
                               "files you trust); never taken from the evaluated run")
    evaluate.set_defaults(handler=cmd_evaluate)

    submit = sub.add_parser("submit", help="submit a training job to a Ray cluster (Ray Jobs)")
    submit.add_argument("config")
    submit.add_argument("overrides", nargs="*", metavar="key=value")
    submit.add_argument("--address", help="the cluster's dashboard, http://HOST:8265 (default: $RAY_ADDRESS)")
    submit.add_argument("--tracking-uri", help="MLflow tracking URI the cluster can reach (default: "
                                               "$MLFLOW_TRACKING_URI)")
    submit.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    submit.add_argument("--force", action="store_true", help="with --resume: accept a config that changes the result")
    submit.add_argument("--follow", action="store_true", help="stream the job's log until it ends; exit 0 only "
                                                              "if it SUCCEEDED")
    submit.set_defaults(handler=cmd_submit)

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
    parser.commands = sub.choices  # for _parse
    return parser


def cmd_run(args) -> int:
    from jobs.config import load_config
    from jobs.run import run_job, stop_on_signals, summary
    from jobs.store import ui_command

    _check_force(args)
    if args.config is None:
        raise UsageError("gradavg run needs a config, e.g. gradavg run configs/digits.yaml ('-' for the defaults "
                         "and key=value overrides alone)")
    cfg = load_config(None if args.config == "-" else args.config, args.overrides)
    stop_on_signals()  # a stopped job, or one whose terminal closed, ends its run KILLED, as Ctrl-C does
    result = run_job(cfg, args.tracking_uri, quiet=args.quiet, resume=args.resume, force=args.force)
    if result.already_complete:
        if result.state.stopped:
            print(f"run {result.run_id} is already complete: it FINISHED after {result.state.epoch} epochs "
                  f"(stopped: {result.state.stopped}); nothing is left to do")
        else:
            print(f"run {result.run_id} is already complete: it FINISHED after {result.state.epoch} epochs, and "
                  f"nothing is left to do; to train it longer, pass epochs=N (more than {result.state.epoch})")
        return 0
    print(summary(result, cfg))
    if result.run_id:
        print(f"MLflow run {result.run_id} in {result.tracking_uri}")
        print(f"look at it: {ui_command(result.tracking_uri)}")
    return 0


def _check_force(args) -> None:
    if args.force and not args.resume:
        raise UsageError("--force goes with --resume RUN_ID (it accepts a config that changes a resumed run); "
                         "drop it, or add --resume")


def cmd_gradcheck(args) -> int:
    from core import TOLERANCES, gradient_check
    from core.kernels import compiled_gradient_sum
    from jobs.config import load_config
    from jobs.run import prepare_data
    from jobs.train import initial_state

    cfg = load_config(args.config, args.overrides)
    if args.examples < 1:
        raise UsageError(f"--examples {args.examples}: must be at least 1")
    if args.tolerance is not None and not 0 < args.tolerance < float("inf"):
        raise UsageError(f"--tolerance {args.tolerance}: must be a number > 0, e.g. 1e-7")
    data = prepare_data(cfg)
    network = initial_state(cfg).network  # the network the job would train, init_scale and all
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCES[cfg.dtype]
    x, y = data.x_train[: args.examples], data.y_train[: args.examples]
    more = f" (all it has; {args.examples:,} asked)" if y.size < args.examples else ""
    print(f"checking {network.params.size:,} parameters of {list(cfg.sizes)} ({cfg.cost}, {cfg.dtype}) "
          f"on {y.size:,} examples of {data.name}{more}", file=sys.stderr)
    failed = False
    for path, gradient in (("numpy reference", None), ("compiled training path", compiled_gradient_sum)):
        worst = gradient_check(network, x, y, gradient=gradient)
        passed = worst <= tolerance  # a NaN error fails
        failed |= not passed
        verdict = "ok" if passed else "FAILED"
        print(f"{path}: worst relative error {worst:.3e} (tolerance {tolerance:.0e}): {verdict}")
    return 1 if failed else 0


def cmd_evaluate(args) -> int:
    from jobs.data import load_dataset
    from jobs.shards import is_sharded

    network, params = _load_model(args.model, args.tracking_uri)
    spec = args.data or params.get("data") or "digits"
    # the run's own split of its data, so that its validation and test examples are the ones it held out
    split = _run_split(params) if spec == params.get("data") else {}
    if is_sharded(spec):  # split when it was written; only the split evaluated is read
        split = {"validation_size": None, "rows": (args.split,)}
    data = load_dataset(spec, **split, allow_pickle=args.allow_pickle)
    x, y = getattr(data, f"x_{args.split}"), getattr(data, f"y_{args.split}")
    if x.shape[1] != network.sizes[0]:
        raise UsageError(f"--data {spec}: has {x.shape[1]} inputs per example but the model takes "
                         f"{network.sizes[0]}; pass the dataset it was trained on")
    if y.size == 0:
        held = "" if split else " (pass a run's model, runs:/RUN_ID, to use the validation examples it held out)"
        raise UsageError(f"--split {args.split}: {spec} has no {args.split} examples{held}")
    cost, accuracy = network.evaluate(x, y)
    print(f"{spec} {args.split} ({y.size} examples): accuracy {100 * accuracy:.2f}%, mean cost {cost:.4f}")
    return 0


def _run_split(params: dict[str, str]) -> dict:
    """How a run split its data, from its logged params (``str`` of each value). Never ``allow_pickle``:
    what a store says may not widen what a command does (only the person typing it can)."""
    import yaml

    keys = ("validation_size", "test_size")
    return {k: None if params[k] == "None" else yaml.safe_load(params[k]) for k in keys if k in params}


def _load_model(model: str, tracking_uri: str | None) -> tuple:
    """The network a weights file, ``runs:/RUN_ID`` or ``models:/MODEL_ID`` holds, and its run's params."""
    from core import Network

    if model.startswith(("runs:/", "models:/")):
        return _load_tracked(model, tracking_uri)
    if not Path(model).is_file():
        raise UsageError(f"{model}: no such file; pass a weights.npz, runs:/RUN_ID or models:/MODEL_ID")
    try:
        return Network.load(model), {}
    except (ValueError, OSError) as e:
        raise UsageError(f"{model}: cannot be loaded as weights ({e})") from None


def _load_tracked(model: str, tracking_uri: str | None) -> tuple:
    import mlflow

    from core import Network
    from jobs.store import open_store, process_uri, resolve_uri

    uri = resolve_uri(tracking_uri)
    client = open_store(uri, create=False)
    try:
        if model.startswith("runs:/"):
            run_id = model.removeprefix("runs:/").strip("/").split("/")[0]
            path = client.download_artifacts(run_id, "weights.npz")
        else:  # a logged model (models:/m-...) or a registered one (models:/NAME/VERSION)
            with process_uri(uri):  # models:/ URIs are resolved in the process's store
                run_id = mlflow.models.get_model_info(model).run_id
                folder = mlflow.artifacts.download_artifacts(artifact_uri=model, tracking_uri=uri)
            path = Path(folder) / "artifacts" / "weights.npz"
        params = client.get_run(run_id).data.params if run_id else {}
    except (mlflow.exceptions.MlflowException, OSError):
        what = "run with weights.npz" if model.startswith("runs:/") else "gradavg model"
        raise UsageError(f"{model}: no such {what} in {uri}; check the id (gradavg run prints the run's) and "
                         "--tracking-uri") from None
    return Network.load(path), params


def cmd_submit(args) -> int:
    from jobs import submit
    from jobs.config import load_config
    from jobs.store import resolve_uri

    cfg = load_config(args.config, args.overrides)  # validated here, before anything is sent
    if not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise UsageError("a job on a cluster needs a tracking server it can reach: pass --tracking-uri "
                         "http://HOST:5000 or set MLFLOW_TRACKING_URI (`gradavg cluster up` starts one here)")
    uri = resolve_uri(args.tracking_uri)
    _check_force(args)
    submit.check_data(cfg)
    if args.resume:  # what can be checked here is, before the job is sent
        from jobs.claims import refuse_if_driven
        from jobs.run import check_resume_config
        from jobs.store import fetch_checkpoint

        submit.check_tracking_uri(uri, submit.resolve_address(args.address))
        run, state, saved = fetch_checkpoint(uri, args.resume)
        refuse_if_driven(run, f"--resume {args.resume}")
        check_resume_config(args.resume, state, saved, cfg, args.force)
    job_id = submit.submit(cfg, args.address, uri, resume=args.resume, force=args.force)
    print(job_id)
    if not args.follow:
        print(f"follow it: gradavg jobs logs {job_id} --follow", file=sys.stderr)
        return 0
    state = submit.follow(args.address, job_id)
    print(f"job {job_id} {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def cmd_sweep(args) -> int:
    from jobs import sweep_report, sweep_run
    from jobs.run import default_stop_signals, stop_on_signals
    from jobs.store import resolve_uri

    _check_sweep_options(args)
    uri = resolve_uri(args.tracking_uri)
    if args.address and not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise UsageError("a sweep on a cluster needs a tracking server it can reach: pass --tracking-uri "
                         "http://HOST:5000 or set MLFLOW_TRACKING_URI (`gradavg cluster up` starts one here)")
    if args.resume:
        plan, parent_id = sweep_run.load_plan(uri, args.resume, args.allow_pickle), args.resume
        if args.address:
            from jobs import submit
            from jobs.claims import refuse_if_driven
            from jobs.store import open_store

            submit.check_tracking_uri(uri, submit.resolve_address(args.address))
            refuse_if_driven(open_store(uri, create=False).get_run(parent_id), f"--resume {parent_id}")
    else:
        from jobs.sweep import plan_from

        scheduler = {"name": "asha", "grace": args.grace or 1, "reduction": args.reduction or 3} \
            if args.scheduler == "asha" else {}
        plan = plan_from(args.config, args.overrides, args.samples, scheduler)
        print(f"gradavg: checking the {len(plan.trials)} trials, then opening the MLflow store {uri} ...",
              file=sys.stderr)
        if args.address:  # checked where it can be, before the parent run is opened
            from jobs import submit

            submit.check_tracking_uri(uri, submit.resolve_address(args.address))
            submit.client(args.address)  # the cluster answers
        else:
            sweep_run.check_data(plan)
        parent_id = sweep_run.start(plan, uri, driven_here=not args.address)
    if args.address:
        return _submit_sweep(args, uri, parent_id, plan.base.allow_pickle)
    stop_on_signals()  # a stopped sweep, or one whose terminal closed, ends its runs KILLED, as Ctrl-C does
    result = sweep_run.run_sweep(plan, uri, parent_id, args.at_once, on_ray=args.trials_on_ray,
                                 register=args.register)
    default_stop_signals()
    print(sweep_report.table_text(plan, result.rows))
    print(sweep_report.best_line(result))
    print(f"MLflow sweep run {parent_id} in {uri}")
    failed = [r for r in result.rows if r.status != "FINISHED"]
    if failed:
        print(f"gradavg: {len(failed)} of {len(result.rows)} trials did not finish (the table's status column); "
              f"`gradavg sweep --resume {parent_id}` runs them again (from their checkpoints, where they have one)",
              file=sys.stderr)
    return 1 if failed else 0


def _check_sweep_options(args) -> None:
    if args.resume and (args.config or args.overrides or args.samples is not None or args.scheduler != "none"):
        raise UsageError(f"--resume {args.resume} continues a sweep as it was planned: drop the config, the keys, "
                         "--samples and --scheduler")
    if not args.resume and not args.config:
        raise UsageError("gradavg sweep needs a config and the keys to sweep, e.g. gradavg sweep "
                         "configs/digits.yaml validation_size=300 eta=0.5,3.0 (or --resume PARENT_RUN_ID)")
    if args.at_once is not None and args.at_once < 1:
        raise UsageError(f"--at-once {args.at_once}: run at least 1 trial at a time")
    if (args.grace is not None or args.reduction is not None) and args.scheduler != "asha":
        raise UsageError("--grace and --reduction set the asha scheduler: add --scheduler asha, or drop them")
    if args.grace is not None and args.grace < 1:
        raise UsageError(f"--grace {args.grace}: the first epoch a trial can be stopped at is at least 1")
    if args.reduction is not None and args.reduction < 2:
        raise UsageError(f"--reduction {args.reduction}: keep at most the top half at each rung (2 or more)")
    if args.register is not None and (not args.register.strip() or set(args.register) & set("/:")):
        raise UsageError(f"--register {args.register!r}: a model name is some text without / or : (MLflow's rule), "
                         "e.g. --register digits-best")
    if args.allow_pickle and not args.resume:
        raise UsageError("--allow-pickle goes with --resume (a new sweep takes allow_pickle=true as a key); drop it")
    if args.follow and not args.address:
        raise UsageError("--follow goes with --address (it streams a submitted sweep's log); drop it")


def _submit_sweep(args, uri: str, parent_id: str, allow_pickle: bool) -> int:
    from jobs import submit
    from jobs.store import open_store

    try:
        command = submit.sweep_entrypoint(parent_id, uri, args.at_once, args.register, allow_pickle)
        job_id = submit.send(command, args.address, uri, {"gradavg_sweep": parent_id})
    except Exception:
        if not args.resume:  # the parent run of a sweep that never started
            open_store(uri).set_terminated(parent_id, "FAILED")
        raise
    print(job_id)
    print(f"sweep run {parent_id}; follow it: gradavg jobs logs {job_id} --follow", file=sys.stderr)
    if not args.follow:
        return 0
    state = submit.follow(args.address, job_id)
    print(f"job {job_id} {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from jobs import submit

    if args.action == "list":
        for job_id, state, entry in submit.list_jobs(args.address):
            print(f"{job_id:<28} {state:<10} {entry}")
        return 0
    if not args.job_id:
        raise UsageError(f"gradavg jobs {args.action} needs a JOB_ID (`gradavg jobs list` shows them)")
    if args.action == "status":
        print(submit.status(args.address, args.job_id))
    elif args.action == "logs":
        if args.follow:
            state = submit.follow(args.address, args.job_id)
            return 0 if state == "SUCCEEDED" else 1
        sys.stdout.write(submit.logs(args.address, args.job_id))
    elif args.action == "stop":
        submit.stop(args.address, args.job_id)
        state = submit.wait(args.address, args.job_id, timeout=60)
        print(f"job {args.job_id} {state}")
    return 0


def cmd_cluster(args) -> int:
    from jobs import local_cluster

    if args.action == "down":
        stopped = local_cluster.down(args.state_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing to stop ({args.state_dir}/cluster.json "
                                                                "is absent)")
        return 0
    for option, port in (("--dashboard-port", args.dashboard_port), ("--mlflow-port", args.mlflow_port)):
        if not 1 <= port <= 65535:
            raise UsageError(f"{option} {port}: a port is a number from 1 to 65535")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UsageError(f"--num-cpus {args.num_cpus}: the head offers at least 1 CPU (leave it out for all)")
    print("starting a Ray head and an MLflow server on 127.0.0.1 ...", file=sys.stderr)
    servers = local_cluster.up(args.state_dir, args.num_cpus, args.dashboard_port, args.mlflow_port)
    print(f"Ray dashboard   {servers.dashboard}")
    print(f"MLflow server   {servers.tracking_uri}")
    print(f"submit a job:   gradavg submit configs/digits.yaml workers=2 --address {servers.dashboard} "
          f"--tracking-uri {servers.tracking_uri} --follow")
    print(f"stop both:      gradavg cluster down --state-dir {args.state_dir}")
    return 0


def cmd_runs(args) -> int:
    from jobs.store import repair, resolve_uri

    for run_id, what in repair(resolve_uri(args.tracking_uri), args.run_ids):
        print(f"{run_id}: {what}")
    return 0


def cmd_data(args) -> int:
    from cluster.blocks import BlockError, read_block
    from jobs import shards
    from jobs.data import DataError

    if args.action == "check":
        if args.out:
            raise UsageError("data check takes one folder")
        try:
            manifest = shards.read_manifest(args.source)
            for split in shards.SPLITS:
                for spec in manifest.specs(split):
                    read_block(spec)
            manifest.positions_of_sources()
        except (shards.ShardError, BlockError) as e:
            raise DataError(str(e)) from None
        print(f"{manifest.folder}: {len(manifest.blocks)} blocks, every one as its manifest says "
              f"({', '.join(f'{manifest.rows(s):,} {s}' for s in shards.SPLITS)} examples)")
        return 0
    if not args.out:
        raise UsageError("data shard needs SOURCE and OUT, e.g. gradavg data shard mnist-5k data/mnist-5k")
    for name, value, low in (("--rows-per-block", args.rows_per_block, 1), ("--validation-size",
                                                                            args.validation_size, 0),
                             ("--test-size", args.test_size, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} {value}: must be at least {low}")
    from jobs.run import stop_on_signals

    stop_on_signals()  # a stopped or hung-up shard removes what it began, as Ctrl-C does
    try:
        manifest = shards.shard(args.source, args.out, args.rows_per_block, args.validation_size, args.test_size,
                                args.dtype, args.allow_pickle)
    except shards.ShardError as e:
        raise DataError(str(e)) from None
    out = Path(args.out)
    for stale in sorted(out.parent.glob(f".{out.name}.*")):
        print(f"gradavg: note: {stale} was left by a `data shard` that was killed (or one still running); remove "
              "it if none is", file=sys.stderr)
    print(f"{manifest.folder}: {len(manifest.blocks)} blocks of up to {args.rows_per_block:,} examples "
          f"({', '.join(f'{manifest.rows(s):,} {s}' for s in shards.SPLITS)}); train on it with "
          f"data={args.out} (shuffle=blocks: each Ray worker loads only its blocks)")
    return 0


def cmd_keys(args) -> int:
    from dataclasses import fields

    from jobs.config import HELP, JobConfig

    for f in fields(JobConfig):
        default = f.default if not isinstance(f.default, tuple) else list(f.default)
        print(f"{f.name:<17} {str(default):<14} {HELP[f.name]}")
    return 0


def entry() -> None:
    """The ``gradavg`` command. A Ray job ends as Ray's compiled graphs need (``cluster.driver.end_process``),
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
        if "cluster.driver" not in sys.modules:
            raise
        traceback.print_exc()
        code = 1
    if "cluster.driver" in sys.modules:
        sys.modules["cluster.driver"].end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
