"""numba's on-disk cache of the compiled kernels, made safe to lose.

numba raises when a cache file is damaged (a truncated ``.nbi`` index: ``UnpicklingError``; a damaged
``.nbc``: ``TypeError`` and others) or cannot be written (a full disk: ``OSError``), and the job would
end in a traceback. A cache is only a shortcut: here, a cache that cannot be read is a miss (its
damaged index is removed, so that the kernels compiled again are saved in its place), and one that
cannot be written is skipped. Each such event is a ``KernelCacheWarning`` of one line, once per
kind of problem and folder; ``jobs`` shows warnings as its own lines.

``tolerate_damage()`` patches numba's ``Cache.load_overload`` and ``Cache.save_overload`` (numba
0.68; the pin in pyproject.toml holds them). It is called when ``core.blas`` loads, before any
kernel compiles.
"""

from __future__ import annotations

import os
import warnings

from numba.core import caching


class KernelCacheWarning(UserWarning):
    """The compiled kernels' cache could not be used; the kernels are compiled instead."""


_said: set[tuple[str, str]] = set()


def _warn_once(kind: str, folder: str, message: str) -> None:
    if (kind, folder) not in _said:
        _said.add((kind, folder))
        warnings.warn(message, KernelCacheWarning, stacklevel=3)


def tolerate_damage() -> None:
    if getattr(caching.Cache, "_gradavg_tolerant", False):
        return
    load, save = caching.Cache.load_overload, caching.Cache.save_overload

    def load_overload(self, sig, target_context):
        try:
            return load(self, sig, target_context)
        except Exception as e:  # any damage: a miss
            index = self._cache_file._index_path
            try:
                os.remove(index)
            except OSError:
                pass
            _warn_once("damaged", self._cache_path, f"the compiled kernels' cache in {self._cache_path} is damaged "
                       f"({type(e).__name__}); compiling the kernels again (delete the folder's .nbi and .nbc files "
                       "to clear it)")
            return None

    def save_overload(self, sig, data):
        try:
            save(self, sig, data)
        except Exception as e:  # a full disk, a read-only folder: the kernels run, uncached
            reason = getattr(e, "strerror", None) or type(e).__name__
            _warn_once("unwritable", self._cache_path, f"the compiled kernels cannot be cached in {self._cache_path} "
                       f"({reason}); they are compiled again in each process")

    caching.Cache.load_overload, caching.Cache.save_overload = load_overload, save_overload
    caching.Cache._gradavg_tolerant = True
