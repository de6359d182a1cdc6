"""Sweeps on this machine: the plan, the scheduler and early stopping against values worked out by
hand; whole sweeps against the trials run alone (the same bits), the parent run's table and best
trial against the children's own metrics; the book's η experiment; failures, stops and resumes."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, holding_at
from core import Network
from jobs.cli import main
from jobs.config import ConfigError, load_config
from jobs.run import run_job
from jobs.sweep import SuccessiveHalving, make_plan, parse_axis, plan_from
from jobs.sweep_run import latest_children
from jobs.train import EpochResult, TrainingState, early_stop, initial_state

DIGITS = str(CONFIGS / "digits.yaml")


# -- the plan

def test_a_grid_is_every_combination_in_the_order_given():
    plan = plan_from(DIGITS, ["validation_size=300", "eta=0.5,3", "lmbda=0,1", "epochs=2"], None)
    assert [t.values for t in plan.trials] == [{"eta": 0.5, "lmbda": 0.0}, {"eta": 0.5, "lmbda": 1.0},
                                               {"eta": 3.0, "lmbda": 0.0}, {"eta": 3.0, "lmbda": 1.0}]
    assert [t.number for t in plan.trials] == [1, 2, 3, 4]
    for t in plan.trials:  # each an ordinary config: the base, the values, one core, its own name
        assert (t.config.eta, t.config.lmbda, t.config.epochs, t.config.validation_size) == \
            (t.values["eta"], t.values["lmbda"], 2, 300)
        assert (t.config.threads, t.config.backend) == (1, "local")
        assert t.config.run_name == (f"digits validation_size=300 epochs=2 trial {t.number}: eta={t.values['eta']} "
                                     f"lmbda={t.values['lmbda']}")


def test_lists_and_text_are_grid_values():
    plan = plan_from(DIGITS, ["validation_size=300", "sizes=[64,30,10],[64,100,10]", "cost=quadratic,cross_entropy"],
                     None)
    assert [(t.config.sizes, t.config.cost) for t in plan.trials] == [
        ((64, 30, 10), "quadratic"), ((64, 30, 10), "cross_entropy"),
        ((64, 100, 10), "quadratic"), ((64, 100, 10), "cross_entropy")]
    assert parse_axis("sizes", [[64, 30, 10], [64, 10]]).values == ((64, 30, 10), (64, 10))


def test_ranges_are_drawn_within_their_ends_and_again_the_same(tmp_path):
    texts = ["validation_size=300", "eta=log(0.01,10)", "batch_size=[10,100]", "lmbda=0,1"]
    plan = plan_from(DIGITS, texts, 5)
    assert len(plan.trials) == 10  # the grid of 2 for each of 5 samples
    etas = [t.values["eta"] for t in plan.trials]
    sizes = [t.values["batch_size"] for t in plan.trials]
    assert all(0.01 <= e <= 10 for e in etas) and all(10 <= b <= 100 and isinstance(b, int) for b in sizes)
    assert etas[0::2] == etas[1::2]  # a sample's draws are shared by its grid's trials
    assert len(set(etas)) == 5
    assert [t.values for t in plan_from(DIGITS, texts, 5).trials] == [t.values for t in plan.trials]
    other = plan_from(DIGITS, texts + ["seed=1"], 5)
    assert [t.values for t in other.trials] != [t.values for t in plan.trials]


def test_a_configs_sweep_section_and_the_command_line(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text("validation_size: 300\nsweep:\n  eta: [0.5, 3.0]\n  lmbda: 0,1\n")
    assert [t.values for t in plan_from(str(config), [], None).trials][1] == {"eta": 0.5, "lmbda": 1.0}
    # the command line's axis replaces the section's
    assert [t.values["eta"] for t in plan_from(str(config), ["eta=1,2,4"], None).trials][::2] == [1.0, 2.0, 4.0]
    with pytest.raises(ConfigError, match="has a sweep: section"):
        load_config(config)
    plan = plan_from(str(CONFIGS / "sweep-eta.yaml"), [], None)
    assert [t.config.eta for t in plan.trials] == [0.025, 0.25, 2.5]


def test_the_plan_survives_its_round_trip():
    from jobs.sweep import Plan

    plan = plan_from(DIGITS, ["validation_size=300", "eta=log(0.01,10)", "sizes=[64,30,10],[64,10]"], 3,
                     {"name": "asha", "grace": 1, "reduction": 3})
    again = Plan.from_dict(plan.to_dict())
    assert [(t.number, t.values, t.config) for t in again.trials] == [(t.number, t.values, t.config)
                                                                       for t in plan.trials]
    assert again.scheduler == plan.scheduler and again.base == plan.base


# -- the scheduler and early stopping

def test_successive_halving_on_crafted_values():
    asha = SuccessiveHalving(max_epochs=30, grace=1, reduction=3)
    assert list(asha.rungs) == [1, 3, 9, 27]
    assert asha.report(1, 1, 50.0) is None  # first at its rung: nothing to compare with
    assert asha.report(2, 2, 10.0) is None  # epoch 2 is no rung
    assert asha.report(2, 1, 80.0) is None  # [50] before it: the cutoff is 50
    why = asha.report(3, 1, 60.0)  # [50, 80] before it: the 2/3 quantile is 50 + (80 - 50) * 2/3 = 70
    assert why is not None and "60.00% at epoch 1 is below 70.00%" in why and "of the 2 trials" in why
    assert asha.report(4, 1, 67.0) is None  # [50, 80, 60]: 60 + (80 - 60) / 3 = 66.67, not above 67
    assert asha.report(5, 1, 66.0) is not None  # [50, 80, 60, 67]: 67 + (80 - 67) * 0 = 67
    assert asha.report(3, 1, 0.0) is None  # trial 3 was decided at this rung already
    assert asha.report(1, 3, 90.0) is None and asha.rungs[1] == {1: 50.0, 2: 80.0, 3: 60.0, 4: 67.0, 5: 66.0}


def _epoch(epoch: int, accuracy: float | None) -> EpochResult:
    return EpochResult(epoch, epoch * 10, 1.0, 0.5, 1.0, accuracy, 1.0, 0.5, 0.1, 100.0)


@pytest.mark.parametrize("accuracies, patience, stops_at", [
    ([0.5, 0.6, 0.6, 0.6, 0.7], 2, 4),  # 0.6 at epoch 2 is not beaten by epochs 3 and 4: stop after 4
    ([0.5, 0.6, 0.6, 0.7, 0.6, 0.6], 2, 6),  # 0.7 at epoch 4; epochs 5 and 6 do not beat it
    ([0.5, 0.4, 0.6, 0.5, 0.7, 0.6], 2, None),  # a new best every other epoch
    ([0.9, 0.8, 0.7], 1, 2),
    ([0.9, 0.8, 0.7], 0, None),  # 0: never
])
def test_early_stopping_on_a_crafted_history(accuracies, patience, stops_at):
    cfg = load_config(DIGITS, ["validation_size=300", f"early_stopping={patience}"])
    state = TrainingState(initial_state(cfg).network, np.random.default_rng(0))
    stopped = None
    for epoch, accuracy in enumerate(accuracies, start=1):
        if early_stop(cfg, state, _epoch(epoch, accuracy)):
            stopped = epoch
            break
    assert stopped == stops_at


def test_early_stopping_stops_a_run_where_its_metrics_say(tracking_uri, capsys):
    args = ["run", DIGITS, "validation_size=300", "early_stopping=2", "epochs=40", "--quiet"]
    assert main(args) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    accuracy = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "accuracy/validation"),
                                        key=lambda m: m.step)]
    best = max(range(len(accuracy)), key=lambda i: (accuracy[i], -i))  # the first epoch of the best
    assert len(accuracy) == best + 1 + 2 < 40  # two epochs after the best, none better: stopped
    assert max(accuracy[best + 1:]) <= accuracy[best]
    assert run.info.status == "FINISHED" and run.data.tags["stopped_epoch"] == str(len(accuracy))
    assert run.data.tags["stopped_reason"].endswith(f"at epoch {best + 1}")
    capsys.readouterr()
    assert main(["run", DIGITS, "validation_size=300", "early_stopping=2", "epochs=40", "--resume",
                 run.info.run_id]) == 0
    assert "is already complete" in capsys.readouterr().out


# -- whole sweeps

def _solo_weights(cfg) -> Network:
    """The trial's config as `gradavg run` runs it alone, untracked, on every core."""
    from jobs.config import replace

    return run_job(replace(cfg, track=False, threads=0, run_name=None), quiet=True).state.network


def _child_weights(client, run_id) -> Network:
    return Network.load(client.download_artifacts(run_id, "weights.npz"))


def _sweep_runs(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "sweep_keys" in r.data.tags]
    return client, parents, runs


def test_a_local_grid_of_four_trials(tracking_uri, capsys):
    args = ["sweep", DIGITS, "validation_size=300", "epochs=3", "eta=0.5,3.0", "lmbda=0,1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    client, (parent,), runs = _sweep_runs(tracking_uri)
    children = latest_children(client, parent.info.run_id)
    assert sorted(children) == [1, 2, 3, 4] and len(runs) == 5
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children.values())
    assert parent.data.params["eta"] == "0.5,3.0" and parent.data.params["trials"] == "4"
    assert parent.data.tags["mlflow.source.name"] == "gradavg sweep"
    plan = plan_from(DIGITS, args[2:], None)
    best, table = None, []
    for trial in plan.trials:
        child = children[trial.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["mlflow.source.name"] == "gradavg sweep"  # a trial says the sweep started it
        assert (float(child.data.params["eta"]), float(child.data.params["lmbda"])) == \
            (trial.values["eta"], trial.values["lmbda"])
        # each child is what a solo run of its config computes, to the bit
        assert np.array_equal(_child_weights(client, child.info.run_id).params, _solo_weights(trial.config).params)
        accuracy = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "accuracy/validation"),
                                            key=lambda m: m.step)]
        top = max(accuracy)
        table.append((trial.number, top, accuracy.index(top) + 1, child.info.run_id))
        if best is None or top > best[1]:
            best = (trial.number, top, child.info.run_id)
    assert parent.data.tags["best_run_id"] == best[2] and parent.data.tags["best_trial"] == str(best[0])
    assert parent.data.metrics == {}  # nothing a chart would draw as if the parent were a trial
    assert parent.data.tags["best_validation_accuracy"] == f"{best[1]:.2f}%"  # a percentage, as every accuracy
    assert parent.data.tags["mlflow.note.content"].startswith(
        f"A sweep of eta, lmbda: 4 trials, 4 FINISHED. Best: trial {best[0]} (")
    with open(client.download_artifacts(parent.info.run_id, "trials.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["trial"]), float(r["best_validation_accuracy"]), int(r["best_epoch"]), r["run_id"])
            for r in rows] == [(n, pytest.approx(a, abs=1e-4), e, i) for n, a, e, i in table]
    assert {r["status"] for r in rows} == {"FINISHED"} and [r["eta"] for r in rows] == ["0.5", "0.5", "3.0", "3.0"]
    plots = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"validation_accuracy_vs_eta.png", "validation_accuracy_vs_lmbda.png",
                     "validation_curves.png", "training_cost_curves.png"}
    assert f"best: trial {best[0]} " in out and best[2] in out


def test_a_failed_trial_is_a_row_and_the_sweep_goes_on(tracking_uri, capsys):
    # L2 decay this strong overflows the weights in epoch 2 (as in test_resume's divergence)
    assert main(["sweep", DIGITS, "validation_size=300", "epochs=3", "lmbda=0,21459"]) == 1
    captured = capsys.readouterr()
    client, (parent,), _ = _sweep_runs(tracking_uri)
    children = latest_children(client, parent.info.run_id)
    assert children[1].info.status == "FINISHED" and children[2].info.status == "FAILED"
    assert "training diverged" in children[2].data.tags["failure"]
    with open(client.download_artifacts(parent.info.run_id, "trials.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED"] and "training diverged" in rows[1]["cause"]
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == "1"
    assert "trial 2/2 (lmbda=21459.0): FAILED: the mini-batch cost became nan" in captured.err
    assert "1 of 2 trials did not finish" in captured.err


def test_the_scheduler_stops_a_hopeless_trial(tracking_uri):
    args = ["sweep", DIGITS, "validation_size=300", "epochs=4", "eta=3.0,0.001", "--scheduler", "asha",
            "--grace", "1", "--reduction", "2", "--at-once", "1"]
    assert main(args) == 0
    client, (parent,), _ = _sweep_runs(tracking_uri)
    children = latest_children(client, parent.info.run_id)
    good, hopeless = children[1], children[2]
    assert "stopped_epoch" not in good.data.tags
    assert len(client.get_metric_history(good.info.run_id, "accuracy/validation")) == 4
    assert hopeless.info.status == "FINISHED" and hopeless.data.tags["stopped_epoch"] == "1"
    assert hopeless.data.tags["stopped_reason"].startswith("successive halving: validation accuracy")
    assert len(client.get_metric_history(hopeless.info.run_id, "accuracy/validation")) == 1
    assert parent.data.params["scheduler"] == "asha (grace 1, reduction 2)"


def test_the_books_eta_experiment(tracking_uri):
    """Chapter 3's figure: too large a rate oscillates, too small a one crawls (configs/sweep-eta.yaml)."""
    assert main(["sweep", str(CONFIGS / "sweep-eta.yaml")]) == 0
    client, (parent,), _ = _sweep_runs(tracking_uri)
    costs = {}
    for child in latest_children(client, parent.info.run_id).values():
        history = sorted(client.get_metric_history(child.info.run_id, "cost/train"), key=lambda m: m.step)
        costs[float(child.data.params["eta"])] = [m.value for m in history]
    small, right, large = costs[0.025], costs[0.25], costs[2.5]
    assert len(small) == len(right) == len(large) == 30
    assert all(b < a for a, b in zip(small, small[1:]))  # η = 0.025 falls every epoch ...
    assert all(s > r for s, r in zip(small, right))  # ... but stays above η = 0.25 all along: it crawls
    big_rises = [sum(b > 1.1 * a for a, b in zip(c, c[1:])) for c in (right, large)]
    assert big_rises[0] == 0 and big_rises[1] >= 5  # η = 2.5 jumps up by over 10% again and again
    assert right[-1] < min(small[-1], large[-1])  # η = 0.25 ends lowest
    assert min(large) > min(right)


# -- stopping and resuming a sweep's driver

def _start_sweep(uri: str, *args: str, hold: int) -> subprocess.Popen:
    """A sweep's driver whose trials hold after epoch ``hold`` until killed (``conftest.holding_at``)."""
    env = {**holding_at(hold), "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "sweep", *args], cwd=os.getcwd(), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a group of its own, as a terminal's job is


def _wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def _trial_with_checkpoint(client, number):
    def check():
        parents = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                   if "sweep_keys" in r.data.tags]
        if not parents:
            return None
        child = latest_children(client, parents[0].info.run_id).get(number)
        if child and client.list_artifacts(child.info.run_id, "checkpoints"):
            return parents[0], child
        return None
    return check


# about 6 s of training a trial: a checkpoint reaches the store every 2 s while it trains
QUICK = ["validation_size=300", "diagnostics=false"]


def test_a_killed_sweep_resumes_to_the_same_bits(tracking_uri, capsys):
    process = _start_sweep(tracking_uri, "-", *QUICK, "epochs=2,5", "--at-once", "1", hold=3)
    client = MlflowClient(tracking_uri)
    try:
        parent, child = _wait_for(_trial_with_checkpoint(client, 2))  # trial 1 done, trial 2 under way (held)
    finally:
        process.kill()  # the driver, outright: its trial dies with it (and ends its run KILLED)
        process.communicate()
    parent_id = parent.info.run_id
    _wait_for(lambda: client.get_run(child.info.run_id).info.status != "RUNNING", 30)
    before = latest_children(client, parent_id)
    assert before[1].info.status == "FINISHED"
    assert main(["sweep", "--resume", parent_id]) == 0
    assert "(1 finished before, 1 to run)" in capsys.readouterr().err
    after = latest_children(client, parent_id)
    assert after[1].info.run_id == before[1].info.run_id and after[2].info.run_id == child.info.run_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in after.values())
    for trial in plan_from("-", QUICK + ["epochs=2,5"], None).trials:
        assert np.array_equal(_child_weights(client, after[trial.number].info.run_id).params,
                              _solo_weights(trial.config).params)
    assert main(["sweep", "--resume", parent_id]) == 0
    assert "is already complete: every trial FINISHED" in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_stopped_sweep_leaves_no_run_running(tracking_uri, stop):
    """SIGTERM to the driver is what `gradavg jobs stop` sends a submitted sweep's; SIGHUP to its process group
    is what a closed terminal or a dropped ssh session sends a sweep and its trials."""
    process = _start_sweep(tracking_uri, "-", *QUICK, "epochs=3", "eta=0.5,3.0,1.0", "--at-once", "2", hold=1)
    client = MlflowClient(tracking_uri)
    def both_running():
        found = _trial_with_checkpoint(client, 1)()
        return found and len(latest_children(client, found[0].info.run_id)) == 2

    try:
        _wait_for(both_running)  # two trials at once on 2 cores, both under way (held after epoch 1)
        if stop == "SIGTERM":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGHUP)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + getattr(signal, stop), err
    assert "stopping the sweep" in err
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 3  # the parent and two trials


def test_resume_of_a_run_that_is_not_a_sweep(tracking_uri, capsys):
    assert main(["run", DIGITS, "epochs=1", "--quiet"]) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    capsys.readouterr()
    assert main(["sweep", "--resume", run.info.run_id]) == 2
    assert "that run is not a sweep's" in capsys.readouterr().err


def test_bad_values_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="a sweep runs at most 500"):
        plan_from(DIGITS, ["validation_size=300", "eta=log(0.1,1)"], 501)
    with pytest.raises(ConfigError, match=r"eta=-1.0: the learning rate"):
        plan_from(DIGITS, ["validation_size=300", "eta=0.1,-1"], None)
    assert math.isclose(make_plan(load_config(DIGITS, ["validation_size=300"]), [parse_axis("eta", "[1,2]")],
                                  1).trials[0].values["eta"], 1.5, abs_tol=0.5)


def test_the_best_model_is_registered(tracking_uri, capsys):
    """keep=best: the registered model is the best trial's best epoch, the one the sweep reports, and its version
    says so."""
    import mlflow

    assert main(["sweep", DIGITS, "epochs=3", "eta=0.5,3.0", "keep=best", "--register", "digits-best"]) == 0
    out, err = capsys.readouterr()
    assert "registered trial 2's model as models:/digits-best/1" in err and "note:" not in err
    assert "Successfully registered" not in err and "Created version" not in err  # gradavg's line says it, once
    client, (parent,), _ = _sweep_runs(tracking_uri)
    tags = parent.data.tags
    assert tags["registered_model"] == "models:/digits-best/1"
    best = _child_weights(client, tags["best_run_id"])
    model = mlflow.pyfunc.load_model("models:/digits-best/1")
    from jobs.data import load_dataset

    x = load_dataset("digits", validation_size=200).x_test
    assert np.array_equal(model.predict(x), best.predict(x))
    assert main(["evaluate", "models:/digits-best/1", "--split", "validation"]) == 0
    assert f"accuracy {tags['best_validation_accuracy']}" in capsys.readouterr().out  # what the sweep reported
    assert f"validation accuracy {tags['best_validation_accuracy']} at epoch {tags['best_epoch']}" in out
    version = client.get_model_version("digits-best", "1")
    assert version.tags == {"sweep_run_id": parent.info.run_id, "run_id": tags["best_run_id"], "trial": "2",
                            "eta": "3.0", "validation_accuracy": tags["best_validation_accuracy"],
                            "kept_epoch": tags["best_epoch"], "best_epoch": tags["best_epoch"]}
    assert version.description.startswith(f"The best trial (trial 2: eta=3.0) of sweep run {parent.info.run_id}")


def test_a_stopped_sweeps_continue_command_still_registers_its_model(tracking_uri, capsys, monkeypatch):
    """A sweep started with --register and stopped: the command it prints to continue it repeats --register (once
    it did not, and the continued sweep registered nothing); continued without it, the sweep says how to register."""
    from jobs import store, sweep_run

    real = sweep_run._run_trials

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C as the trials start

    monkeypatch.setattr(sweep_run, "_run_trials", stopped)
    assert main(["sweep", DIGITS, "epochs=2", "eta=0.5,3.0", "validation_size=300", "--register", "my best"]) == 130
    client, (parent,), _ = _sweep_runs(tracking_uri)
    parent_id = parent.info.run_id
    gradavg = store.program("gradavg")
    again = f"{gradavg} sweep --resume {parent_id} --register 'my best' --tracking-uri {tracking_uri}"
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"resume from their checkpoints): {again}")
    monkeypatch.setattr(sweep_run, "_run_trials", real)
    assert main(["sweep", "--resume", parent_id]) == 0  # without it: registers nothing, says how
    assert "note: this sweep was started with --register 'my best', and its best trial's model is not registered " \
           "yet: pass --register 'my best' to register it" in capsys.readouterr().err
    assert not client.search_registered_models()
    import shlex

    assert main(shlex.split(again)[1:]) == 0  # the command it printed, pasted
    assert "registered trial 2's model as models:/my best/1" in capsys.readouterr().err
    assert client.get_run(parent_id).data.tags["registered_model"] == "models:/my best/1"


def test_a_trial_whose_process_dies_fails_and_resumes(tracking_uri, capsys):
    import psutil

    process = _start_sweep(tracking_uri, "-", *QUICK, "epochs=4,2", "--at-once", "1", hold=3)
    client = MlflowClient(tracking_uri)
    try:
        parent, child = _wait_for(_trial_with_checkpoint(client, 1))  # held after epoch 3 of 4
        (trial,) = [p for p in psutil.Process(process.pid).children()
                    if "spawn_main" in " ".join(p.cmdline())]  # trial 1's process
        trial.kill()  # as the kernel's out-of-memory killer would
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, err
    assert "trial 1/2 (epochs=4): FAILED: the trial's process died (exit code -9)" in err
    assert "trial 2/2 (epochs=2): FINISHED after 2 epochs" in err
    children = latest_children(client, parent.info.run_id)
    assert children[1].info.status == "FAILED" and children[2].info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert main(["sweep", "--resume", parent.info.run_id]) == 0  # trial 1 from its checkpoint, in its own run
    after = latest_children(client, parent.info.run_id)
    assert after[1].info.run_id == child.info.run_id and after[1].info.status == "FINISHED"
    (first,) = [t for t in plan_from("-", QUICK + ["epochs=4,2"], None).trials if t.number == 1]
    assert np.array_equal(_child_weights(client, child.info.run_id).params, _solo_weights(first.config).params)


def test_a_sweep_killed_before_its_first_checkpoints_resumes_with_one_run_per_trial(tracking_uri):
    process = _start_sweep(tracking_uri, "-", *QUICK, "epochs=2", "eta=0.5,3.0", "--at-once", "2", hold=0)
    client = MlflowClient(tracking_uri)

    def both_started():  # each trial holds before its first epoch
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        parents = [r for r in runs if "sweep_keys" in r.data.tags]
        return parents and len(runs) == 3 and parents[0]

    try:
        parent = _wait_for(both_started, 120)
    finally:
        process.kill()
        process.communicate()
    _wait_for(lambda: all(c.info.status != "RUNNING" for c in latest_children(client, parent.info.run_id).values()))
    assert main(["sweep", "--resume", parent.info.run_id]) == 0
    runs = client.search_runs([parent.info.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # no run left over for a trial


def test_a_job_that_fails_while_it_is_being_stopped_ends_killed(tracking_uri, monkeypatch):
    from jobs import run
    from jobs.train import Hooks

    class StopThenFail(Hooks):  # a library that turns the interrupt into an error of its own
        def on_epoch_end(self, result, state):
            run.STOPPING.set()
            raise RuntimeError("interrupted")

    monkeypatch.setattr(run, "STOPPING", __import__("threading").Event())
    with pytest.raises(RuntimeError):
        run_job(load_config(DIGITS, ["epochs=2"]), tracking_uri, quiet=True, hooks=(StopThenFail(),))
    client = MlflowClient(tracking_uri)
    (only,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert only.info.status == "KILLED"
