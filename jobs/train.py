"""The training loop: one loop for every backend.

Each epoch: a seeded shuffle, then the backend's ``train_steps`` runs the mini-batch steps, then
evaluation. A step is ``core.step.descend``: the chunks' gradient sums, added in chunk order, and
the update w ← (1 − ηλ/n) w − η ∂C/∂w (``core.step.update_in_place``); its compiled twin, which
the backends run, is ``core.kernels._add_and_update`` (the table in ``core/step.py``). What
happens around the loop (tracking, progress, checkpoints) is told through ``Hooks``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from core import Network, batch_count, mini_batch
from core.diagnostics import layer_metrics
from core.plan import blocks_order
from jobs.backends import Backend
from jobs.config import JobConfig
from jobs.data import Dataset
from jobs.errors import JobFailed
from jobs.stopping import STOPPING
from jobs.text import percent, plural


class DivergedError(JobFailed, RuntimeError):
    """The cost became NaN or Inf: training cannot go on from here."""


@dataclass
class EpochResult:
    epoch: int  # 1-based: the number of epochs completed
    step: int  # mini-batch updates completed in all
    train_cost: float
    train_accuracy: float
    validation_cost: float | None
    validation_accuracy: float | None
    test_cost: float
    test_accuracy: float
    epoch_seconds: float
    examples_per_second: float
    worker_failures: int = 0  # Ray workers that died so far in this job
    diagnostics: dict[str, float] = field(default_factory=dict)  # layer{l}/... (core.diagnostics)

    def metrics(self) -> dict[str, float]:
        """This epoch's MLflow metrics by name: ``EPOCH_METRICS`` (accuracies as percentages, ``percent``),
        then the diagnostics."""
        values = {name: percent(getattr(self, attr)) if attr.endswith("_accuracy") else getattr(self, attr)
                  for attr, name in EPOCH_METRICS.items() if getattr(self, attr) is not None}
        return {**values, **self.diagnostics}



# Each per-epoch field and the MLflow metric it is logged as. MLflow's UI draws one section of charts
# per name prefix (up to the last "/"), the sections in alphabetical order, then one last section for
# unprefixed names: "accuracy/" and "cost/" sort before the diagnostics' "layer{l}/" and "steps/", so
# cost and accuracy are the first charts a run shows, and the timings come last. They are logged in this
# order, validation accuracy first: the metric a compare view of runs (MLflow's parallel coordinates) shows
# by default is the first a run logged.
EPOCH_METRICS = {"validation_accuracy": "accuracy/validation", "validation_cost": "cost/validation",
                 "test_accuracy": "accuracy/test", "test_cost": "cost/test", "train_accuracy": "accuracy/train",
                 "train_cost": "cost/train", "epoch_seconds": "epoch_seconds",
                 "examples_per_second": "examples_per_second", "worker_failures": "worker_failures"}


@dataclass
class TrainingState:
    """Everything needed to continue training exactly where it stopped."""

    network: Network
    shuffle: np.random.Generator  # seeded from the config; its state goes into every checkpoint
    epoch: int = 0
    step: int = 0
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0  # the epoch of the best validation accuracy so far (early stopping's)
    best_accuracy: float = -1.0  # below any accuracy: the first epoch is an improvement
    stopped: str | None = None  # why training ended before cfg.epochs, when it did
    best_params: np.ndarray | None = None  # keep=best: the weights of best_epoch

    def keeps_best(self, cfg: JobConfig) -> bool:
        """Whether the run ends with its best validation epoch's weights (``keep=best``, once it has one)."""
        return cfg.keep == "best" and self.best_params is not None

    def kept(self, cfg: JobConfig) -> Network:
        """The network a run ends with (``keep``): the last epoch's, or that of its best validation accuracy."""
        if self.keeps_best(cfg):
            net = self.network
            return Network(list(net.sizes), self.best_params.copy(), net.cost, net.activation)
        return self.network

    def kept_epoch(self, cfg: JobConfig) -> int:
        return self.best_epoch if self.keeps_best(cfg) else self.epoch

    def kept_result(self, cfg: JobConfig) -> EpochResult | None:
        """The evaluation of the kept epoch's weights, where this process trained that epoch."""
        return next((r for r in self.history if r.epoch == self.kept_epoch(cfg)), None)

    def kept_accuracies(self, cfg: JobConfig, data: Dataset) -> tuple[float, float | None]:
        """The test and validation accuracy of the weights the run ends with: evaluated here, or, for a sharded
        dataset (the driver may hold no rows), the figures of the latest epoch this process trained."""
        last = self.kept_result(cfg) or (self.history[-1] if self.history else None)
        if data.shards is not None and last is not None:
            return last.test_accuracy, last.validation_accuracy
        network = self.kept(cfg)
        test = network.evaluate(np.asarray(data.x_test, dtype=network.dtype), data.y_test)[1]
        validation = network.evaluate(np.asarray(data.x_validation, dtype=network.dtype), data.y_validation)[1] \
            if data.n_validation else None
        return test, validation


class Hooks:
    """What the loop tells the outside world. The default does nothing."""

    def on_epoch_start(self, epoch: int, n_batches: int) -> None: ...

    def on_batches(self, done: int, n_batches: int) -> None: ...

    def on_batch_cost(self, step: int, cost: float) -> None: ...

    def on_epoch_end(self, result: EpochResult, state: TrainingState) -> None: ...

    def on_step_diagnostics(self, step: int, metrics: dict[str, float]) -> None:
        """Per-layer diagnostics every ``diagnostics_every`` steps."""

    def on_worker_failure(self, failures: int, text: str) -> None:
        """A worker died and its chunks were computed again; ``failures`` so far in this job."""

    def should_stop(self, result: EpochResult, state: TrainingState) -> str | None:
        """Asked after each epoch: why training should stop here (a sweep's scheduler), or None."""
        return None

    def flush(self) -> None:
        """Send what is held back now (the loop is about to hold: ``hold_after``)."""


def initial_state(cfg: JobConfig) -> TrainingState:
    network = Network.create(cfg.sizes, init=cfg.init, seed=cfg.seed, cost=cfg.cost,
                             activation=cfg.activation, dtype=cfg.dtype, init_scale=cfg.init_scale)
    return TrainingState(network, shuffle=np.random.default_rng([cfg.seed, 1]))


def training_inputs(data: Dataset, network: Network) -> np.ndarray | None:
    """The training examples in the network's dtype, contiguous (no copy when they already are); None
    where this process holds no rows (a Ray driver of a sharded dataset)."""
    return None if data.x_train is None else np.ascontiguousarray(data.x_train, dtype=network.dtype)


def start_backend(backend: Backend, cfg: JobConfig, data: Dataset, network: Network) -> None:
    """Start ``backend`` on the training set: the rows given in memory, or a sharded dataset's blocks."""
    from jobs.shards import backend_blocks

    blocks = backend_blocks(data, cfg.shuffle, network.dtype)
    if blocks is None:
        backend.start(network, training_inputs(data, network), data.y_train)
    else:  # the rows in the network's dtype once, where this process holds them
        backend.start(network, blocks.rows["train"][0] if blocks.rows else None, data.y_train, blocks=blocks)


def train(cfg: JobConfig, data: Dataset, backend: Backend, state: TrainingState | None = None,
          hooks: Hooks | None = None, backend_started: bool = False) -> TrainingState:
    """Train from ``state`` (a fresh network by default) to ``cfg.epochs`` epochs.

    The backend is started and closed here, unless the caller already started it (with
    ``training_inputs``), in which case closing it is the caller's too.
    """
    state = state or initial_state(cfg)
    hooks = hooks or Hooks()
    network = state.network
    x_train = None if data.shards is not None else training_inputs(data, network)  # a sharded set: the backend's
    splits = {} if data.shards is not None else {
        name: (np.asarray(getattr(data, f"x_{name}"), dtype=network.dtype), getattr(data, f"y_{name}"))
        for name in ("validation", "test")}
    try:
        if not backend_started:
            start_backend(backend, cfg, data, network)
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is caught below, with a clear message
            _epochs(cfg, data, backend, state, hooks, x_train, splits)
    finally:
        if not backend_started:
            backend.close()
    return state


def diagnostic_rows(n_train: int) -> np.ndarray:
    """The training examples the diagnostics are computed on: the same every epoch and every
    backend; few enough (a fiftieth of the data, at most 500) to cost 1-2% of an epoch."""
    return np.arange(min(500, max(1, n_train // 50)))


def _diagnostics(backend, network, rows) -> dict[str, float]:
    nabla, count, stats = backend.gradient_stats(network, rows)
    return layer_metrics(network, nabla, count, stats)


def epoch_order(cfg: JobConfig, data: Dataset, state: TrainingState, sources: np.ndarray | None) -> np.ndarray:
    """The next epoch's order of training positions, from the state's seeded generator: a permutation of
    every example (``shuffle=global``; on a sharded dataset mapped through ``sources``, so the examples
    come in the same order as from its source), or the blocks' order (``core.plan.blocks_order``)."""
    if cfg.shuffle == "blocks":
        return blocks_order(state.shuffle, data.shards.offsets("train"), cfg.mix_blocks, cfg.batch_size)
    order = state.shuffle.permutation(data.n_train)
    return order if sources is None else sources[order]


def _epochs(cfg, data, backend, state, hooks, x_train, splits) -> None:
    network = state.network
    n_train = data.n_train
    sources = data.shards.positions_of_sources() if data.shards is not None and cfg.shuffle == "global" else None
    rows = diagnostic_rows(n_train)
    rows = rows if sources is None else sources[rows]
    n_batches = batch_count(n_train, cfg.batch_size)
    hold_after(state.epoch, hooks)  # 0: the run started, nothing trained yet
    while state.epoch < cfg.epochs and not state.stopped:
        hooks.on_epoch_start(state.epoch + 1, n_batches)
        started = time.perf_counter()
        order = epoch_order(cfg, data, state, sources)
        done = 0
        while done < n_batches:
            # the backend runs the steps up to the next one something is logged at, in one go
            stop = min(n_batches, done + _steps_to_report(state.step, cfg))
            backend.train_steps(network, order, done, stop, cfg.batch_size, cfg.eta, cfg.lmbda)
            state.step += stop - done
            done = stop
            if state.step % cfg.log_every == 0:
                batch = mini_batch(order, cfg.batch_size, done - 1)
                cost = backend.batch_cost(network, batch) if data.shards is not None else \
                    network.evaluate(x_train[batch], data.y_train[batch])[0]
                _check_finite(cost, state, cfg, "mini-batch")
                hooks.on_batch_cost(state.step, cost)
                hooks.on_batches(done, n_batches)
            if _step_diagnostics(cfg) and state.step % cfg.diagnostics_every == 0:
                hooks.on_step_diagnostics(state.step, _diagnostics(backend, network, rows))
        seconds = time.perf_counter() - started
        if data.shards is not None:
            result = _evaluate_blocks(network, backend, data, state, seconds)
        else:
            result = _evaluate(network, x_train, data.y_train, splits, state, seconds, n_train)
        _check_finite(result.train_cost, state, cfg, "training")
        state.epoch += 1
        result.epoch, result.worker_failures = state.epoch, backend.failures
        if cfg.diagnostics:
            result.diagnostics = _diagnostics(backend, network, rows)
        state.history.append(result)
        # decided before the epoch's hooks, so that its checkpoint holds the decision and a resumed run agrees
        state.stopped = early_stop(cfg, state, result) or hooks.should_stop(result, state)
        hooks.on_epoch_end(result, state)
        hold_after(state.epoch, hooks)


# A test's hook: with GRADAVG_HOLD_AFTER_EPOCH=N in its environment, a run holds after epoch N (its hooks
# done and its checkpoint sent; 0: before the first epoch) until it is stopped or killed, so that a test
# interrupts it exactly there, in seconds.
HOLD_AFTER_EPOCH = "GRADAVG_HOLD_AFTER_EPOCH"


def hold_after(epoch: int, hooks: Hooks) -> None:
    if os.environ.get(HOLD_AFTER_EPOCH) == str(epoch):
        hooks.flush()
        while not STOPPING.is_set():  # a stop signal interrupts the sleep (jobs.stopping.stop_on_signals)
            time.sleep(0.05)
        raise KeyboardInterrupt  # one that arrived while something swallowed it


def early_stop(cfg: JobConfig, state: TrainingState, result: EpochResult) -> str | None:
    """The book's network2 rule: stop once validation accuracy has not improved (strictly) in
    ``early_stopping`` epochs. Keeps the best epoch in ``state`` (so in checkpoints) either way, and
    with keep=best its weights."""
    if result.validation_accuracy is None:
        return None
    if result.validation_accuracy > state.best_accuracy:
        state.best_epoch, state.best_accuracy = result.epoch, result.validation_accuracy
        if cfg.keep == "best":
            state.best_params = state.network.params.copy()
    if cfg.early_stopping and result.epoch - state.best_epoch >= cfg.early_stopping:
        return (f"early stopping: validation accuracy has not improved in {plural(cfg.early_stopping, 'epoch')}; "
                f"best {percent(state.best_accuracy):.2f}% at epoch {state.best_epoch}")
    return None


def _step_diagnostics(cfg: JobConfig) -> bool:
    return bool(cfg.diagnostics and cfg.diagnostics_every)


def _steps_to_report(step: int, cfg: JobConfig) -> int:
    """Steps from ``step`` to the next one that logs a mini-batch cost or diagnostics."""
    every = [cfg.log_every] + ([cfg.diagnostics_every] if _step_diagnostics(cfg) else [])
    return min(n - step % n for n in every)


def _evaluate(network, x_train, y_train, splits, state, seconds, n_train) -> EpochResult:
    train_cost, train_accuracy = network.evaluate(x_train, y_train)
    x_val, y_val = splits["validation"]
    val_cost, val_accuracy = network.evaluate(x_val, y_val) if y_val.size else (None, None)
    test_cost, test_accuracy = network.evaluate(*splits["test"])
    return EpochResult(state.epoch + 1, state.step, train_cost, train_accuracy, val_cost, val_accuracy, test_cost,
                       test_accuracy, seconds, n_train / seconds if seconds > 0 else float("inf"))


def _evaluate_blocks(network, backend, data, state, seconds) -> EpochResult:
    """``_evaluate`` for a sharded dataset: each split evaluated where its blocks are (``backend.evaluate``)."""
    train_cost, train_accuracy, _ = backend.evaluate(network, "train")
    val_cost, val_accuracy = backend.evaluate(network, "validation")[:2] if data.n_validation else (None, None)
    test_cost, test_accuracy, _ = backend.evaluate(network, "test")
    return EpochResult(state.epoch + 1, state.step, train_cost, train_accuracy, val_cost, val_accuracy, test_cost,
                       test_accuracy, seconds, data.n_train / seconds if seconds > 0 else float("inf"))


def _check_finite(cost: float, state: TrainingState, cfg: JobConfig, what: str) -> None:
    if not math.isfinite(cost) or not np.all(np.isfinite(state.network.params)):
        decay = f" or the weight decay (lmbda={cfg.lmbda})" if cfg.lmbda else ""
        raise DivergedError(f"the {what} cost became {cost} at epoch {state.epoch + 1}, step {state.step}: "
                            f"training diverged; lower the learning rate (eta={cfg.eta}){decay}")
