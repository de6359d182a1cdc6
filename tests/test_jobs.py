"""The training job end to end: configs, the loop, MLflow tracking and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, ROOT, error_line
from core import Network
from jobs.cli import main
from jobs.config import ConfigError, load_config

PER_EPOCH = ["cost/train", "accuracy/train", "cost/validation", "accuracy/validation", "cost/test",
             "accuracy/test", "epoch_seconds", "examples_per_second"]


def only_run(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.status for r in runs]
    return client, runs[0]


def test_digits_run_end_to_end(tracking_uri, capsys):
    from test_what_users_see import INPUTS

    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=4", "log_every=20", "--quiet"]) == 0
    out = capsys.readouterr().out
    client, run = only_run(tracking_uri)
    assert run.info.run_id in out and "mlflow ui --backend-store-uri" in out and "127.0.0.1" in out
    assert run.info.status == "FINISHED"
    cfg = load_config(CONFIGS / "digits.yaml", ["epochs=4", "log_every=20"])
    assert run.data.params == {k: str(v) for k, v in cfg.to_dict().items() if k in INPUTS}  # inputs only
    assert run.data.tags["backend"] == "local" and run.data.tags["dataset"] == "digits"
    assert len(run.data.tags["dataset_digest"]) == 64 and run.data.tags["gradavg_version"]
    for key in PER_EPOCH:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3, 4], key
    n_train = 1797 - 359 - 200
    steps = 4 * -(-n_train // 10)
    assert len(client.get_metric_history(run.info.run_id, "batch_cost")) == steps // 20
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "weights.npz", "plots", "checkpoints"} <= top
    for png in ("plots/curves.png", "plots/confusion_matrix.png"):
        assert open(client.download_artifacts(run.info.run_id, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert run.inputs.dataset_inputs[0].dataset.name == "digits"

    network = Network.load(client.download_artifacts(run.info.run_id, "weights.npz"))
    test_acc = client.get_metric_history(run.info.run_id, "accuracy/test")[-1].value
    from jobs.data import load_dataset

    data = load_dataset("digits", validation_size=200)
    assert 100 * network.evaluate(data.x_test, data.y_test)[1] == test_acc  # a percentage: the same bits
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]
    model = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    assert model.metadata.signature is not None
    assert np.array_equal(model.predict(data.x_test), network.predict(data.x_test))


def test_a_diverging_run_ends_failed(tracking_uri, capsys):
    assert main(["run", str(CONFIGS / "digits.yaml"), "eta=1e6", "lmbda=1e6", "epochs=2", "--quiet"]) == 1
    assert "diverged; lower the learning rate (eta=1000000.0)" in error_line(capsys.readouterr().err)
    assert only_run(tracking_uri)[1].info.status == "FAILED"


def test_an_interrupted_run_ends_killed(tracking_uri, tmp_path):
    """SIGTERM (what a stopped job gets) mid-training: the run is KILLED, not left RUNNING."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", str(CONFIGS / "nielsen-ch1.yaml"), "epochs=200", "log_every=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stderr:  # progress lines arrive once an epoch ends
        if line.startswith("epoch 1/200"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err  # as a shell reports a process SIGTERM ended
    assert "Traceback" not in err
    assert only_run(tracking_uri)[1].info.status == "KILLED"


def test_unknown_key_in_yaml_suggests_the_right_one(tmp_path):
    (tmp_path / "job.yaml").write_text("data: digits\nbatchsize: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'batchsize': did you mean 'batch_size'"):
        load_config(tmp_path / "job.yaml")


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "digits.yaml", ["eta=1", "sizes=[64, 20, 10]", "run_name=123", "lmbda=0.5"])
    assert cfg.eta == 1.0 and isinstance(cfg.eta, float) and cfg.sizes == (64, 20, 10)
    assert cfg.run_name == "123" and cfg.lmbda == 0.5


def test_cli_errors_print_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(CONFIGS / "digits.yaml"), "epochs=0"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gradavg: error: epochs=0: must be >= 1"
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_config_file(capsys):
    assert main(["run", "configs/nope.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_gradcheck_command(capsys):
    assert main(["gradcheck", str(CONFIGS / "digits.yaml"), "sizes=[64,5,10]", "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "numpy reference: worst relative error" in out and "compiled training path: worst" in out
    assert out.count(": ok") == 2
    assert main(["gradcheck", str(CONFIGS / "digits.yaml"), "sizes=[64,5,10]", "--tolerance", "1e-30"]) == 1


def test_evaluate_command(tracking_uri, tmp_path, capsys):
    net = Network.create([64, 10, 10], seed=1)
    net.save(tmp_path / "w.npz")
    assert main(["evaluate", str(tmp_path / "w.npz"), "--data", "digits"]) == 0
    from jobs.data import load_dataset

    data = load_dataset("digits")
    cost, accuracy = net.evaluate(data.x_test, data.y_test)
    assert f"accuracy {100 * accuracy:.2f}%, mean cost {cost:.4f}" in capsys.readouterr().out
    assert main(["evaluate", "runs:/0123456789abcdef"]) == 2
    assert "no such run" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "w.npz"), "--data", "mnist-5k"]) == 2
    assert "has 784 inputs per example but the model takes 64" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_fast(capsys):
    started = time.perf_counter()
    code = main(["run", str(CONFIGS / "digits.yaml"), "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2 and time.perf_counter() - started < 15
    err = capsys.readouterr().err
    assert "MLflow tracking server http://127.0.0.1:9 cannot be reached" in err and "mlflow server" in err


def test_plain_progress_lines_when_not_a_terminal(capsys):
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=2", "track=false"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith("gradavg: ")] == ["epoch 1/2", "epoch 2/2"]
    assert lines[0] == "gradavg: loading digits ..."  # what takes the seconds before the first epoch
    assert "\r" not in "".join(lines)


@pytest.mark.slow
def test_nielsen_ch1_on_mnist_5k_reaches_89_percent():
    from jobs.run import run_job

    result = run_job(load_config(CONFIGS / "nielsen-ch1.yaml", ["track=false"]), quiet=True)
    assert result.state.history[-1].test_accuracy >= 0.89


def test_quickstart_reaches_what_the_readme_says():
    """README: `gradavg run configs/digits.yaml` ends at about 96.7% test accuracy."""
    from jobs.run import run_job

    result = run_job(load_config(CONFIGS / "digits.yaml", ["track=false"]), quiet=True)
    assert len(result.state.history) == 30
    assert result.state.history[-1].test_accuracy >= 0.96


@pytest.mark.server
def test_mlflow_models_serve_serves_the_model(tracking_uri, tmp_path, capsys):
    """`mlflow models serve` on 127.0.0.1 answers /invocations with the labels Core predicts."""
    import json
    import shutil
    import urllib.request

    from jobs.local_cluster import free_port

    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=2", "--quiet"]) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    network = Network.load(client.download_artifacts(run.info.run_id, "weights.npz"))
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    mlflow_cli = shutil.which("mlflow", path=env["PATH"])
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{model.model_id}", "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the model server did not start"
                time.sleep(0.3)
        from jobs.data import load_dataset

        x = load_dataset("digits").x_test[:20]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            predictions = json.loads(reply.read())["predictions"]
        assert predictions == network.predict(x).tolist()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_synthetic_data_runs_with_tracking_on(tracking_uri, capsys):
    """A data spec MLflow cannot take as a dataset source (synthetic:N:INPUTS:CLASSES) once crashed
    every tracked run; the run now finishes with the data logged as its input."""
    code = main(["run", str(CONFIGS / "digits.yaml"), "data=synthetic:300:64:10", "epochs=1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["data"] == "synthetic:300:64:10"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["synthetic"]


def test_a_tracked_run_cleans_up_and_tags_what_it_ran_on(tracking_uri, tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=2", "--quiet"]) == 0
    assert list((tmp_path / "tmp").iterdir()) == []  # the staged checkpoint, weights and plots are gone
    client, run = only_run(tracking_uri)
    tags = run.data.tags
    assert tags["threads"] == str(os.cpu_count()) and "workers" not in tags  # `workers` is the Ray key
    assert tags["mlflow.source.name"] == "gradavg run"
    assert len(tags["git_commit"]) == 40 or not (ROOT / ".git").exists()
    assert "system/cpu_utilization_percentage" in run.data.metrics  # every 2 s, and once as the run ends


def test_resuming_a_finished_run_says_it_is_complete(tracking_uri, capsys):
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=2", "--quiet"]) == 0
    client, run = only_run(tracking_uri)
    capsys.readouterr()
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=2", "--resume", run.info.run_id]) == 0
    out = capsys.readouterr().out
    assert f"run {run.info.run_id} is already complete: it FINISHED after 2 epochs" in out
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert len(models) == 1 and client.get_run(run.info.run_id).info.status == "FINISHED"


def run_killed_logging_the_model(monkeypatch, tracking_uri, args, kill):
    """``gradavg ARGS`` whose driver ``kill(tracker)`` stops as it logs the model: (client, the run)."""
    from jobs import artifacts

    with monkeypatch.context() as patched:
        patched.setattr(artifacts, "log_model", lambda tracker, weights_path, data: kill(tracker))
        assert main(args) == 130
    return only_run(tracking_uri)


def test_resume_finishes_what_a_killed_close_left_undone(tracking_uri, monkeypatch, capsys):
    def killed(tracker):  # the driver is stopped while it logs the model
        raise KeyboardInterrupt

    args = ["run", str(CONFIGS / "digits.yaml"), "epochs=2", "--quiet"]
    client, run = run_killed_logging_the_model(monkeypatch, tracking_uri, args, killed)
    run_id = run.info.run_id
    assert run.info.status == "KILLED"
    experiment = [run.info.experiment_id]
    assert mlflow.search_logged_models(experiment_ids=experiment, output_format="list") == []
    weights = Network.load(client.download_artifacts(run_id, "weights.npz")).params
    capsys.readouterr()
    assert main([*args, "--resume", run_id]) == 0
    line = capsys.readouterr().out.splitlines()[0]  # test accuracy A%, validation B% after 2 epochs (...) in ...
    assert "after 2 epochs" in line
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    accuracies = line.split(" after ")[0]  # the description gives them too (once only "FINISHED after epoch 2")
    assert run.data.tags["mlflow.note.content"].startswith(
        f"FINISHED: {accuracies} after epoch 2 of 2 (digits, local backend).")
    (model,) = mlflow.search_logged_models(experiment_ids=experiment, output_format="list")
    assert model.source_run_id == run_id
    assert np.array_equal(Network.load(client.download_artifacts(run_id, "weights.npz")).params, weights)
    assert [m.step for m in client.get_metric_history(run_id, "cost/train")] == [1, 2]
    assert main([*args, "--resume", run_id]) == 0  # and now there is nothing left to do
    assert "is already complete" in capsys.readouterr().out


def test_a_checkpoint_that_contradicts_itself_is_refused(tracking_uri, tmp_path, capsys):
    from jobs import checkpoint

    args = ["run", str(CONFIGS / "digits.yaml"), "epochs=2", "--quiet"]
    assert main(args) == 0
    client, run = only_run(tracking_uri)
    run_id = run.info.run_id
    arrays = dict(np.load(client.download_artifacts(run_id, "checkpoints/checkpoint.npz")))
    for field, value, message in (("epoch", -5, "it holds epoch -5 and step"),
                                  ("step", 7, "its checkpoint says epoch 2 at step 7, but an epoch of")):
        checkpoint.write({**arrays, field: np.array(value)}, tmp_path / "checkpoint.npz")
        client.log_artifact(run_id, str(tmp_path / "checkpoint.npz"), "checkpoints")
        assert main([*args[:2], "epochs=3", "--resume", run_id]) == 2
        assert message in error_line(capsys.readouterr().err)
    assert [m.step for m in client.get_metric_history(run_id, "cost/train")] == [1, 2]


def test_evaluate_a_logged_model_on_its_runs_validation_split(tracking_uri, capsys):
    from jobs.data import load_dataset

    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=1", "--quiet"]) == 0
    client, run = only_run(tracking_uri)
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    capsys.readouterr()
    assert main(["evaluate", f"models:/{model.model_id}", "--split", "validation"]) == 0
    network = Network.load(client.download_artifacts(run.info.run_id, "weights.npz"))
    data = load_dataset("digits", validation_size=200)  # the run's own split (configs/digits.yaml)
    cost, accuracy = network.evaluate(data.x_validation, data.y_validation)
    out = capsys.readouterr().out
    assert f"digits validation (200 examples): accuracy {100 * accuracy:.2f}%, mean cost {cost:.4f}" in out


def test_workers_left_idle_by_one_chunk_are_told():
    import io

    from jobs.progress import Progress
    from jobs.run import _note_idle_workers

    stream = io.StringIO()
    _note_idle_workers(load_config(None, ["backend=ray", "workers=2", "batch_size=10"]), Progress(1, stream))
    _note_idle_workers(load_config(None, ["backend=ray", "workers=2", "batch_size=1000"]), Progress(1, stream))
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("gradavg: note: a mini-batch of 10 is 1 chunk of up to chunk_size=500 examples, so "
                           "only 1 of the 2 workers compute in each step; chunk_size=5 shares it among all 2")
    # under shuffle=blocks a step's chunks lie in about mix_blocks blocks, each computed where its block is
    stream = io.StringIO()
    for workers in (4, 5):
        _note_idle_workers(load_config(None, ["backend=ray", f"workers={workers}", "batch_size=10", "shuffle=blocks",
                                              "mix_blocks=4"]), Progress(1, stream))
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("gradavg: note: each mini-batch draws from about mix_blocks=4 blocks") and \
        "at most 4 of the 5 workers compute in a step; mix_blocks=5 or more" in line


def test_gradcheck_says_how_many_examples_it_checked(capsys):
    assert main(["gradcheck", str(CONFIGS / "digits.yaml"), "sizes=[64,3,10]", "--examples", "100000000"]) == 0
    err = capsys.readouterr().err
    assert "on 1,238 examples of digits (all it has; 100,000,000 asked)" in err


def test_gradcheck_checks_the_network_the_job_would_train(monkeypatch, capsys):
    import jobs.cli
    from core import gradcheck
    from jobs.train import initial_state

    checked = []

    def record(network, x, y, gradient=None):
        checked.append(network.params.copy())
        return 0.0

    monkeypatch.setattr(gradcheck, "gradient_check", record)
    monkeypatch.setattr("core.gradient_check", record)
    overrides = ["init_scale=3.0", "init=scaled", "seed=7", "dtype=float32"]
    assert jobs.cli.main(["gradcheck", str(CONFIGS / "digits.yaml"), *overrides]) == 0
    trained = initial_state(load_config(CONFIGS / "digits.yaml", overrides)).network.params
    assert len(checked) == 2 and all(np.array_equal(p, trained) and p.dtype == np.float32 for p in checked)


def test_resume_replaces_a_model_left_unfinished(tracking_uri, monkeypatch, capsys):
    """A driver killed after MLflow created the model's entry, before its files: the entry stays PENDING."""
    from mlflow.entities import LoggedModelStatus

    def killed_while_logging(tracker):
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.initialize_logged_model(name="model", source_run_id=tracker.run_id,
                                       experiment_id=tracker.experiment_id)
        raise KeyboardInterrupt

    args = ["run", str(CONFIGS / "digits.yaml"), "epochs=1", "--quiet"]
    client, run = run_killed_logging_the_model(monkeypatch, tracking_uri, args, killed_while_logging)
    experiment = [run.info.experiment_id]
    (pending,) = mlflow.search_logged_models(experiment_ids=experiment, output_format="list")
    assert pending.status == LoggedModelStatus.PENDING
    assert main([*args, "--resume", run.info.run_id]) == 0
    (model,) = mlflow.search_logged_models(experiment_ids=experiment, output_format="list")
    assert model.status == LoggedModelStatus.READY and model.model_id != pending.model_id
    assert mlflow.pyfunc.load_model(f"models:/{model.model_id}") is not None


def test_evaluate_finds_a_model_in_the_store_it_is_given(tracking_uri, tmp_path, monkeypatch, capsys):
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=1", "--quiet"]) == 0
    client, run = only_run(tracking_uri)
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["evaluate", f"models:/{model.model_id}", "--tracking-uri", tracking_uri]) == 0
    assert "digits test (359 examples)" in capsys.readouterr().out
    assert list(elsewhere.iterdir()) == []  # no store made here


def test_a_resume_with_fewer_epochs_says_what_it_would_need():
    from jobs.run import check_resume_config
    from jobs.train import initial_state

    saved = load_config(CONFIGS / "digits.yaml", ["epochs=3"])
    state = initial_state(saved)
    state.epoch = 2  # stopped after epoch 2 of 3
    with pytest.raises(ConfigError, match=r"the run is at epoch 2 of its epochs=3, but this config says epochs=1; "
                                          r"pass epochs=3 \(or more\) to finish it$"):
        check_resume_config("R", state, saved, load_config(CONFIGS / "digits.yaml", ["epochs=1"]), force=True)
    with pytest.raises(ConfigError, match=r"says epochs=2; pass epochs=3 \(or more\) to finish it, or --force to end "
                                          r"it sooner$"):
        check_resume_config("R", state, saved, load_config(CONFIGS / "digits.yaml", ["epochs=2"]), force=False)
    assert check_resume_config("R", state, saved, load_config(CONFIGS / "digits.yaml", ["epochs=2"]), True) == []
    state.epoch = 3  # all its epochs trained
    fewer = load_config(CONFIGS / "digits.yaml", ["epochs=2"])
    with pytest.raises(ConfigError, match=r"the run has trained all its epochs=3 already, and epochs=2 is fewer; "
                                          r"pass epochs=3 to finish it \(it was stopped as it logged its results\), "
                                          r"or more to train it further$"):
        check_resume_config("R", state, saved, fewer, force=True)  # KILLED as it logged its results
    with pytest.raises(ConfigError, match=r"the run has trained all its epochs=3 already, and epochs=2 is fewer; "
                                          r"pass epochs=4 or more to train it further$"):
        check_resume_config("R", state, saved, fewer, force=True, finished=True)


def test_a_resume_must_reach_the_runs_own_end(tracking_uri, capsys):
    args = ["run", str(CONFIGS / "digits.yaml"), "--quiet"]
    assert main([*args, "epochs=3", "checkpoint_every=1"]) == 0
    client, run = only_run(tracking_uri)
    client.set_terminated(run.info.run_id, "KILLED")
    capsys.readouterr()
    assert main([*args, "epochs=2", "--resume", run.info.run_id]) == 2
    assert "the run has trained all its epochs=3 already, and epochs=2 is fewer; pass epochs=3 to finish it" in \
        error_line(capsys.readouterr().err)
    assert main([*args, "epochs=3", "validation_size=100", "--resume", run.info.run_id]) == 2
    assert "this config changes what the run computes (validation_size: 200 -> 100;" in \
        error_line(capsys.readouterr().err)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert run.info.run_name == "digits epochs=3"
    assert main([*args, "epochs=4", "--resume", run.info.run_id]) == 0  # one epoch more: the name says so
    assert client.get_run(run.info.run_id).info.run_name == "digits epochs=4"


def test_a_resumed_runs_name_states_the_values_it_now_runs_with():
    from jobs.config import renamed

    saved = load_config(CONFIGS / "digits.yaml", ["epochs=5", "eta=3"])
    assert renamed("digits epochs=5 eta=3", saved, replace(saved, epochs=8)) == "digits epochs=8 eta=3"
    assert renamed("digits eta=3", saved, replace(saved, epochs=8)) == "digits eta=3"  # it states no epochs
    assert renamed("digits eta=3 sizes=[64,30,10]", saved, replace(saved, eta=0.5, sizes=(64, 20, 10))) == \
        "digits eta=0.5 sizes=[64, 20, 10]"  # (--force)
    assert renamed("digits epochs=5 trial 2: eta=3", saved, saved) == "digits epochs=5 trial 2: eta=3"


def test_importing_cluster_changes_no_environment_until_asked(monkeypatch):
    """Ray reads its settings when it is imported: ``cluster.ray_settings()`` puts them in the environment,
    explicitly; importing the package does not."""
    import importlib

    import cluster

    for name in cluster.LOCAL_RAY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a value already there wins
    importlib.reload(cluster)
    assert [n for n in cluster.LOCAL_RAY_ENV if n in os.environ] == ["RAY_AUTH_MODE"]
    cluster.ray_settings()
    assert {n: os.environ[n] for n in cluster.LOCAL_RAY_ENV} == {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
