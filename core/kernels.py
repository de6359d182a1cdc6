"""The batched backward pass of ``core.backprop``, compiled: the path training runs on.

``gradient_sum`` in ``core/backprop.py`` is the readable numpy version of BP1–BP4 over a
batch; this module computes the same sums with the same products, compiled by numba so
that a mini-batch of 10 is not paid for in interpreter overhead: at [784, 30, 10] the
arithmetic of a step takes about 20 µs and numpy's calls around it took three times that.
What it does beyond ``gradient_sum``:

- ``chunk_gradient_sum`` gathers the chunk's rows itself (``_gather``, faster here than
  ``np.take``) and computes Σ_x ∂C_x/∂params for them, the input layer's products a block
  of ``INPUT_BLOCK`` examples at a time;
- ``run_steps`` runs whole stretches of gradient descent (gather, sum, update) without
  returning to Python between steps; a mini-batch of several chunks has its chunks
  computed at once on numba's threads, one workspace slot each;
- ``add_and_update`` ends every training step on every backend: a mini-batch's chunk sums
  added left to right in chunk order, as ``add_in_order`` adds them, then the update with
  ``update_in_place``'s arithmetic (x ← x − dtype(η/m)·∇, after the decay, never a fused
  multiply-add). ``run_steps`` calls it after computing the chunk sums itself; the Ray
  driver calls it on the chunk sums its workers return (``steps_from_chunk_sums``).

Every gradient sum of a training run, on every backend and every Ray worker, comes from
the same chunk kernel and every step ends in the same ``add_and_update``, so the bits do
not depend on which backend ran the job, how many workers or threads it had, or which
thread computed which chunk. The products are calls to SciPy's BLAS, one
thread each: through numba's ``np.dot`` for the small layers, ``?gemm`` called directly for
the input layer's two.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import llvmlite.binding as llvm
import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  the BLAS the products call: loaded now, so thread limits reach it
from numba.core import types
from numba.extending import get_cython_function_address, overload

from core.average import chunk_bounds
from core.backprop import Workspace
from core.network import Network

# BP1 for each cost with sigmoid output (the only activation): δ^L = (a − y) ⊙ σ'(z^L), or a − y
COST_CODES = {"quadratic": 0, "cross_entropy": 1}

# The two products with the input layer (eq. 25's w^1 x and BP4's δ^1 x^T) take 32 examples at a
# time: OpenBLAS multiplies matrices that small without first copying them into its packed layout,
# which at [784, 30, 10] is 15–20% faster than one product over the whole chunk, and the block of
# rows stays in the core's cache from gathering it to multiplying it. A fixed size, so the bits
# depend only on the chunk.
INPUT_BLOCK = 32

_N, _T = ord("N"), ord("T")


def _blas_gemm(name):
    """SciPy's Fortran ?gemm (every argument by pointer), called from compiled code by a symbol
    name, so that numba can cache the code that calls it."""
    symbol = f"gradavg_scipy_{name}"
    llvm.add_symbol(symbol, get_cython_function_address("scipy.linalg.cython_blas", name))
    return types.ExternalFunction(symbol, types.void(*[types.voidptr] * 13))


_DGEMM, _SGEMM = _blas_gemm("dgemm"), _blas_gemm("sgemm")


def _gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, ints, scalars):
    """C ← op(A) op(B) + beta·C, column-major as BLAS sees it; ``a``, ``b``, ``c`` are flat arrays
    starting at the matrices' first elements, ``ints`` (int32, 8) and ``scalars`` (2) scratch."""
    raise NotImplementedError("compiled code only")


@overload(_gemm)
def _gemm_compiled(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, ints, scalars):
    gemm = _SGEMM if c.dtype == types.float32 else _DGEMM

    def call(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, ints, scalars):
        ints[0], ints[1], ints[2], ints[3], ints[4] = trans_a, trans_b, m, n, k
        ints[5], ints[6], ints[7] = lda, ldb, ldc
        scalars[0], scalars[1] = 1, beta
        gemm(ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, ints[3:].ctypes, ints[4:].ctypes,
             scalars[0:].ctypes, a.ctypes, ints[5:].ctypes, b.ctypes, ints[6:].ctypes, scalars[1:].ctypes,
             c.ctypes, ints[7:].ctypes)

    return call


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
def _gather(x, rows, out):
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
    ints, scalars = np.empty(8, np.int32), np.empty(2, x.dtype)
    # eq. 25, layer by layer; activations one column per example, as in the book
    n = weights[0].shape[0]
    a_flat = acts[0][slot, : n * m]
    w_flat = weights[0].reshape(n * d)
    for lo in range(0, m, INPUT_BLOCK):  # gather a block of rows, then z^1 = w^1 x for them
        hi = min(lo + INPUT_BLOCK, m)
        _gather(x, rows[lo:hi], xb[lo:hi])
        # column-major: a[:, lo:hi]^T (hi − lo, n_1), ld m  ←  xb[lo:hi] (hi − lo, d) · (w^1)^T (d, n_1)
        _gemm(_T, _N, hi - lo, n, d, x_flat[lo * d :], d, w_flat, d, 0, a_flat[lo:], m, ints, scalars)
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
                _gemm(_N, _N, d, n, hi - lo, x_flat[lo * d :], d, d_flat[lo:], m, 0 if lo == 0 else 1,
                      out[w_end:], d, ints, scalars)
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
    """Chunk c of ``batch`` (``chunk_bounds``'s cut) into ``sums[c]``, the chunks shared out over the
    workspace's slots, one thread each."""
    n_chunks, slots = sums.shape[0], xs.shape[0]
    for slot in numba.prange(slots):
        for c in range(slot, n_chunks, slots):
            lo = c * chunk_size
            hi = min(lo + chunk_size, batch.shape[0])
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
def _add_and_update(params, sums, n_chunks, total, scale, n_weights, decay, one):
    """The end of every training step, on every backend: the chunk sums ``sums[:n_chunks]`` added
    left to right in chunk order (``add_in_order``) into ``total``, then the update. One chunk's
    sum is the total itself (copying it would change no bit)."""
    if n_chunks == 1:
        _update(params, sums[0], scale, n_weights, decay, one)
        return
    total[:] = sums[0]
    for c in range(1, n_chunks):
        part = sums[c]
        for i in range(total.shape[0]):
            total[i] += part[i]
    _update(params, total, scale, n_weights, decay, one)


@numba.njit(nogil=True, cache=True)
def _run_steps(weights, biases, params, n_weights, sums, x, labels, order, first, last, batch_size, cost, one,
               eta, decay, xs, acts, deltas):
    n = order.shape[0]
    scale = np.empty(1, params.dtype)  # dtype(η/m), as numpy rounds a Python float for an array
    for step in range(first, last):
        lo = step * batch_size
        hi = min(lo + batch_size, n)
        _chunk_sum(weights, biases, x, labels, order[lo:hi], cost, one, xs, acts, deltas, 0, sums[0])
        scale[0] = eta / (hi - lo)
        _add_and_update(params, sums, 1, sums[0], scale[0], n_weights, decay, one)


@numba.njit(nogil=True, cache=True)
def _run_chunked_steps(weights, biases, params, n_weights, total, sums, x, labels, order, first, last, batch_size,
                       chunk_size, cost, one, eta, decay, xs, acts, deltas):
    n = order.shape[0]
    scale = np.empty(1, params.dtype)
    for step in range(first, last):
        lo = step * batch_size
        hi = min(lo + batch_size, n)
        n_chunks = (hi - lo + chunk_size - 1) // chunk_size
        _chunk_sums(weights, biases, x, labels, order[lo:hi], chunk_size, cost, one, xs, acts, deltas,
                    sums[:n_chunks])
        scale[0] = eta / (hi - lo)
        _add_and_update(params, sums, n_chunks, total, scale[0], n_weights, decay, one)


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
    ``network.params``: each step the gradient sum of ``x[order[step·batch_size …]]`` and
    ``update_in_place``.

    A mini-batch larger than ``chunk_size`` is cut as ``chunk_bounds`` cuts it, its chunks'
    sums computed at once on the workspace's slots (one thread each) into the rows of ``sums``
    and added in chunk order, as every backend adds them. The workspace must fit a chunk;
    ``sums`` needs one row per chunk of a mini-batch and one more, for the total.
    """
    rows = min(batch_size, chunk_size or batch_size, order.shape[0])
    _check_buffers(network, x, workspace, rows, sums)
    if sums.shape[0] < len(chunk_bounds(min(batch_size, order.shape[0]), rows)) + 1:
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
    _add_and_update(network.params, sums, n_chunks, sums[n_chunks], network.dtype.type(eta / count),
                    network.n_weights, _decay(network, eta, lmbda, n_train), network.dtype.type(1.0))


def steps_from_chunk_sums(chunk_sums: Callable[[Network, np.ndarray], tuple[np.ndarray, int]], network: Network,
                          order: np.ndarray, first: int, last: int, batch_size: int, eta: float,
                          lmbda: float) -> None:
    """Mini-batch steps ``first`` to ``last - 1`` of the epoch shuffled as ``order``, whose chunk sums
    are computed elsewhere (Ray's workers): ``chunk_sums(network, batch)`` returns them as rows in
    chunk order, with one spare row, and the count; ``add_and_update`` adds and applies them, as
    ``run_steps`` does after computing them itself."""
    n = order.shape[0]
    for step in range(first, last):
        batch = order[step * batch_size : (step + 1) * batch_size]
        sums, count = chunk_sums(network, batch)
        add_and_update(network, sums, sums.shape[0] - 1, count, eta, lmbda, n)


def cached() -> bool:
    """Whether numba's on-disk cache already holds the training kernels (a first run compiles
    them, which takes seconds). True where the cache cannot be inspected."""
    try:
        return all(os.path.exists(kernel._cache._cache_file._index_path)
                   for kernel in (_run_steps, _chunk_sum))
    except AttributeError:  # numba's cache internals moved: assume the common case
        return True
