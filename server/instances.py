"""A model's instances: the threads its batches run on."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Any, Callable

from server.threadnames import set_native_thread_name
from server.threadpriority import lower_thread_priority, runtime_nice

__all__ = ["InstancePool"]

_log = logging.getLogger(__name__)


class _Work:
    __slots__ = ("fn", "args", "abandoned", "thread")

    def __init__(self, fn: Callable[..., None], args: tuple) -> None:
        self.fn = fn
        self.args = args
        self.abandoned = False  # set by the execution-timeout watchdog: the thread retires afterwards
        self.thread: threading.Thread | None = None  # the instance thread running it


class InstancePool:
    """``count`` daemon threads taking work from one queue: the model's instances.

    Unlike a ThreadPoolExecutor, an instance stuck in a runtime call can be
    abandoned: :meth:`replace` starts a fresh thread at once, and the stuck one
    exits when (if ever) its call returns.  The threads are daemons, so a call
    that never returns cannot hold up the process exit.
    """

    def __init__(self, count: int, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: set[threading.Thread] = set()
        self._stuck: set[threading.Thread] = set()  # abandoned, still inside a runtime call
        self._lock = threading.Lock()
        self._n = itertools.count()
        self._shutdown = False
        for _ in range(count):
            self._start_thread()

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._worker, name=f"{self._name}-{next(self._n)}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _worker(self) -> None:
        me = threading.current_thread()
        set_native_thread_name(me.name)  # top -H and profilers show "kiln-<model>-<n>", not "python"
        lower_thread_priority(runtime_nice())  # kiln serve --runtime-nice: the event loop goes first
        try:
            while True:
                work = self._queue.get()
                if work is None:
                    return
                with self._lock:
                    if work.abandoned:
                        return  # given up before it started: its replacement is already running
                    work.thread = me
                try:
                    work.fn(*work.args)
                except BaseException:  # noqa: BLE001 - the work reports its own errors
                    _log.exception("instance thread %s: unexpected error", me.name)
                if work.abandoned:
                    return  # replaced while it ran: a fresh thread already took its place
        finally:
            with self._lock:
                self._threads.discard(me)
                self._stuck.discard(me)

    def submit(self, fn: Callable[..., None], *args: Any) -> _Work:
        work = _Work(fn, args)
        self._queue.put(work)
        return work

    def replace(self, work: _Work) -> None:
        """``work`` is stuck: its thread retires when it returns; start a replacement now."""
        with self._lock:
            work.abandoned = True
            if work.thread is not None:
                self._stuck.add(work.thread)
        if not self._shutdown:
            self._start_thread()

    @property
    def thread_count(self) -> int:
        """Live instance threads, not counting abandoned ones still stuck in a call."""
        with self._lock:
            return len(self._threads - self._stuck)

    def shutdown(self, wait: bool = True) -> None:
        """Stop every thread once the queued work is done; with ``wait``, join them (never an
        abandoned one still stuck in its call)."""
        self._shutdown = True
        with self._lock:
            threads = list(self._threads - self._stuck)
        for _ in threads:
            self._queue.put(None)
        if wait:
            me = threading.current_thread()
            for thread in threads:
                if thread is not me:
                    thread.join()
