"""Checkpoints: weights, step, epoch, the shuffle generator's state and the resolved config.

Written to a temporary file and renamed, so a file under the final name is always whole;
read without pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core import Network
from core.network import write_npz
from jobs.config import JobConfig, build_config, parse_yaml
from jobs.train import TrainingState


def save(state: TrainingState, cfg: JobConfig, path) -> Path:
    return write(snapshot(state, cfg), path)


def snapshot(state: TrainingState, cfg: JobConfig) -> dict[str, np.ndarray]:
    """The checkpoint's arrays, copied: training may go on while they are written."""
    net = state.network
    return dict(params=net.params.copy(), sizes=np.array(net.sizes, dtype=np.int64), cost=np.array(net.cost),
                activation=np.array(net.activation), epoch=np.array(state.epoch), step=np.array(state.step),
                shuffle_state=np.array(json.dumps(state.shuffle.bit_generator.state)),
                config=np.array(cfg.to_yaml()), best_epoch=np.array(state.best_epoch),
                best_accuracy=np.array(state.best_accuracy), stopped=np.array(state.stopped or ""),
                **({} if state.best_params is None else {"best_params": state.best_params.copy()}))


def write(arrays: dict[str, np.ndarray], path) -> Path:
    return write_npz(path, arrays)


def load(path) -> tuple[TrainingState, JobConfig]:
    with np.load(path, allow_pickle=False) as data:
        net = Network([int(n) for n in data["sizes"]], data["params"].copy(), str(data["cost"]),
                      str(data["activation"]))
        shuffle = np.random.Generator(np.random.PCG64())
        shuffle.bit_generator.state = json.loads(str(data["shuffle_state"]))  # the saved state, not this seed
        cfg = build_config(parse_yaml(str(data["config"])))
        state = TrainingState(net, epoch=int(data["epoch"]), step=int(data["step"]), shuffle=shuffle)
        if "best_epoch" in data:  # early stopping's record (checkpoints from before it have none)
            state.best_epoch, state.best_accuracy = int(data["best_epoch"]), float(data["best_accuracy"])
            state.stopped = str(data["stopped"]) or None
        if "best_params" in data:  # keep=best: the best epoch's weights
            state.best_params = data["best_params"].copy()
    check(state, cfg)
    return state, cfg


def check(state: TrainingState, cfg: JobConfig) -> None:
    """A checkpoint's fields must agree with each other and with its own config; raise ValueError."""
    net = state.network
    problems = []
    if not 1 <= state.epoch <= cfg.epochs or state.step < state.epoch:  # written after an epoch of >= 1 step
        problems.append(f"epoch {state.epoch} and step {state.step} (its config trains epochs 1 to {cfg.epochs}, "
                        "each of at least one step)")
    if list(cfg.sizes) != net.sizes or (net.cost, net.activation) != (cfg.cost, cfg.activation):
        problems.append(f"a network {net.sizes} {net.cost}/{net.activation} that is not its config's")
    if net.dtype != np.dtype(cfg.dtype):
        problems.append(f"weights in {net.dtype}, its config says dtype={cfg.dtype}")
    if not np.all(np.isfinite(net.params)):
        problems.append("weights that are NaN or Inf")
    best = state.best_params
    if best is not None and (best.shape != net.params.shape or best.dtype != net.dtype or
                             not np.all(np.isfinite(best)) or not 1 <= state.best_epoch <= state.epoch):
        problems.append(f"best-epoch weights (epoch {state.best_epoch}) that do not fit its network")
    if problems:
        raise ValueError(f"it holds {'; '.join(problems)}")
