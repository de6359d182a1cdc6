"""What a user reads first: a run's name, description, params and experiment in MLflow, the line that
says where to look at it, keep=best, the served model's outputs, and the command line's own text."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS
from core import Network
from jobs.cli import build_parser, main
from jobs.config import load_config, replace
from jobs.data import load_dataset
from jobs.run import run_job, summary

DIGITS = str(CONFIGS / "digits.yaml")
# The params of a run of digits.yaml under shuffle=global: what it computes depends on these and nothing else
# (mix_blocks only matters under shuffle=blocks; test_size is null, the dataset's own hold-out)
INPUTS = {"data", "validation_size", "sizes", "cost", "activation", "init", "init_scale", "dtype", "eta", "lmbda",
          "batch_size", "early_stopping", "keep", "seed", "shuffle", "chunk_size"}
# digits at η = 6: validation accuracy 96.00% first at epoch 5, and no better at 6 or 7 (the weights differ)
BEST_AT_5 = ["epochs=7", "eta=6.0", "validation_size=300"]


def test_keep_best_logs_the_best_epochs_weights_and_the_run_says_what_happened(tracking_uri, capsys):
    assert main(["run", DIGITS, *BEST_AT_5, "keep=best"]) == 0
    out = capsys.readouterr().out.splitlines()
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id, experiment = run.info.run_id, client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its training runs

    accuracy = [m.value for m in sorted(client.get_metric_history(run_id, "accuracy/validation"),
                                        key=lambda m: m.step)]
    best = int(np.argmax(accuracy)) + 1  # the first epoch of the best, as keep=best keeps
    assert best == 5 and len(accuracy) == 7 and max(accuracy) == accuracy[-1]  # the last is as good, not kept
    assert run.data.tags["kept_epoch"] == "5"
    cfg = load_config(DIGITS, BEST_AT_5)
    at_best = run_job(replace(cfg, epochs=5, track=False), quiet=True).state.network  # epoch 5, trained alone
    weights = Network.load(client.download_artifacts(run_id, "weights.npz"))
    assert np.array_equal(weights.params, at_best.params)
    data = load_dataset("digits", validation_size=300)
    kept = 100 * weights.evaluate(data.x_validation, data.y_validation)[1]
    assert kept == accuracy[4]  # a percentage, the same bits as the metric logged at epoch 5

    # its name, its description, its params: what the run list, the Overview and a compare view show
    assert run.info.run_name == "digits epochs=7 eta=6.0 validation_size=300 keep=best"
    last = client.get_metric_history(run_id, "accuracy/test")
    text, image = run.data.tags["mlflow.note.content"].split("\n\n")
    test = 100 * weights.evaluate(data.x_test, data.y_test)[1]  # the kept weights', not the last epoch's
    assert test == sorted(last, key=lambda m: m.step)[4].value != sorted(last, key=lambda m: m.step)[-1].value
    assert text == (f"FINISHED: test accuracy {test:.2f}%, validation {accuracy[4]:.2f}% with the weights of epoch 5 "
                    "(keep=best: its best validation accuracy), after 7 epochs of 7 (digits, local backend).")
    assert image == f"![train, validation and test curves](get-artifact?path=plots%2Fcurves.png&run_uuid={run_id})"
    assert set(run.data.params) == INPUTS  # the computation's inputs, nothing else
    assert run.data.tags["epochs"] == "7"  # how long: a tag, which a resume may extend
    assert out[0].startswith(f"test accuracy {test:.2f}%, validation {accuracy[4]:.2f}% with the weights of epoch 5 "
                             "(keep=best: its best validation accuracy), after 7 epochs (digits, local backend) in ")

    # the last line: a UI on a free port, then the run's page
    ui = re.fullmatch(r"look at it: \S*mlflow ui --backend-store-uri (\S+) --host 127.0.0.1 --port (\d+), then open "
                      r"http://127.0.0.1:(\d+)/#/experiments/(\w+)/runs/(\w+)\?workflowType=machine_learning", out[-1])
    assert ui and ui[1] == tracking_uri and ui[2] == ui[3] and (ui[4], ui[5]) == (experiment.experiment_id, run_id)

    # the served model: labels, probabilities (summing to 1), activations; float32 and lists; [0, 255] refused
    import mlflow

    (model_info,) = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    model = mlflow.pyfunc.load_model(f"models:/{model_info.model_id}")
    x = data.x_test[:20]
    labels = model.predict(x)
    assert np.array_equal(labels, weights.predict(x))
    assert np.array_equal(model.predict(x.astype(np.float32)), labels)
    assert np.array_equal(model.predict(x.tolist()), labels)
    probabilities = model.predict(x, params={"output": "probabilities"})
    assert np.allclose(probabilities.sum(axis=1), 1.0) and np.array_equal(probabilities.argmax(axis=1), labels)
    activations = model.predict(x, params={"output": "activations"})
    assert np.array_equal(activations, weights.feedforward(x))
    with pytest.raises(Exception, match=r"pixels in \[0, 255\]: divide by 255; scikit-learn's digits, 0 to 16"):
        model.predict(x * 255)
    with pytest.raises(Exception, match=r"an input value is -1, but this network was trained on inputs in \[0, 1\]"):
        model.predict(x - x.max())  # centred, not scaled as trained: once answered with labels
    assert model.predict(x[:0]).shape == (0,)  # no rows, no labels (it once failed to reshape them)
    assert model.predict(x[:0], params={"output": "probabilities"}).shape == (0, 10)
    with pytest.raises(Exception, match="an input value is NaN or infinite"):
        model.predict(np.where(x > 0.5, np.nan, x))
    with pytest.raises(Exception, match="ask for one of labels, probabilities, activations"):
        model.predict(x, params={"output": "logits"})
    assert main(["evaluate", f"runs:/{run_id}", "--split", "validation"]) == 0
    assert f"accuracy {accuracy[4]:.2f}%" in capsys.readouterr().out


def test_an_existing_experiment_is_marked_as_training_runs(tracking_uri, capsys):
    """An experiment made before gradavg used it (by hand, by an older gradavg, or as MLflow's GenAI kind) opens on
    its training runs once a run goes into it; its other tags stay."""
    client = MlflowClient(tracking_uri)
    genai = client.create_experiment("digits", tags={"mlflow.experimentKind": "genai_development", "team": "a"})
    bare = client.create_experiment("bare")
    assert main(["run", DIGITS, "epochs=1"]) == 0
    assert main(["run", DIGITS, "epochs=1", "experiment=bare"]) == 0
    capsys.readouterr()
    for experiment_id in (genai, bare):
        (run,) = client.search_runs([experiment_id])  # the run went into the experiment that was there
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(genai).tags["team"] == "a"


def test_a_relative_sqlite_store_is_named_absolutely_in_what_is_printed_to_paste(tracking_uri, tmp_path, monkeypatch,
                                                                                 capsys):
    """`--tracking-uri sqlite:///runs.db` is relative to the folder the command ran in: the commands it prints
    (look at it, continue it) name the file absolutely, so that pasted elsewhere they find the same store (once
    they named a new, empty one)."""
    import shlex

    from jobs.runs import continue_command
    from jobs.store import absolute_uri, program

    assert tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and Path.cwd() == tmp_path  # the fixture's store
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["run", DIGITS, "epochs=1", "--tracking-uri", "sqlite:///mlflow.db"]) == 0  # relative to here
    look = capsys.readouterr().out.splitlines()[-1]
    assert f"--backend-store-uri {tracking_uri} --host" in look
    assert shlex.split(continue_command("ID", "sqlite:///sub/runs.db?timeout=5")) == \
        [program("gradavg"), "run", "--resume", "ID", "--tracking-uri",
         f"sqlite:///{tmp_path / 'sub' / 'runs.db'}?timeout=5"]
    odd = tmp_path / "a b'c"  # a folder whose name the shell would split, or read as a quote
    odd.mkdir()
    monkeypatch.chdir(odd)
    assert shlex.split(continue_command("ID", "sqlite:///runs.db", sweep=True, register="my 'best'"))[1:] == \
        ["sweep", "--resume", "ID", "--register", "my 'best'", "--tracking-uri", f"sqlite:///{odd / 'runs.db'}"]
    for same in (f"sqlite:///{tmp_path / 'runs.db'}", "http://127.0.0.1:5000", "file:///tmp/mlruns"):
        assert absolute_uri(same) == same


@pytest.mark.parametrize("argv, line", [
    (["run", DIGITS, "--epochs", "5"], "gradavg run: error: unrecognized arguments: --epochs 5 (config keys are "
                                       "written key=value, e.g. epochs=...); `gradavg run --help` shows the usage"),
    (["run", DIGITS, "--init-scale", "0.1"], "gradavg run: error: unrecognized arguments: --init-scale 0.1 (config "
                                             "keys are written key=value, e.g. init_scale=...); `gradavg run --help` "
                                             "shows the usage"),
    (["evaluate", "w.npz", "--split", "valid"], "gradavg evaluate: error: argument --split: invalid choice: 'valid' "
                                                "(*); `gradavg evaluate --help` shows the usage"),
    (["jobs"], "gradavg jobs: error: the following arguments are required: action; `gradavg jobs --help` shows the "
               "usage"),
])
def test_a_command_line_mistake_is_one_line(argv, line, capsys):
    """As every other mistake: one line, exit status 2 (argparse printed its whole usage first)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err  # (*): argparse's own words, which vary with Python's version
    head, _, tail = line.partition("(*)")
    assert exited.value.code == 2 and err.startswith(head) and err.endswith(tail + "\n") and err.count("\n") == 1


def test_a_registered_versions_page_opens_on_the_training_view():
    """The address a sweep prints for the version it registered on a tracking server: the page in the UI's view of
    training runs (bench/ui.py checks it in a browser: without the view, MLflow shows its GenAI menu beside it)."""
    from jobs.store import model_version_path, ui_hint

    assert ui_hint("http://127.0.0.1:5000/", model_version_path("digits best", "3")) == \
        "http://127.0.0.1:5000/#/models/digits%20best/versions/3?workflowType=machine_learning"


def test_keep_best_needs_a_validation_set():
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match="keep=best keeps the epoch of best validation accuracy, but "
                                          "validation_size=0"):
        load_config(DIGITS, ["keep=best", "validation_size=0"])


def test_the_summary_says_one_epoch_and_nests_no_parentheses():
    one = load_config(DIGITS, ["epochs=1", "track=false"])
    assert " after 1 epoch (digits, local backend) in " in summary(run_job(one, quiet=True), one)
    stopped = load_config(DIGITS, [*BEST_AT_5, "early_stopping=2", "track=false"])
    text = summary(run_job(stopped, quiet=True), stopped)
    assert text.endswith("; early stopping: validation accuracy has not improved in 2 epochs; best 96.00% at "
                         "epoch 5") and " after 7 epochs (digits, local backend) in " in text
    assert re.sub(r"\([^()]*\)", "", text).count("(") == 0  # no parenthesis inside another


def test_keys_lines_up_every_column(capsys):
    assert main(["keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "default", "meaning"]
    columns = (lines[0].index("default"), lines[0].index("meaning"))
    for line in lines[1:]:  # each column starts where its header does, after a space
        assert all(line[c - 1] == " " and line[c] != " " for c in columns), line
    assert "max_worker_failures" in {line.split()[0] for line in lines}


def test_help_examples_are_whole_lines():
    text = build_parser().format_help()
    assert re.search(r"--address http://127.0.0.1:8265 \\\n +--tracking-uri", text)  # a shell's continuation
    assert "8265   " not in text
    evaluate = build_parser().commands["evaluate"].format_help()
    assert "models:/m-ID" in evaluate and "models:/NAME/VERSION" in evaluate
