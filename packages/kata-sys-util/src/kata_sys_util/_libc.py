"""The one libc handle (ctypes, errno kept) and the helper that turns a failed call into an OSError."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any


@functools.cache
def libc() -> Any:
    """libc through ctypes with `use_errno`, loaded once per process."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check(rc: int, what: str, path: str | os.PathLike[str] | bytes | None = None) -> int:
    """`rc` when it is not -1; else `OSError(errno, "<what>: <strerror>", path)`."""
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", None if path is None else os.fsdecode(path))
    return rc


def fspath_bytes(path: str | os.PathLike[str] | bytes) -> bytes:
    """A path as the bytes the kernel sees (surrogate escapes kept)."""
    return os.fsencode(path)
