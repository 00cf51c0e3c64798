"""OS-level thread names, so `top -H`, py-spy and /proc/PID/task/*/comm tell threads apart.

Python 3.11 names threads for Python only; the kernel sees every thread as the process.
Linux keeps 15 bytes of a name. Threads a native library starts (ONNX Runtime's pool)
inherit the name of the thread that created them, hence `os_thread_name` around a
session's creation. Elsewhere than Linux these do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

_PR_SET_NAME, _PR_GET_NAME = 15, 16
_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _libc = None


def set_os_thread_name(name: str) -> None:
    """Name the calling thread (first 15 bytes)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def os_thread_name() -> str:
    if _libc is None:
        return ""
    buf = ctypes.create_string_buffer(16)
    _libc.prctl(_PR_GET_NAME, buf, 0, 0, 0)
    return buf.value.decode(errors="replace")


@contextlib.contextmanager
def named_os_thread(name: str) -> Iterator[None]:
    """The calling thread carries `name` inside the block (threads started there keep it)."""
    old = os_thread_name()
    set_os_thread_name(name)
    try:
        yield
    finally:
        set_os_thread_name(old)
