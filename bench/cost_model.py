"""Toward many nodes, on paper: a cost model of a synchronous Ray step, fitted to constants measured
on this machine, that predicts examples per second for W = 1 to 64 nodes.

    step(W, m) = overhead(W) + compute(m / W) + bytes(W) / bandwidth + driver(W)

- compute(k) = k · c, with c the seconds per example of one core (one worker per node, one
  thread, as measured: the single process with 1 thread at a mini-batch of 10,000);
- overhead(W): a step's fixed cost. Between nodes, ``across`` + ``b_across`` · (W − 2):
  ``across`` is a step of 2 workers on two real nodes (``bench.two_nodes``) at mini-batch 10
  minus its compute, under the transport ``auto`` takes there (actor calls), and ``b_across``
  what each further worker adds to such a step on one node. On the driver's node alone (the
  check below), ``a`` + ``b`` · (W − 1), fitted to compiled-graph steps of 1 and 2 workers;
- bytes(W) = W · P · 8 each way (the weights out to each node, one chunk sum back from each;
  full duplex, so each direction costs W · P · 8 · 8 / bandwidth seconds at the driver's NIC);
- driver(W) = W · P · r: the driver copies in and adds one chunk sum per worker, at r seconds
  per parameter (measured), then updates once.

It is a model: it knows nothing of stragglers, of a network shared with other traffic, of a
real network's latency (two namespaces on one machine have almost none, but share its two
cores), or of nodes with several cores. ``python -m bench --only model`` prints it next to
what 1 and 2 workers measure here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WORKERS = (1, 2, 4, 8, 16, 32, 64)
BATCHES = (1_000, 10_000, 100_000)
BANDWIDTHS = (10e9, 25e9)  # bits per second


@dataclass
class Constants:
    per_example: dict[tuple[int, ...], float]  # c: seconds per example on one core, by network sizes
    a: float  # seconds: a step's fixed cost with one worker on the driver's node
    b: float  # seconds each further worker on that node adds
    across: float  # seconds: a step's fixed cost with 2 workers on two nodes
    b_across: float  # seconds each further worker adds between nodes
    per_param: float  # r: seconds per parameter per worker at the driver (copy in and add)


def params(sizes: tuple[int, ...]) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def fixed_seconds(k: Constants, sizes: tuple[int, ...], workers: int, bandwidth: float | None) -> float:
    """Everything in a step but the compute; ``bandwidth`` None: the workers share the driver's node."""
    p = params(sizes)
    if bandwidth is None or workers == 1:
        overhead = k.a + k.b * (workers - 1)
    else:
        overhead = k.across + k.b_across * (workers - 2) + workers * p * 8 * 8 / bandwidth
    return overhead + workers * p * k.per_param


def step_seconds(k: Constants, sizes: tuple[int, ...], workers: int, batch: int, bandwidth: float | None) -> float:
    return fixed_seconds(k, sizes, workers, bandwidth) + k.per_example[sizes] * math.ceil(batch / workers)


def smallest_winning_batch(k: Constants, sizes: tuple[int, ...], workers: int, bandwidth: float) -> int | None:
    """The smallest mini-batch at which ``workers`` nodes beat one process on one core (no Ray):
    m · c > fixed + m · c / W."""
    if workers == 1:
        return None
    return math.ceil(fixed_seconds(k, sizes, workers, bandwidth) / (k.per_example[sizes] * (1 - 1 / workers)))


def print_model(k: Constants) -> None:
    print(f"constants: c = {', '.join(f'{list(s)} {1e6 * c:.2f} µs' for s, c in k.per_example.items())} an example; "
          f"overhead(W) = {1e3 * k.across:.3f} ms + {1e3 * k.b_across:.3f} ms·(W − 2) between nodes, "
          f"{1e3 * k.a:.3f} ms + {1e3 * k.b:.3f} ms·(W − 1) on the driver's node; "
          f"driver {1e9 * k.per_param:.2f} ns a parameter a worker")
    for sizes in k.per_example:
        for bandwidth in BANDWIDTHS:
            print(f"\n{list(sizes)}, {bandwidth / 1e9:.0f} Gb/s: predicted examples per second (model)")
            print("| W nodes | " + " | ".join(f"mini-batch {m:,}" for m in BATCHES) + " | smallest mini-batch "
                  "beating one node | driver's copy and add, share of a step at 10,000 |")
            print("|---|" + "---|" * (len(BATCHES) + 2))
            for w in WORKERS:
                rates = [m / step_seconds(k, sizes, w, m, bandwidth) for m in BATCHES]
                win = smallest_winning_batch(k, sizes, w, bandwidth)
                driver = w * params(sizes) * k.per_param / step_seconds(k, sizes, w, 10_000, bandwidth)
                print(f"| {w} | " + " | ".join(f"{r:,.0f}" for r in rates) +
                      f" | {'—' if win is None else f'{win:,}'} | {100 * driver:.0f}% |")
            per_worker = k.b_across + params(sizes) * (k.per_param + 64 / bandwidth)
            peaks = ", ".join(f"W ≈ {math.sqrt(m * k.per_example[sizes] / per_worker):.0f} at {m:,}" for m in BATCHES)
            print(f"The driver saturates where the work it does for each worker, {1e3 * per_worker:.2f} ms a step "
                  f"(sending, receiving, adding), times W equals the compute m·c/W: examples per second peak at "
                  f"{peaks}.")
