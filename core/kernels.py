"""Compiled copies of the reference: the path training runs on.

``gradient_sum`` in ``core/backprop.py`` (BP1–BP4 over a batch) and the cuts, in-order add and
update of ``core/step.py`` say what is computed; this module computes the same with the same
products, compiled by numba so that a mini-batch of 10 is not paid for in interpreter overhead:
at [784, 30, 10] the arithmetic of a step takes about 20 µs and numpy's calls around it took
three times that. Each part, and the reference it copies, is in the table of ``core/step.py``;
``tests/test_core.py`` holds each to its reference, bit for bit (``_chunk_sum`` also to
``per_example_gradient_sum`` and finite differences). ``_chunk_sum`` copies a chunk's rows out of the
training set itself (``_copy_rows``, faster here than ``np.take``) and multiplies the input layer a
block of ``INPUT_BLOCK`` examples at a time (``core.blas.gemm``), in the buffers of a ``Workspace``;
``_add_and_update`` subtracts dtype(η/m)·∇ after the decay, never as a fused multiply-add.

Every gradient sum of a training run, on every backend and every Ray worker, comes from the
same chunk kernel and every step ends in the same ``_add_and_update``, so the bits do not depend
on which backend ran the job, how many workers or threads it had, or which thread computed which
chunk. The products are calls to SciPy's BLAS, one thread each (``core.blas.one_thread``):
through numba's ``np.dot`` for the small layers, ``?gemm`` called directly for the input layer's
two. The kernels implement the sigmoid activation only and refuse a network with another.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from core.blas import N, T, gemm, gemm_scratch
from core.network import Network
from core.step import piece_count
from core.workspace import Workspace

# BP1 for each cost with sigmoid output (the only activation): δ^L = (a − y) ⊙ σ'(z^L), or a − y
COST_CODES = {"quadratic": 0, "cross_entropy": 1}

# The two products with the input layer (eq. 25's w^1 x and BP4's δ^1 x^T) take 32 examples at a
# time: OpenBLAS multiplies matrices that small without first copying them into its packed layout,
# which at [784, 30, 10] is 15–20% faster than one product over the whole chunk, and the block of
# rows stays in the core's cache from copying it to multiplying it. A fixed size, so the bits
# depend only on the chunk.
INPUT_BLOCK = 32


@numba.njit(nogil=True, cache=True)
def _piece(index, size, n):
    """``core.step.piece``: positions lo … hi − 1 of piece ``index`` of n cut into pieces of ``size``."""
    lo = index * size
    return lo, min(lo + size, n)


@numba.njit(nogil=True, cache=True)
def _piece_count(n, size):
    """``core.step.piece_count``: ⌈n / size⌉."""
    return -(-n // size)


@numba.njit(nogil=True, cache=True)
def _sigmoid_with_bias(z, b, one):
    """z ← σ(z + b), with b broadcast along the examples (columns)."""  # z (n_l, m)
    for j in range(z.shape[0]):
        for i in range(z.shape[1]):
            z[j, i] = one / (one + np.exp(-(z[j, i] + b[j])))


@numba.njit(nogil=True, cache=True)
def _times_sigmoid_prime(delta, a, one):
    """δ ← δ ⊙ σ'(z) with σ'(z) = a(1 − a) (BP2's second factor)."""
    for j in range(delta.shape[0]):
        for i in range(delta.shape[1]):
            delta[j, i] *= (one - a[j, i]) * a[j, i]


@numba.njit(nogil=True, cache=True)
def _row_sums(delta, out):
    """BP3 summed over the batch: out_j = Σ_x δ_j."""
    for j in range(delta.shape[0]):
        s = delta[j, 0]
        for i in range(1, delta.shape[1]):
            s += delta[j, i]
        out[j] = s


@numba.njit(nogil=True, cache=True)
def _copy_rows(x, rows, out):
    """out[i] = x[rows[i]], eight rows at a time: eight streams in flight at once copy
    shuffled rows faster than one after another (a row is a few KiB, read from memory)."""
    m, d = rows.shape[0], x.shape[1]
    i = 0
    while i + 8 <= m:
        r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
        r4, r5, r6, r7 = rows[i + 4], rows[i + 5], rows[i + 6], rows[i + 7]
        for k in range(d):
            out[i, k] = x[r0, k]
            out[i + 1, k] = x[r1, k]
            out[i + 2, k] = x[r2, k]
            out[i + 3, k] = x[r3, k]
            out[i + 4, k] = x[r4, k]
            out[i + 5, k] = x[r5, k]
            out[i + 6, k] = x[r6, k]
            out[i + 7, k] = x[r7, k]
        i += 8
    for j in range(i, m):
        r = rows[j]
        for k in range(d):
            out[j, k] = x[r, k]


@numba.njit(nogil=True, cache=True)
def _chunk_sum(weights, biases, x, labels, rows, cost, one, xs, acts, deltas, slot, out):
    """Σ_x ∂C_x/∂params over ``x[rows]`` into ``out`` (flat, weights then biases), with the
    buffers of workspace slot ``slot``."""
    m, d, L = rows.shape[0], x.shape[1], len(weights)
    xb = xs[slot, : m * d].reshape(m, d)  # the chunk's rows, one example per row
    x_flat = xs[slot, : m * d]
    scratch = gemm_scratch(x)
    # eq. 25, layer by layer; activations one column per example, as in the book
    n = weights[0].shape[0]
    a_flat = acts[0][slot, : n * m]
    w_flat = weights[0].reshape(n * d)
    for lo in range(0, m, INPUT_BLOCK):  # copy a block of rows, then z^1 = w^1 x for them
        hi = min(lo + INPUT_BLOCK, m)
        _copy_rows(x, rows[lo:hi], xb[lo:hi])
        # column-major: a[:, lo:hi]^T (hi − lo, n_1), ld m  ←  xb[lo:hi] (hi − lo, d) · (w^1)^T (d, n_1)
        gemm(T, N, hi - lo, n, d, x_flat[lo * d :], d, w_flat, d, 0, a_flat[lo:], m, scratch)
    a = a_flat.reshape(n, m)  # (n_1, m)
    _sigmoid_with_bias(a, biases[0], one)
    for layer in range(1, L):
        n, n_in = weights[layer].shape
        a = acts[layer][slot, : n * m].reshape(n, m)
        np.dot(weights[layer], acts[layer - 1][slot, : n_in * m].reshape(n_in, m), a)
        _sigmoid_with_bias(a, biases[layer], one)
    # BP1, with y(x) the one-hot column of the label
    zero = one - one
    delta = deltas[L - 1][slot, : n * m].reshape(n, m)
    for j in range(n):
        for i in range(m):
            y = one if labels[rows[i]] == j else zero
            if cost == 0:
                delta[j, i] = (a[j, i] - y) * ((one - a[j, i]) * a[j, i])
            else:
                delta[j, i] = a[j, i] - y
    # where each layer's ∂C/∂w and ∂C/∂b end in out, laid out as params: all weights, then all biases
    b_end = w_end = out.shape[0]
    for layer in range(L):
        w_end -= biases[layer].size
    for layer in range(L - 1, -1, -1):
        n, n_in = weights[layer].shape
        w_end -= n * n_in
        b_end -= n
        nabla_w = out[w_end : w_end + n * n_in].reshape(n, n_in)
        delta = deltas[layer][slot, : n * m].reshape(n, m)
        if layer == 0:  # BP4 summed over the batch, a block of examples at a time: Σ δ^1 x^T
            d_flat = deltas[0][slot, : n * m]
            for lo in range(0, m, INPUT_BLOCK):
                hi = min(lo + INPUT_BLOCK, m)
                # column-major: (∂C/∂w^1)^T (d, n_1) ← xb[lo:hi]^T (d, hi − lo) · δ[:, lo:hi]^T (hi − lo, n_1), ld m
                gemm(N, N, d, n, hi - lo, x_flat[lo * d :], d, d_flat[lo:], m, 0 if lo == 0 else 1,
                     out[w_end:], d, scratch)
            _row_sums(delta, out[b_end : b_end + n])  # BP3
            break
        a_in = acts[layer - 1][slot, : n_in * m].reshape(n_in, m)
        np.dot(delta, a_in.T, nabla_w)
        _row_sums(delta, out[b_end : b_end + n])
        below = deltas[layer - 1][slot, : n_in * m].reshape(n_in, m)
        np.dot(weights[layer].T, delta, below)  # BP2
        _times_sigmoid_prime(below, a_in, one)


@numba.njit(parallel=True, cache=True)
def _chunk_sums(weights, biases, x, labels, batch, chunk_size, cost, one, xs, acts, deltas, sums):
    """Chunk c of ``batch`` (``core.step.chunk_bounds``'s cut) into ``sums[c]``, the chunks shared out
    over the workspace's slots, one thread each."""
    n_chunks, slots = sums.shape[0], xs.shape[0]
    for slot in numba.prange(slots):
        for c in range(slot, n_chunks, slots):
            lo, hi = _piece(c, chunk_size, batch.shape[0])
            _chunk_sum(weights, biases, x, labels, batch[lo:hi], cost, one, xs, acts, deltas, slot, sums[c])


@numba.njit(nogil=True, cache=True)
def _update(params, nabla, scale, n_weights, decay, one):
    """``update_in_place``'s arithmetic: w ← decay·w, then x ← x − scale·∇ (two roundings).
    Without decay (decay == 1) the weights are left alone: multiplying by 1 changes no bit."""
    if decay != one:
        for i in range(n_weights):
            params[i] *= decay
    for i in range(params.shape[0]):
        step = nabla[i] * scale
        params[i] -= step


@numba.njit(nogil=True, cache=True)
def _add_and_update(params, sums, n_chunks, total, count, eta, scale, n_weights, decay, one):
    """The end of every training step, on every backend: the chunk sums ``sums[:n_chunks]`` added
    left to right in chunk order (``add_in_order``) into ``total``, then the update with the step
    size η/m, m the chunks' ``count``, rounded to the parameters' dtype in ``scale[0]`` (as numpy
    rounds a Python float for an array): the one place η/m is computed. One chunk's sum is the
    total itself (copying it would change no bit)."""
    scale[0] = eta / count
    if n_chunks == 1:
        _update(params, sums[0], scale[0], n_weights, decay, one)
        return
    total[:] = sums[0]
    for c in range(1, n_chunks):
        part = sums[c]
        for i in range(total.shape[0]):
            total[i] += part[i]
    _update(params, total, scale[0], n_weights, decay, one)


@numba.njit(nogil=True, cache=True)
def _run_steps(weights, biases, params, n_weights, sums, x, labels, order, first, last, batch_size, cost, one,
               eta, decay, xs, acts, deltas):
    """``descend`` with every mini-batch one chunk, on workspace slot 0. A mini-batch's count is its
    rows (``hi - lo``): the chunks' counts, added."""
    scale = np.empty(1, params.dtype)
    for step in range(first, last):
        lo, hi = _piece(step, batch_size, order.shape[0])
        _chunk_sum(weights, biases, x, labels, order[lo:hi], cost, one, xs, acts, deltas, 0, sums[0])
        _add_and_update(params, sums, 1, sums[0], hi - lo, eta, scale, n_weights, decay, one)


@numba.njit(nogil=True, cache=True)
def _run_chunked_steps(weights, biases, params, n_weights, total, sums, x, labels, order, first, last, batch_size,
                       chunk_size, cost, one, eta, decay, xs, acts, deltas):
    """``descend`` with a mini-batch's chunks computed at once on the workspace's slots."""
    scale = np.empty(1, params.dtype)
    for step in range(first, last):
        lo, hi = _piece(step, batch_size, order.shape[0])
        n_chunks = _piece_count(hi - lo, chunk_size)
        _chunk_sums(weights, biases, x, labels, order[lo:hi], chunk_size, cost, one, xs, acts, deltas,
                    sums[:n_chunks])
        _add_and_update(params, sums, n_chunks, total, hi - lo, eta, scale, n_weights, decay, one)


@numba.njit(parallel=True, cache=True)
def _planned_chunk_sums(weights, biases, x, labels, order, cuts, c0, c1, cost, one, xs, acts, deltas, sums):
    """Chunks ``c0`` to ``c1 - 1`` of a plan (chunk c is ``order[cuts[c]:cuts[c + 1]]``) into ``sums[c - c0]``,
    shared out over the workspace's slots, one thread each."""
    slots = xs.shape[0]
    for slot in numba.prange(slots):
        for c in range(c0 + slot, c1, slots):
            _chunk_sum(weights, biases, x, labels, order[cuts[c] : cuts[c + 1]], cost, one, xs, acts, deltas, slot,
                       sums[c - c0])


@numba.njit(nogil=True, cache=True)
def _run_planned_steps(weights, biases, params, n_weights, total, sums, x, labels, order, cuts, firsts, first, last,
                       batch_size, cost, one, eta, decay, xs, acts, deltas):
    """``descend`` with each step's chunks given by a plan (``core.plan.epoch_cuts``), computed at once."""
    scale = np.empty(1, params.dtype)
    for step in range(first, last):
        lo, hi = _piece(step, batch_size, order.shape[0])
        c0, c1 = firsts[step], firsts[step + 1]
        _planned_chunk_sums(weights, biases, x, labels, order, cuts, c0, c1, cost, one, xs, acts, deltas, sums)
        _add_and_update(params, sums, c1 - c0, total, hi - lo, eta, scale, n_weights, decay, one)


def run_planned_steps(network: Network, x: np.ndarray, labels: np.ndarray, order: np.ndarray, cuts: np.ndarray,
                      firsts: np.ndarray, first: int, last: int, batch_size: int, eta: float, lmbda: float,
                      sums: np.ndarray, workspace: Workspace) -> None:
    """``run_steps`` with chunks cut by a plan (``core.plan.epoch_cuts``: at blocks, ``shuffle=blocks``) instead
    of by ``chunk_size`` alone; the same chunk kernel and ``_add_and_update``, so the same bits as
    ``descend`` with ``add_and_update_rows`` over the same chunks (Ray's workers). ``sums`` needs a row
    per chunk of the step with the most, and one more; the workspace must fit the longest chunk."""
    _check_network(network)
    if last <= first:
        return
    lengths = np.diff(cuts)
    per_step = np.diff(firsts[first : last + 1])
    rows = int(lengths[firsts[first] : firsts[last]].max())
    _check_buffers(network, x, workspace, rows, sums)
    if sums.shape[0] < int(per_step.max()) + 1:
        raise ValueError(f"sums has {sums.shape[0]} rows; a step of this plan needs {int(per_step.max()) + 1}")
    if order.size and (order.min() < 0 or order.max() >= x.shape[0]):
        raise ValueError("the order names rows the training set does not have")
    _run_planned_steps(tuple(network.weights), tuple(network.biases), network.params, network.n_weights, sums[-1],
                       sums[:-1], x, labels, order, cuts, firsts, first, last, batch_size, COST_CODES[network.cost],
                       network.dtype.type(1.0), float(eta), _decay(network, eta, lmbda, order.shape[0]),
                       workspace.x_slots, workspace.activation_slots, workspace.delta_slots)


def _check_network(network: Network) -> None:
    """The kernels compute σ as the sigmoid (σ' = a(1 − a) in BP1 and BP2) and BP1 for the costs of
    ``COST_CODES``: refuse a network they would train as something else."""
    if network.activation != "sigmoid":
        raise ValueError(f"the compiled training path (core.kernels) implements the sigmoid activation only, not "
                         f"{network.activation!r}; train with activation=sigmoid, or add the activation's σ and "
                         "σ' to the kernels")
    if network.cost not in COST_CODES:
        raise ValueError(f"the compiled training path (core.kernels) implements BP1 for the costs "
                         f"{', '.join(COST_CODES)} only, not {network.cost!r}")


def _check_buffers(network: Network, x: np.ndarray, workspace: Workspace, rows: int, sums: np.ndarray) -> None:
    """The compiled code checks no bounds: refuse buffers it would overrun, or of another dtype."""
    if x.dtype != network.dtype or x.shape[1] != network.sizes[0]:
        raise ValueError(f"x is {x.dtype} with {x.shape[1]} inputs; the network takes {network.dtype} "
                         f"with {network.sizes[0]}")
    if not workspace.fits(network, rows):
        raise ValueError(f"the workspace does not fit chunks of {rows} rows of this network")
    if sums.dtype != network.dtype or sums.shape[1:] != network.params.shape or not sums.flags.c_contiguous:
        raise ValueError("gradient sums must be contiguous and shaped and typed like network.params")


def chunk_gradient_sum(network: Network, x: np.ndarray, labels: np.ndarray, rows: np.ndarray, out: np.ndarray,
                       workspace: Workspace) -> tuple[np.ndarray, int]:
    """Σ_x ∂C_x/∂params over ``x[rows]`` (flat, laid out like ``network.params``) and the count."""
    _check_network(network)
    m = rows.shape[0]
    if m == 0:
        out.fill(0.0)
        return out, 0
    _check_buffers(network, x, workspace, m, out[None])
    _chunk_sum(tuple(network.weights), tuple(network.biases), x, labels, rows, COST_CODES[network.cost],
               network.dtype.type(1.0), workspace.x_slots, workspace.activation_slots, workspace.delta_slots, 0, out)
    return out, m


def compiled_gradient_sum(network: Network, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Σ_x ∂C_x/∂params over all rows of ``x`` as training computes it (one chunk), and the count."""
    m = labels.shape[0]
    workspace = Workspace(network.sizes, max(m, 1), network.dtype)
    return chunk_gradient_sum(network, x, labels, np.arange(m), np.empty_like(network.params), workspace)


def run_steps(network: Network, x: np.ndarray, labels: np.ndarray, order: np.ndarray, first: int, last: int,
              batch_size: int, eta: float, lmbda: float, sums: np.ndarray, workspace: Workspace,
              chunk_size: int | None = None) -> None:
    """Mini-batch steps ``first`` to ``last - 1`` of the epoch whose shuffle is ``order``, in place on
    ``network.params``: ``core.step.descend`` over the chunk sums of ``x[order[…]]``, compiled.

    A mini-batch larger than ``chunk_size`` is cut into chunks as ``core.step.chunk_bounds`` cuts
    it, their sums computed at once on the workspace's slots (one thread each) into the rows of
    ``sums`` and added in chunk order, as every backend adds them. The workspace must fit a chunk;
    ``sums`` needs one row per chunk of a mini-batch and one more, for the total.
    """
    _check_network(network)
    rows = min(batch_size, chunk_size or batch_size, order.shape[0])
    _check_buffers(network, x, workspace, rows, sums)
    if sums.shape[0] < piece_count(min(batch_size, order.shape[0]), rows) + 1:
        raise ValueError(f"sums has {sums.shape[0]} rows; mini-batches of {batch_size} in chunks of {rows} "
                         "need one per chunk and one for their total")
    args = (tuple(network.weights), tuple(network.biases), network.params, network.n_weights)
    tail = (COST_CODES[network.cost], network.dtype.type(1.0), float(eta), _decay(network, eta, lmbda, order.shape[0]),
            workspace.x_slots, workspace.activation_slots, workspace.delta_slots)
    if chunk_size is None or batch_size <= chunk_size:
        _run_steps(*args, sums, x, labels, order, first, last, batch_size, *tail)
    else:
        _run_chunked_steps(*args, sums[-1], sums[:-1], x, labels, order, first, last, batch_size, chunk_size, *tail)


def _decay(network: Network, eta: float, lmbda: float, n_train: int):
    """w ← (1 − ηλ/n) w's factor, rounded to the network's dtype as ``update_in_place``'s numpy rounds it."""
    return network.dtype.type(1.0 - eta * lmbda / n_train)


def add_and_update(network: Network, sums: np.ndarray, n_chunks: int, count: int, eta: float, lmbda: float,
                   n_train: int) -> None:
    """One step from its chunk sums, in place on ``network.params``: ``sums[:n_chunks]`` (one row per
    chunk, in chunk order) added left to right into ``sums[n_chunks]``, then ``update_in_place``
    with ∂C/∂params = total / count. The same compiled code ends every step of ``run_steps``."""
    if count <= 0:
        raise ValueError("cannot update from zero examples")
    if sums.dtype != network.dtype or sums.shape[0] <= n_chunks or sums.shape[1:] != network.params.shape \
            or not sums.flags.c_contiguous:
        raise ValueError(f"sums must be contiguous {network.dtype} rows like network.params, "
                         f"one per chunk ({n_chunks}) and one for their total")
    _add_and_update(network.params, sums, n_chunks, sums[n_chunks], count, float(eta), np.empty(1, network.dtype),
                    network.n_weights, _decay(network, eta, lmbda, n_train), network.dtype.type(1.0))


def add_and_update_rows(network: Network, rows: tuple[np.ndarray, int], eta: float, lmbda: float,
                        n_train: int) -> None:
    """``core.step.add_and_update``'s compiled twin for ``core.step.descend``, for chunk sums computed
    elsewhere (Ray's workers): ``rows`` is the sums as rows in chunk order, with one spare row for their
    total, and the count the chunks returned."""
    sums, count = rows
    add_and_update(network, sums, sums.shape[0] - 1, count, eta, lmbda, n_train)


def cached() -> bool:
    """Whether numba's on-disk cache already holds the training kernels (a first run compiles
    them, which takes seconds). True where the cache cannot be inspected."""
    try:
        return all(os.path.exists(kernel._cache._cache_file._index_path)
                   for kernel in (_run_steps, _chunk_sum))
    except AttributeError:  # numba's cache internals moved: assume the common case
        return True
