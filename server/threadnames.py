"""OS-level thread names, so that `top -H`, `ps -L`, py-spy and perf say which thread is which.

Python's thread names live only in Python (before 3.14); the kernel still calls every thread
"python". Linux keeps at most 15 bytes of a thread's name, so a long name is cut in the middle
and keeps its end ("kiln-resnet50_onnx-0" -> "kiln-resnet50-0"): the end is the instance number.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

__all__ = ["native_thread_name", "set_native_thread_name"]

MAX_BYTES = 15  # TASK_COMM_LEN - 1
_PR_SET_NAME = 15

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def native_thread_name(name: str) -> str:
    """`name` as the kernel can hold it: at most 15 bytes, keeping the last "-N" part whole."""
    encoded = name.encode("ascii", "replace")
    if len(encoded) <= MAX_BYTES:
        return encoded.decode()
    head, sep, tail = encoded.rpartition(b"-")
    if not sep or len(tail) + 1 >= MAX_BYTES:
        return encoded[:MAX_BYTES].decode()
    return (head[: MAX_BYTES - len(tail) - 1] + b"-" + tail).decode()


def set_native_thread_name(name: str | None = None) -> bool:
    """Give the calling thread `name` (default: its Python name) at the OS level; False where
    the platform has no such call (it changes nothing then)."""
    if _libc is None:
        return False
    wanted = native_thread_name(name if name is not None else threading.current_thread().name)
    return _libc.prctl(_PR_SET_NAME, wanted.encode(), 0, 0, 0) == 0
