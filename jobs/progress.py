"""Progress output: a bar on a terminal, plain lines in a log (a file, a cluster's job log)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from jobs.text import percent
from jobs.train import EpochResult, Hooks, TrainingState


class Progress(Hooks):
    def __init__(self, epochs: int, stream: TextIO | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.epochs, self.quiet = epochs, quiet
        self.tty = self.stream.isatty()
        self._epoch_started = time.perf_counter()

    def stage(self, what: str) -> None:
        """What the job is doing before its first epoch line and after its last (seconds, at times)."""
        if self.quiet:
            return
        if self.tty:  # a status line, replaced by the next one
            self.stream.write(f"\r\x1b[Kgradavg: {what} ...")
            self.stream.flush()
        else:
            self._line(f"gradavg: {what} ...")

    def note(self, text: str) -> None:
        """Something the user should know about the job's settings, shown even when quiet."""
        self._line(f"gradavg: note: {text}")

    def _line(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def on_epoch_start(self, epoch: int, n_batches: int) -> None:
        self._epoch = epoch
        self._epoch_started = time.perf_counter()

    def on_batches(self, done: int, n_batches: int) -> None:
        if self.tty and not self.quiet:
            filled = int(30 * done / n_batches)
            self.stream.write(f"\repoch {self._epoch}/{self.epochs} [{'#' * filled}{'.' * (30 - filled)}] "
                              f"{done}/{n_batches}")
            self.stream.flush()

    def on_epoch_end(self, result: EpochResult, state: TrainingState) -> None:
        if self.quiet:
            return
        validation = (f", validation {percent(result.validation_accuracy):.2f}%"
                      if result.validation_accuracy is not None else "")
        line = (f"epoch {result.epoch}/{self.epochs}: train cost {result.train_cost:.4f}{validation}, "
                f"test {percent(result.test_accuracy):.2f}% ({result.epoch_seconds:.2f} s, "
                f"{result.examples_per_second:,.0f} examples/s)")
        self._line(line)
        if state.stopped:
            self._line(f"gradavg: stopping after epoch {result.epoch}: {state.stopped}")

    def on_worker_failure(self, failures: int, text: str) -> None:
        self._line(f"gradavg: {text}")


class HookChain(Hooks):
    """Several hooks heard as one."""

    def __init__(self, *hooks: Hooks):
        self.hooks = [h for h in hooks if h is not None]

    def on_epoch_start(self, epoch, n_batches):
        for h in self.hooks:
            h.on_epoch_start(epoch, n_batches)

    def on_batches(self, done, n_batches):
        for h in self.hooks:
            h.on_batches(done, n_batches)

    def on_batch_cost(self, step, cost):
        for h in self.hooks:
            h.on_batch_cost(step, cost)

    def on_epoch_end(self, result, state):
        for h in self.hooks:
            h.on_epoch_end(result, state)

    def on_step_diagnostics(self, step, metrics):
        for h in self.hooks:
            h.on_step_diagnostics(step, metrics)

    def on_worker_failure(self, failures, text):
        for h in self.hooks:
            h.on_worker_failure(failures, text)

    def flush(self):
        for h in self.hooks:
            h.flush()

    def should_stop(self, result, state):
        return next((why for h in self.hooks if (why := h.should_stop(result, state))), None)
