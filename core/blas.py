"""SciPy's BLAS ?gemm, called from compiled code, and the one BLAS thread every chunk runs on.

Why a direct call: the compiled backward pass (``core.kernels``) multiplies the input layer a
block of 32 examples at a time, reading and writing column blocks of larger matrices in place
(a leading dimension longer than the block); numba's ``np.dot`` takes only whole contiguous
arrays. Why by name: numba cannot cache code that holds a Cython function pointer (an address
that changes with every process), so the address is registered with LLVM under a symbol name
and the compiled code calls the name.

What it assumes, checked when this module is loaded (it refuses in one line otherwise, rather
than compute wrong numbers):

- the C signature ``scipy.linalg.cython_blas`` declares for ?gemm: characters by ``char *``,
  integers by ``int *`` of 32 bits (LP64), matrices and scalars by ``double *`` / ``float *``;
  read from the signature SciPy exports with the function;
- a BLAS behind it that reads 32-bit integers: the check's products pass each integer followed
  by a -1 word, so a BLAS that reads 64-bit integers sees negative sizes, refuses the call and
  leaves the result unwritten, and the check fails;
- a little-endian machine (as every platform numba supports), on which that -1 word makes the
  64-bit reading negative.

numba's cache notices changes to a compiled function's own file only: code in ``core.kernels``
that calls ``gemm`` keeps the old binding after this file changes, until ``core/__pycache__``'s
``*.nbi`` and ``*.nbc`` files are deleted.
"""

from __future__ import annotations

import ctypes
import re
import sys

import llvmlite.binding as llvm
import numba
import numpy as np
import scipy.linalg.cython_blas  # the BLAS the products call: loaded now, so that thread limits reach it
from numba.core import types
from numba.extending import get_cython_function_address, overload
from threadpoolctl import threadpool_limits

from core.kernel_cache import tolerate_damage

tolerate_damage()  # before the first kernel compiles (this module's own check, below)

N, T = ord("N"), ord("T")  # the transposes ?gemm takes: op(X) = X or X^T


class BlasBindingError(ImportError):
    """The installed SciPy's BLAS is not the one this binding can call."""


def one_thread() -> threadpool_limits:
    """Limit this process's BLAS to one thread, until ``.restore_original_limits()``.

    Every chunk's products then run on one thread whichever thread or worker computes the
    chunk; with more, OpenBLAS splits a product differently and gives other bits.
    """
    return threadpool_limits(limits=1, user_api="blas")


def _bind(name: str, scalar) -> types.ExternalFunction:
    """SciPy's ``name`` as a function compiled code can call: (transa, transb, m, n, k, alpha, a,
    lda, b, ldb, beta, c, ldc), every argument by pointer, matrices column-major."""
    symbol = f"gradavg_scipy_{name}"
    llvm.add_symbol(symbol, get_cython_function_address("scipy.linalg.cython_blas", name))
    char, int32, x = types.CPointer(types.uint8), types.CPointer(types.int32), types.CPointer(scalar)
    return types.ExternalFunction(symbol, types.void(char, char, int32, int32, int32, x, x, int32, x, int32, x, x,
                                                     int32))


_DGEMM, _SGEMM = _bind("dgemm", types.float64), _bind("sgemm", types.float32)

@numba.njit(nogil=True, cache=True)
def gemm_scratch(like):
    """Memory for ``gemm``'s arguments, which BLAS takes by pointer, for matrices of ``like``'s dtype:
    (m, n, k, lda, ldb, ldc) as 32-bit integers, (alpha, beta), and the two transposes as chars.
    Made once and reused by every call: at a mini-batch of 10 a step makes only two."""
    return np.empty(6, np.int32), np.empty(2, like.dtype), np.empty(2, np.uint8)


def gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, scratch):
    """C ← op(A) op(B) + beta·C, column-major as BLAS sees it: op(A) (m, k), op(B) (k, n), C (m, n).

    ``a``, ``b``, ``c`` are flat arrays of one dtype starting at the matrices' first elements;
    ``trans_a``, ``trans_b`` are ``N`` or ``T``; ``scratch`` is ``gemm_scratch(c)``'s.
    Compiled code only.
    """
    raise NotImplementedError("compiled code only")


@overload(gemm)
def _gemm_compiled(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, scratch):
    call = _SGEMM if c.dtype == types.float32 else _DGEMM

    def impl(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, scratch):
        ints, scalars, chars = scratch
        ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = m, n, k, lda, ldb, ldc
        scalars[0], scalars[1] = 1, beta  # alpha, beta
        chars[0], chars[1] = trans_a, trans_b
        call(chars[0:].ctypes, chars[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
             scalars[0:].ctypes, a.ctypes, ints[3:].ctypes, b.ctypes, ints[4:].ctypes, scalars[1:].ctypes,
             c.ctypes, ints[5:].ctypes)

    return impl


@numba.njit(cache=True)
def _gemm_from_python(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, scratch):
    gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, scratch)


def product(a: np.ndarray, b: np.ndarray, trans_a: str = "N", trans_b: str = "N", pad: int = 0) -> np.ndarray:
    """2 op(a) op(b) by two calls of the bound ?gemm (beta 0, then 1), for checks and tests.

    The operands are laid out column-major with ``pad`` unused rows below each column (a
    leading dimension longer than the column, as in the kernels' blocks), filled with NaN
    so that reading them shows; so is the result before the first call, which must not read
    it. Each integer is followed by a -1 word (see the module's docstring).
    """
    if sys.byteorder != "little":
        raise BlasBindingError("core.blas: this machine is big-endian; the ?gemm binding assumes little-endian")
    op_a, op_b = (a.T if trans_a == "T" else a), (b.T if trans_b == "T" else b)
    (m, k), n = op_a.shape, op_b.shape[1]
    a_flat, lda = _column_major(a, pad)
    b_flat, ldb = _column_major(b, pad)
    c_flat, ldc = _column_major(np.full((m, n), np.nan, a.dtype), pad)
    ints, scalars, chars = gemm_scratch(a)
    ints = np.full(2 * ints.size, -1, np.int32)[::2]  # each integer followed by a -1 word
    for beta in (0, 1):
        _gemm_from_python(ord(trans_a), ord(trans_b), m, n, k, a_flat, lda, b_flat, ldb, beta, c_flat, ldc,
                          (ints, scalars, chars))
    return c_flat.reshape(n, ldc)[:, :m].T


def _column_major(x: np.ndarray, pad: int) -> tuple[np.ndarray, int]:
    """x's columns one after another, each followed by ``pad`` NaNs, and the leading dimension."""
    columns = np.full((x.shape[1], x.shape[0] + pad), np.nan, x.dtype)
    columns[:, : x.shape[0]] = x.T
    return columns.reshape(-1), x.shape[0] + pad


def _check_signatures() -> None:
    """The C signatures SciPy declares for ?gemm are the ones ``_bind`` calls."""
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    for name, scalar in (("dgemm", "double"), ("sgemm", "float")):
        signature = get_name(scipy.linalg.cython_blas.__pyx_capi__[name]).decode()
        # Cython names the scalar types by their typedefs (…cython_blas_d for double, …_s for float)
        kinds = [re.sub(r"^\w*cython_blas_([ds]) \*$", lambda t: {"d": "double *", "s": "float *"}[t[1]], arg)
                 for arg in re.findall(r"\((.*)\)", signature)[0].split(", ")]
        x = f"{scalar} *"
        want = ["char *", "char *", "int *", "int *", "int *", x, x, "int *", x, "int *", x, x, "int *"]
        if not signature.startswith("void") or kinds != want or ctypes.sizeof(ctypes.c_int) != 4:
            raise BlasBindingError(f"core.blas: scipy.linalg.cython_blas.{name} is declared as {signature!r}, not the "
                                   "LP64 signature (char*, int* of 32 bits, ...) it is called with; install a SciPy "
                                   "within pyproject.toml's bounds")


def _check_products() -> None:
    """Products of small whole numbers (exact in either dtype) against numpy's, every transpose."""
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        a, b = rng.integers(-8, 9, (5, 3)).astype(dtype), rng.integers(-8, 9, (3, 4)).astype(dtype)
        for trans_a in "NT":
            for trans_b in "NT":
                got = product(a.T if trans_a == "T" else a, b.T if trans_b == "T" else b, trans_a, trans_b, pad=2)
                if not np.array_equal(got, 2 * (a @ b)):
                    raise BlasBindingError(
                        f"core.blas: SciPy's {'d' if dtype == np.float64 else 's'}gemm called by symbol multiplied "
                        f"wrongly (transposes {trans_a}{trans_b}): its BLAS does not take the 32-bit integers "
                        "cython_blas declares; reinstall SciPy from its wheels within pyproject.toml's bounds")


_check_signatures()
_check_products()
