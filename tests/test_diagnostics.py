"""Per-layer diagnostics against values computed independently, and the slowdown lesson from logged runs."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS
from core import Network, gradient_sum
from core.diagnostics import layer_metrics, stats_size
from jobs import plots
from jobs.backends import LocalBackend
from jobs.cli import main
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.run import run_job
from jobs.train import EPOCH_METRICS, EpochResult, diagnostic_rows

PNG = b"\x89PNG\r\n\x1a\n"


def independent_metrics(net: Network, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Eq. 25 and BP1-BP4 one example at a time, written out here without core's backprop."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    n_layers = len(net.weights)
    delta_abs = np.zeros(n_layers)
    saturated = np.zeros(n_layers)
    low = np.zeros(n_layers)
    grad_w = [np.zeros_like(w) for w in net.weights]
    grad_b = [np.zeros_like(b) for b in net.biases]
    for xi, label in zip(x, labels):
        activations, zs = [xi], []
        for w, b in zip(net.weights, net.biases):
            zs.append(w @ activations[-1] + b)
            activations.append(sig(zs[-1]))
        y = np.zeros(net.sizes[-1])
        y[label] = 1.0
        prime = [sig(z) * (1 - sig(z)) for z in zs]
        delta = (activations[-1] - y) * (prime[-1] if net.cost == "quadratic" else 1.0)
        for layer in range(n_layers - 1, -1, -1):
            delta_abs[layer] += np.abs(delta).sum()
            saturated[layer] += np.count_nonzero(prime[layer] < 0.01)
            low[layer] += np.count_nonzero(activations[layer] < 0.01)
            grad_w[layer] += np.outer(delta, activations[layer])
            grad_b[layer] += delta
            if layer:
                delta = (net.weights[layer].T @ delta) * prime[layer - 1]
    n = len(labels)
    out = {}
    for layer, w in enumerate(net.weights):
        p = f"layer{layer + 2}/"
        out[p + "delta_mean_abs"] = delta_abs[layer] / (n * w.shape[0])
        out[p + "grad_w_norm"] = np.linalg.norm(grad_w[layer] / n)
        out[p + "grad_b_norm"] = np.linalg.norm(grad_b[layer] / n)
        out[p + "saturated_fraction"] = saturated[layer] / (n * w.shape[0])
        out[p + "low_input_fraction"] = low[layer] / (n * w.shape[1])
        out[p + "weight_norm"] = np.linalg.norm(w)
    return out


@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
def test_layer_metrics_equal_an_independent_computation(cost):
    net = Network.create([20, 12, 8, 5], seed=4, cost=cost, init_scale=2.0)  # a few saturate
    rng = np.random.default_rng(1)
    x = rng.random((40, 20)) * (rng.random((40, 20)) > 0.3)  # some inputs exactly 0
    labels = rng.integers(0, 5, 40)
    stats = np.zeros(stats_size(net.sizes))
    nabla, n = gradient_sum(net, x, labels, stats=stats)
    got = layer_metrics(net, nabla, n, stats)
    want = independent_metrics(net, x, labels)
    assert set(got) == set(want) and len(got) == 18
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-11, abs=1e-15), key
    assert 0 < got["layer2/low_input_fraction"] < 1 and 0 < got["layer3/saturated_fraction"] < 1


def test_stats_leave_the_gradient_unchanged_and_add_over_chunks():
    net = Network.create([20, 12, 5], seed=2)
    rng = np.random.default_rng(3)
    data_x, data_y = rng.random((50, 20)), rng.integers(0, 5, 50)
    plain, _ = gradient_sum(net, data_x, data_y)
    with_stats, _ = gradient_sum(net, data_x, data_y, stats=np.zeros(stats_size(net.sizes)))
    assert np.array_equal(plain, with_stats)
    whole = LocalBackend(50, threads=1)
    whole.start(net, data_x, data_y)
    chunked = LocalBackend(7, threads=2)
    chunked.start(net, data_x, data_y)
    a = layer_metrics(net, *whole.gradient_stats(net, np.arange(50)))
    b = layer_metrics(net, *chunked.gradient_stats(net, np.arange(50)))
    whole.close()
    chunked.close()
    assert a == pytest.approx(b, rel=1e-12)


def test_logged_diagnostics_match_the_saved_network(tracking_uri, capsys):
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=2", "diagnostics_every=50", "--quiet"]) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    net = Network.load(client.download_artifacts(run.info.run_id, "weights.npz"))
    data = load_dataset("digits", validation_size=200)
    rows = diagnostic_rows(data.x_train.shape[0])
    want = independent_metrics(net, data.x_train[rows], data.y_train[rows])
    for key, value in want.items():
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert history[-1].value == pytest.approx(value, rel=1e-10, abs=1e-15), key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "steps/layer3/grad_w_norm")]
    assert steps == list(range(50, 2 * 124 + 1, 50))


def test_every_plot_is_a_png_and_is_redrawn_on_resume(tracking_uri, capsys):
    args = ["run", str(CONFIGS / "digits.yaml"), "--quiet"]
    assert main([*args, "epochs=2"]) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = {"curves", "confusion_matrix", "gradient_norms", "saturated_fraction", "misclassified",
             "first_layer_weights"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {f"plots/{n}.png" for n in names}
    before = {n: open(client.download_artifacts(run.info.run_id, f"plots/{n}.png"), "rb").read() for n in names}
    assert all(png.startswith(PNG) for png in before.values())
    assert main([*args, "epochs=4", "--resume", run.info.run_id]) == 0
    after = {n: open(client.download_artifacts(run.info.run_id, f"plots/{n}.png"), "rb").read() for n in names}
    for name in ("curves", "gradient_norms", "saturated_fraction", "confusion_matrix"):
        assert after[name].startswith(PNG) and after[name] != before[name], name
    history = client.get_metric_history(run.info.run_id, "layer3/grad_w_norm")
    assert [m.step for m in history] == [1, 2, 3, 4]


def test_the_slowdown_lesson_from_the_diagnostics():
    """Chapter 2's closing lesson, read from the per-epoch diagnostics (no tracking needed)."""
    runs = {cost: run_job(load_config(CONFIGS / f"slowdown-{cost}.yaml", ["track=false"]), quiet=True).state.history
            for cost in ("quadratic", "cross-entropy")}
    q = load_config(CONFIGS / "slowdown-quadratic.yaml").to_dict()
    x = load_config(CONFIGS / "slowdown-cross-entropy.yaml").to_dict()
    assert {k for k in q if q[k] != x[k]} == {"cost", "run_name"}  # the same network, seed and start
    quad, xent = runs["quadratic"], runs["cross-entropy"]
    # the output layer learns much more slowly under the quadratic cost: its gradient is several times smaller
    assert quad[0].diagnostics["layer3/grad_w_norm"] < xent[0].diagnostics["layer3/grad_w_norm"] / 4
    assert quad[0].diagnostics["layer3/saturated_fraction"] > 0.5
    # and the cross-entropy run's cost falls faster, relative to where each started
    assert xent[-1].train_cost / xent[0].train_cost < quad[-1].train_cost / quad[0].train_cost - 0.2
    assert xent[-1].test_accuracy > quad[-1].test_accuracy + 0.5


def mlflow_ui_sections(names) -> list[str]:
    """The sections, in order, that MLflow 3.17's UI draws a run's metric charts in (read from its
    bundled JS and seen in a browser): one per name prefix up to the last "/", sorted, then "" for
    the unprefixed names (its "Model metrics" section)."""
    prefixes = {name.rpartition("/")[0] for name in names}
    return sorted(prefixes - {""}) + [""] * ("" in prefixes)


def test_cost_and_accuracy_are_the_first_charts_in_mlflow():
    net = Network.create([20, 12, 8, 5], seed=4)
    rng = np.random.default_rng(1)
    stats = np.zeros(stats_size(net.sizes))
    nabla, n = gradient_sum(net, rng.random((10, 20)), rng.integers(0, 5, 10), stats=stats)
    diagnostics = layer_metrics(net, nabla, n, stats)
    result = EpochResult(1, 10, 0.5, 0.8, 0.6, 0.7, 0.6, 0.7, 1.0, 100.0, diagnostics=diagnostics)
    names = [*result.metrics(), *(f"steps/{k}" for k in diagnostics), "batch_cost"]
    assert mlflow_ui_sections(names) == ["accuracy", "cost", "layer2", "layer3", "layer4", "steps/layer2",
                                         "steps/layer3", "steps/layer4", ""]
    assert {k: result.metrics()[v] for k, v in EPOCH_METRICS.items()} == {  # accuracies as percentages
        "train_cost": 0.5, "train_accuracy": 80.0, "validation_cost": 0.6, "validation_accuracy": 70.0,
        "test_cost": 0.6, "test_accuracy": 70.0, "epoch_seconds": 1.0, "examples_per_second": 100.0,
        "worker_failures": 0}


def epoch_ticks(fig) -> list[np.ndarray]:
    """Each axes' x ticks that fall inside its view."""
    fig.canvas.draw()
    ticks = []
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks.append(np.array([t for t in ax.get_xticks() if low <= t <= high]))
    plots.plt.close(fig)
    return ticks


@pytest.mark.parametrize("n_epochs", [1, 2, 3, 7, 30])
def test_per_epoch_axes_tick_only_whole_epochs(n_epochs):
    """Regression: 3 epochs were ticked at 1, 1.5, 2, 2.5, 3."""
    epochs = range(1, n_epochs + 1)
    history = [SimpleNamespace(epoch=e, train_cost=1 / e, train_accuracy=0.5, validation_cost=None,
                               validation_accuracy=None, test_cost=1 / e, test_accuracy=0.5) for e in epochs]
    series = {f"layer {layer}": [(e, 10.0 ** -e) for e in epochs] for layer in (2, 3)}
    for fig in (plots.curves_figure(history), plots.per_layer_figure(series, "t", "y", log=True)):
        for ticks in epoch_ticks(fig):
            assert len(ticks) and np.array_equal(ticks, np.round(ticks)), ticks


def test_the_gradient_norm_title_draws_every_glyph():
    """The title log_plots passes once read `w^l`; a glyph missing from the font only warns, so fail on it."""
    fig = plots.per_layer_figure({"layer 2": [(1, 0.1), (2, 0.2)]}, plots.GRADIENT_NORMS_TITLE, "norm", log=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.canvas.draw()  # a mathtext mistake raises here too
    assert fig.axes[0].get_title() == plots.GRADIENT_NORMS_TITLE
    plots.plt.close(fig)
