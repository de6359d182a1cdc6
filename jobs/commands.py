"""What each ``gradavg`` command does with the options ``jobs.cli`` parsed: one ``cmd_*`` function a
command, returning its exit status (an error it raises is mapped to one by ``jobs.cli``)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from jobs.errors import UsageError
from jobs.text import percent


def cmd_run(args) -> int:
    from jobs.config import load_job
    from jobs.run import complete, run_job, summary
    from jobs.stopping import stop_on_signals
    from jobs.store import resolve_uri, run_path, ui_hint

    _check_force(args)
    if args.resume:
        cfg = job_config(args, resolve_uri(args.tracking_uri))
    elif args.config is None:
        raise UsageError("gradavg run needs a config, e.g. gradavg run configs/digits.yaml ('-' for the defaults "
                         "and key=value overrides alone), or --resume RUN_ID")
    else:
        cfg = load_job(args.config, args.overrides)
    stop_on_signals()  # a stopped job, or one whose terminal closed, ends its run KILLED, as Ctrl-C does
    result = run_job(cfg, args.tracking_uri, quiet=args.quiet, resume=args.resume, force=args.force)
    look = f"look at it: {ui_hint(result.tracking_uri, run_path(result.experiment_id, result.run_id))}" \
        if result.run_id else ""
    if result.already_complete:
        print(complete(result.run_id, result.state))
        print(look)
        return 0
    print(summary(result, cfg))
    if result.run_id:
        print(f"MLflow run {result.run_id} in {result.tracking_uri}")
        print(look)
    return 0


def job_config(args, uri: str, fetched=None):
    """The config of ``--resume RUN_ID``: the config file and overrides given, checked against the run's
    as before; or, with no file (overrides alone, or nothing), the run's own config from its checkpoint,
    then the overrides. Never the stored ``allow_pickle``: a store may not widen what a command does, so
    data the book's pickle holds needs ``allow_pickle=true`` on the command line again."""
    from jobs.config import load_config, with_overrides

    overrides = list(args.overrides)
    if args.config is not None and args.config != "-" and "=" in args.config and not Path(args.config).exists():
        args.config, args.overrides = None, [args.config, *overrides]  # `--resume ID epochs=40`: an override
        overrides = args.overrides
    if args.config is not None:
        return load_config(None if args.config == "-" else args.config, overrides)
    if fetched is None:
        from jobs.runs import fetch_checkpoint

        fetched = fetch_checkpoint(uri, args.resume)
    return with_overrides({**fetched[2].to_dict(), "allow_pickle": False}, overrides)


def _gradavg() -> str:
    """gradavg as a printed command runs it when pasted (``jobs.store.program``)."""
    from jobs.store import program

    return program("gradavg")


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
    from jobs.models import load_model, run_split
    from jobs.shards import is_sharded

    network, params = load_model(args.model, args.tracking_uri)
    spec = args.data or params.get("data") or "digits"
    # the run's own split of its data, so that its validation and test examples are the ones it held out
    split = run_split(params) if spec == params.get("data") else {}
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
    print(f"{spec} {args.split} ({y.size} examples): accuracy {percent(accuracy):.2f}%, mean cost {cost:.4f}")
    return 0


def cmd_submit(args) -> int:
    from jobs import submit
    from jobs.config import load_job
    from jobs.store import resolve_uri

    _check_force(args)
    if args.config is None and not args.resume:
        raise UsageError("gradavg submit needs a config, e.g. gradavg submit configs/digits.yaml --address "
                         "http://HOST:8265, or --resume RUN_ID")
    if not args.resume:
        cfg = load_job(args.config, args.overrides)  # validated here, before anything is sent
    if not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise UsageError("a job on a cluster needs a tracking server it can reach: pass --tracking-uri "
                         "http://HOST:5000 or set MLFLOW_TRACKING_URI (`gradavg cluster up` starts one here)")
    uri = resolve_uri(args.tracking_uri)
    address = submit.resolve_address(args.address)
    if args.resume:  # what can be checked here is, before the job is sent
        from jobs.claims import refuse_if_driven
        from jobs.run import check_resume_config, complete
        from jobs.runs import fetch_checkpoint

        submit.check_tracking_uri(uri, address)
        fetched = run, state, saved = fetch_checkpoint(uri, args.resume)
        cfg = job_config(args, uri, fetched)
        refuse_if_driven(run, f"--resume {args.resume}")
        check_resume_config(args.resume, state, saved, cfg, args.force, finished=run.info.status == "FINISHED")
        if run.info.status == "FINISHED" and (state.epoch >= cfg.epochs or state.stopped):  # no job to send
            print(complete(args.resume, state))
            return 0
    submit.check_data(cfg)
    job_id = submit.submit(cfg, address, uri, resume=args.resume, force=args.force,
                           described=_as_given(args, args.resume))
    print(job_id)
    if not args.follow:
        print(f"follow it: {_gradavg()} jobs logs {job_id} --follow --address {address}", file=sys.stderr)
        return 0
    state = submit.follow(address, job_id)
    print(f"job {job_id} {state}", file=sys.stderr)
    _print_run_of(address, job_id)
    return 0 if state == "SUCCEEDED" else 1


def _as_given(args, resumed: str | None) -> str:
    """A submitted job's config and overrides as the command line gave them (its row of `gradavg jobs list`)."""
    return " ".join([args.config or f"--resume {resumed}", *args.overrides])


def _print_run_of(address: str, job_id: str) -> None:
    """A followed job's last line: its run's page in the MLflow UI (where the store answers)."""
    from jobs import job_views

    try:
        url = job_views.run_url_of(address, job_id)
    except Exception:  # the job is done either way: its address is a courtesy
        return
    if url:
        print(f"look at it: {url}", file=sys.stderr)


def cmd_sweep(args) -> int:
    from jobs import runs, sweep_report, sweep_run
    from jobs.stopping import default_stop_signals, stop_on_signals
    from jobs.store import resolve_uri, run_path, ui_hint
    from jobs.sweep import check_options

    check_options(args)
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
            stop_on_signals()  # a stopped sweep, or one whose terminal closed, ends its runs KILLED, as Ctrl-C does
        parent_id = sweep_run.start(plan, uri, driven_here=not args.address, register=args.register)
    if args.address:
        return _submit_sweep(args, uri, parent_id, plan.base.allow_pickle)
    stop_on_signals()
    result = sweep_run.run_sweep(plan, uri, parent_id, args.at_once, on_ray=args.trials_on_ray,
                                 register=args.register, claimed=not args.resume)
    default_stop_signals()
    print(sweep_report.table_text(plan, result.rows))
    print(sweep_report.best_line(result))
    print(f"MLflow sweep run {parent_id} in {uri}")
    print(f"look at it: {ui_hint(uri, run_path(result.experiment_id, parent_id))}")
    failed = [r for r in result.rows if r.status != "FINISHED"]
    if failed:
        again = runs.continue_command(parent_id, uri, sweep=True, register=args.register)
        print(f"gradavg: {len(failed)} of {len(result.rows)} trials did not finish (the table's status column); "
              f"`{again}` runs them again (from their checkpoints, where they have one)", file=sys.stderr)
    return 1 if failed else 0


def _submit_sweep(args, uri: str, parent_id: str, allow_pickle: bool) -> int:
    from jobs import runs, submit
    from jobs.store import open_store

    try:
        command = submit.sweep_entrypoint(parent_id, uri, args.at_once, args.register, allow_pickle)
        job_id = submit.send(command, args.address, uri, {submit.KIND: "sweep", submit.DESCRIBED:
                                                          _as_given(args, parent_id), submit.RUN: parent_id})
    except BaseException as e:
        if not args.resume:  # the parent run of a sweep that never started (or whose sending was stopped)
            runs.close(open_store(uri), parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    print(job_id)
    address = submit.resolve_address(args.address)
    print(f"sweep run {parent_id}; follow it: {_gradavg()} jobs logs {job_id} --follow --address {address}",
          file=sys.stderr)
    if not args.follow:
        return 0
    state = submit.follow(address, job_id)
    print(f"job {job_id} {state}", file=sys.stderr)
    _print_run_of(address, job_id)
    return 0 if state == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from jobs import job_views, submit

    if args.action == "list":
        print(job_views.table(args.address))
        return 0
    address = submit.resolve_address(args.address)
    if not args.job_id:
        raise UsageError(f"gradavg jobs {args.action} needs a JOB_ID (`gradavg jobs list --address {address}` shows "
                         "them)")
    if args.action == "status":
        print(job_views.status(address, args.job_id))
    elif args.action == "logs":
        if args.follow:
            state = submit.follow(address, args.job_id)
            return 0 if state == "SUCCEEDED" else 1
        sys.stdout.write(submit.logs(address, args.job_id))
    elif args.action == "stop":
        submit.stop(address, args.job_id)
        state = submit.wait(address, args.job_id, timeout=60)
        print(f"job {args.job_id} {state}")
        try:
            hint = job_views.continue_hint(address, args.job_id)
        except Exception:  # the job is stopped either way: the hint is a courtesy
            hint = ""
        if hint:
            print(hint, file=sys.stderr)
    return 0


def cmd_cluster(args) -> int:
    from jobs import local_cluster
    from jobs.store import PROJECT_ROOT

    state = Path(args.state_dir).resolve()  # printed commands work pasted in any folder
    if args.action == "down":
        stopped = local_cluster.down(args.state_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing to stop: {state / 'cluster.json'} is absent "
                                                                "(pass the --state-dir that `cluster up` was given)")
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
    config = PROJECT_ROOT / "configs" / "digits.yaml"  # a checkout's (an installed wheel has no configs/)
    config = shlex.quote(str(config)) if config.exists() else "configs/digits.yaml"
    print(f"submit a job:   {_gradavg()} submit {config} "
          "workers=2 chunk_size=5 --address "
          f"{servers.dashboard} "
          f"--tracking-uri {servers.tracking_uri} --follow")
    print(f"Ray's status:   {local_cluster.status_command(servers)}")
    print(f"stop both:      {_gradavg()} cluster down --state-dir {shlex.quote(str(state))}")
    return 0


def cmd_runs(args) -> int:
    from jobs.claims import repair
    from jobs.store import resolve_uri

    uri = resolve_uri(args.tracking_uri)
    repaired = repair(uri, args.run_ids)
    for run_id, what in repaired:
        print(f"{run_id}: {what}")
    if not repaired:
        print(f"nothing to repair: no run in {uri} is RUNNING without its driver")
    return 0


def cmd_data(args) -> int:
    from cluster.blocks import BlockError, read_block
    from jobs import shards
    from jobs.data import DataError, shard

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
    from jobs.stopping import stop_on_signals

    stop_on_signals()  # a stopped or hung-up shard removes what it began, as Ctrl-C does
    try:
        manifest = shard(args.source, args.out, args.rows_per_block, args.validation_size, args.test_size,
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

    rows = [(f.name, str(list(f.default) if isinstance(f.default, tuple) else f.default), HELP[f.name])
            for f in fields(JobConfig)]
    widths = [max(len(row[i]) for row in rows) for i in (0, 1)]
    print(f"{'key':<{widths[0]}}  {'default':<{widths[1]}}  meaning")
    for name, default, meaning in rows:
        print(f"{name:<{widths[0]}}  {default:<{widths[1]}}  {meaning}")
    return 0
