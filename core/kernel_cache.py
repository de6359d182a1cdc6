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

Where: not in the clone's ``__pycache__`` (numba's default), which every fresh clone compiles anew,
but in one folder per version of ``core``'s source (``kernels_folder()``): every clone, worktree and
Ray worker of one source shares it, and a change to any file of ``core`` (a kernel calls code in
other files, which numba's own stamp, one file's, would not notice) starts a new folder. numba still
checks each file's content hash. A cache is code: the folder is made for its owner alone (0700), and
one that others could write is not used (the clone's ``__pycache__`` is, as numba does by default).
To clear it: ``rm -rf ~/.cache/gradavg/kernels``; ``GRADAVG_KERNEL_CACHE`` names another folder.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import sys
import warnings
from pathlib import Path

import numba
from numba.core import caching

CORE = Path(__file__).resolve().parent
KERNEL_CACHE = "GRADAVG_KERNEL_CACHE"  # the environment variable that names the cache's folder


@functools.cache
def kernels_folder() -> Path:
    """The compiled kernels' folder for this version of ``core`` (its files' contents), numba and Python."""
    root = os.environ.get(KERNEL_CACHE) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "gradavg" / "kernels"
    key = hashlib.sha256(f"{numba.__version__} {sys.version}".encode())
    for path in sorted(CORE.glob("*.py")):
        key.update(path.name.encode() + b"\0" + path.read_bytes())
    return Path(root) / key.hexdigest()[:20]


def _owners_alone(folder: Path) -> bool:
    """Whether ``folder`` and the folders above it up to the cache's root are this user's and no one else
    can write them."""
    for path in (folder, folder.parent):
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
    return True


class SharedLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba's cache locator for ``core``'s kernels: ``kernels_folder()``, where it can be made and is the
    owner's alone; elsewhere (another file, or no such folder) numba's next locator, the clone's."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(kernels_folder())

    def get_cache_path(self):
        return self._cache_path

    def ensure_cache_path(self):
        path = Path(self._cache_path)
        old = os.umask(0o077)
        try:
            path.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)
        if not _owners_alone(path):
            _warn_once("shared", str(path), f"the compiled kernels' cache {path} can be written by other users, so "
                       "it is not used (the kernels are cached beside the code instead); make it yours alone "
                       f"(chmod 700) or name another folder with {KERNEL_CACHE}")
            raise PermissionError(f"{path} can be written by others")
        super().ensure_cache_path()

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != CORE:
            return None
        return super().from_function(py_func, py_file)  # None where the folder cannot be used


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
    caching.CacheImpl._locator_classes = [SharedLocator, *caching.CacheImpl._locator_classes]
