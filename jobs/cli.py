"""The ``gradavg`` command line.

Errors are one line on stderr. Exit status 2 means a user's mistake (a config, a path,
an unreachable server), 1 a failed job, 130 an interrupted one.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

EPILOG = """examples:
  gradavg run configs/digits.yaml
  gradavg run configs/nielsen-ch1.yaml epochs=5 eta=2.0
  gradavg run configs/digits.yaml backend=ray workers=2
  gradavg gradcheck configs/digits.yaml
  gradavg evaluate runs:/RUN_ID --data digits

Any config key can be overridden with key=value; `gradavg keys` lists them."""


class UsageError(Exception):
    """A mistake on the command line that is not a config key's."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from cluster.errors import ClusterError
    from jobs.config import ConfigError
    from jobs.data import DataError
    from jobs.tracking import TrackingError
    from jobs.train import DivergedError

    user_errors = (ConfigError, DataError, TrackingError, UsageError, ClusterError)
    try:
        return args.handler(args)
    except user_errors as e:
        print(f"gradavg: error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"gradavg: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gradavg: interrupted; the MLflow run was ended as KILLED", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradavg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train neural networks by backpropagation, averaging gradient sums exactly, "
                    "in one process or on a Ray cluster, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train a network from a YAML config", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", help="a YAML job config, e.g. configs/digits.yaml")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                            "sqlite:///mlflow.db here)")
    run.add_argument("--quiet", action="store_true", help="print only the summary")
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
    evaluate.set_defaults(handler=cmd_evaluate)

    keys = sub.add_parser("keys", help="list the config keys, their defaults and what is valid")
    keys.set_defaults(handler=cmd_keys)
    return parser


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def cmd_run(args) -> int:
    from jobs.config import load_config
    from jobs.run import run_job
    from jobs.tracking import ui_command

    cfg = load_config(args.config, args.overrides)
    signal.signal(signal.SIGTERM, _on_sigterm)  # a stopped job ends its run KILLED, as Ctrl-C does
    result = run_job(cfg, args.tracking_uri, quiet=args.quiet)
    last = result.state.history[-1]
    validation = f", validation {100 * last.validation_accuracy:.2f}%" if last.validation_accuracy is not None else ""
    epochs = f"{last.epoch} epoch{'' if last.epoch == 1 else 's'}"
    print(f"test accuracy {100 * last.test_accuracy:.2f}%{validation} after {epochs} "
          f"({result.data.name}, {cfg.backend} backend) in {result.seconds:.1f} s")
    if result.run_id:
        print(f"MLflow run {result.run_id} in {result.tracking_uri}")
        print(f"look at it: {ui_command(result.tracking_uri)}")
    return 0


def cmd_gradcheck(args) -> int:
    from core import TOLERANCES, Network, gradient_check
    from jobs.config import load_config
    from jobs.run import prepare_data

    cfg = load_config(args.config, args.overrides)
    if args.examples < 1:
        raise UsageError(f"--examples {args.examples}: must be at least 1")
    data = prepare_data(cfg)
    network = Network.create(cfg.sizes, cfg.init, cfg.seed, cfg.cost, cfg.activation, cfg.dtype)
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCES[cfg.dtype]
    n_params = network.params.size
    print(f"checking {n_params:,} parameters of {list(cfg.sizes)} ({cfg.cost}, {cfg.dtype}) "
          f"on {args.examples} examples of {data.name}", file=sys.stderr)
    worst = gradient_check(network, data.x_train[: args.examples], data.y_train[: args.examples])
    verdict = "ok" if worst <= tolerance else "FAILED"
    print(f"worst relative error {worst:.3e} (tolerance {tolerance:.0e}): {verdict}")
    return 0 if worst <= tolerance else 1


def cmd_evaluate(args) -> int:
    from jobs.data import load_dataset

    network, run_data = _load_model(args.model, args.tracking_uri)
    spec = args.data or run_data or "digits"
    data = load_dataset(spec)
    x, y = getattr(data, f"x_{args.split}"), getattr(data, f"y_{args.split}")
    if x.shape[1] != network.sizes[0]:
        raise UsageError(f"--data {spec}: has {x.shape[1]} inputs per example but the model takes "
                         f"{network.sizes[0]}; pass the dataset it was trained on")
    if y.size == 0:
        raise UsageError(f"--split {args.split}: {spec} has no {args.split} examples")
    cost, accuracy = network.evaluate(x, y)
    print(f"{spec} {args.split} ({y.size} examples): accuracy {100 * accuracy:.2f}%, mean cost {cost:.4f}")
    return 0


def _load_model(model: str, tracking_uri: str | None):
    from core import Network

    if model.startswith("runs:/"):
        import mlflow

        from jobs.tracking import check_reachable, resolve_uri

        uri = resolve_uri(tracking_uri)
        check_reachable(uri)
        run_id = model.removeprefix("runs:/").strip("/").split("/")[0]
        client = mlflow.tracking.MlflowClient(uri)
        try:
            run = client.get_run(run_id)
            path = client.download_artifacts(run_id, "weights.npz")
        except mlflow.exceptions.MlflowException:
            raise UsageError(f"{model}: no such run with weights.npz in {uri}; check the run id "
                             "(gradavg run prints it) and --tracking-uri") from None
        return Network.load(path), run.data.params.get("data")
    if not Path(model).is_file():
        raise UsageError(f"{model}: no such file; pass a weights.npz or runs:/RUN_ID")
    try:
        return Network.load(model), None
    except (ValueError, OSError) as e:
        raise UsageError(f"{model}: cannot be loaded as weights ({e})") from None


def cmd_keys(args) -> int:
    from dataclasses import fields

    from jobs.config import HELP, JobConfig

    for f in fields(JobConfig):
        default = f.default if not isinstance(f.default, tuple) else list(f.default)
        print(f"{f.name:<17} {str(default):<14} {HELP[f.name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
