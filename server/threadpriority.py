"""CPU priority of the runtime's threads: `kiln serve --runtime-nice N`.

On a CPU host the runtime's threads (the instances and the compute pool a runtime starts, such
as ONNX Runtime's intra-op threads) compete for the cores with the event loop, which every
request of every model passes through. When the loop waits for a core, answers leave late and
the next batch forms late. A higher nice value on the runtime's threads lets the loop run first
whenever it has work, and the runtime takes the rest of the CPU; without contention nothing
changes. Raising a nice value needs no privilege.

Linux keeps a nice value per thread, and a thread starts with its creator's value: an instance
thread lowers itself as it starts, and a runtime whose pool threads start at load creates its
session on a lowered thread (`call_on_lowered_thread`). The setting reaches this process and its
`--workers` through the environment, as the CPU share does.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["RUNTIME_NICE_ENV", "runtime_nice", "lower_thread_priority", "call_on_lowered_thread"]

RUNTIME_NICE_ENV = "KILN_RUNTIME_NICE"
MAX_NICE = 19


def runtime_nice() -> int:
    """How many steps the runtime's threads sit below the server's own (0: the same priority)."""
    try:
        return min(max(0, int(os.environ.get(RUNTIME_NICE_ENV, "0"))), MAX_NICE)
    except ValueError:
        return 0


def lower_thread_priority(steps: int) -> bool:
    """Raise the calling thread's nice value by ``steps`` (at most to 19); False where the platform
    has no per-thread nice (nothing changes then) or ``steps`` is 0."""
    if steps <= 0 or not hasattr(os, "setpriority"):
        return False
    tid = threading.get_native_id()  # on Linux, PRIO_PROCESS with a thread id sets that thread alone
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + steps, MAX_NICE))
    except OSError:
        return False
    return True


def call_on_lowered_thread(steps: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a fresh thread lowered by ``steps``, so the threads ``fn`` starts inherit the
    lower priority; returns or raises what ``fn`` does. With ``steps`` 0, a plain call."""
    if steps <= 0:
        return fn(*args)
    with ThreadPoolExecutor(1, thread_name_prefix="kiln-runtime-load",
                            initializer=lower_thread_priority, initargs=(steps,)) as one_thread:
        return one_thread.submit(fn, *args).result()
