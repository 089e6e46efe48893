"""One load-generating process of `kiln bench`: a grpc.aio client on its own event loop.

The parent sends a StepSpec per step over a queue; the worker runs it (closed loop:
N users each awaiting its answer before sending again; open loop: Poisson arrivals
at a fixed rate, latency counted from each request's scheduled send time) and sends
back a StepResult. Requests are pre-serialized bytes, sent through a generic
unary-unary call (no serializer) so the client spends its CPU on gRPC, not protobuf;
with `streaming`, over ModelStreamInfer streams instead (streams.py).
All times are time.monotonic(), which on Linux is one clock for every process.
"""

from __future__ import annotations

import asyncio
import functools
import os
import resource
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from loadtests.bench.streams import StreamError, StreamPool
from server import eventloop
from server.channels import ClientSecurity

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE = 256 * 1024 * 1024
# open loop: an arrival scheduled before the window's end may still be sent this long after it
# (the timer thread hands arrivals over a little late); after that, what is left counts as unsent
ARRIVAL_GRACE_S = 0.05


@dataclass
class StepSpec:
    mode: str  # "closed" or "open"
    concurrency: int  # closed loop: users in this process
    rate: float  # open loop: this process's share of the arrival rate, requests/s
    start_at: float  # monotonic time when load starts (warm-up first)
    measure_start: float  # requests sent (closed) or scheduled (open) in [measure_start, measure_end) count
    measure_end: float
    timeout_s: float
    max_inflight: int  # open loop: outstanding requests allowed in this process
    seed: int = 0


@dataclass
class StepResult:
    worker: int
    latencies_s: np.ndarray  # successful requests of the window (open loop: from the scheduled time)
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)  # status -> the first call's details
    response_bytes: int = 0
    scheduled: int = 0  # open loop: arrivals in the window
    unsent: int = 0  # open loop: arrivals of the window never sent (in-flight cap or client too slow)
    send_lag_s: np.ndarray | None = None  # open loop: actual send - scheduled time
    last_completion: float = 0.0
    inflight_cap_hits: int = 0
    answered_in_window: int = 0  # OK answers that arrived in the window, whenever they were scheduled
    cpu_s: float = 0.0  # this process's user+system CPU over the step
    wall_s: float = 0.0


class _Recorder:
    def __init__(self, worker: int, progress, index: int, window: tuple[float, float]) -> None:
        self.worker = worker
        self.window = window
        self.answered_in_window = 0
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.sent = 0
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.error_examples: dict[str, str] = {}
        self.response_bytes = 0
        self.last_completion = 0.0
        self._progress = progress
        self._index = index

    def answered(self, finished: float, code: str | None) -> None:
        if code is None and self.window[0] <= finished < self.window[1]:
            self.answered_in_window += 1

    def done(self, latency_s: float, finished: float, code: str | None, answer: int | str) -> None:
        """`answer`: as `_call` returns it, the response's length or the error's details."""
        if code is None:
            self.ok += 1
            self.latencies.append(latency_s)
            self.response_bytes += answer
        else:
            self.errors[code] = self.errors.get(code, 0) + 1
            self.error_examples.setdefault(code, str(answer))
        if finished > self.last_completion:
            self.last_completion = finished
        if self._progress is not None:
            self._progress[self._index] += 1


async def _call(call, request: bytes, timeout: float) -> tuple[str | None, int | str]:
    """(None, response length) on success, else (status name, the error's details)."""
    import grpc

    try:
        response = await call(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    except StreamError as exc:
        return exc.code, exc.details
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a client-side failure is an error of the step, not of the tool
        return f"CLIENT_{type(exc).__name__}", str(exc)
    return None, len(response)


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _closed_loop(spec: StepSpec, calls, requests: list[bytes], rec: _Recorder) -> None:
    async def user(k: int) -> None:
        call = calls[k % len(calls)]
        i = k
        while True:
            sent = time.monotonic()
            if sent >= spec.measure_end:
                return
            code, answer = await _call(call, requests[i % len(requests)], spec.timeout_s)
            finished = time.monotonic()
            rec.answered(finished, code)
            i += 1
            if sent >= spec.measure_start:
                rec.sent += 1
                rec.done(finished - sent, finished, code, answer)

    await _sleep_until(spec.start_at)
    await asyncio.gather(*(user(k) for k in range(spec.concurrency)))


def _arrivals(rng: np.random.Generator, rate: float, start: float, end: float) -> np.ndarray:
    """Poisson arrival times in [start, end) at `rate` per second."""
    expected = max(16, int((end - start) * rate * 1.2) + 16)
    gaps = rng.exponential(1.0 / rate, expected)
    times = start + np.cumsum(gaps)
    while times[-1] < end:  # rare: draw more
        more = times[-1] + np.cumsum(rng.exponential(1.0 / rate, expected))
        times = np.concatenate([times, more])
    return times[times < end]


async def _open_loop(spec: StepSpec, calls, requests: list[bytes], rec: _Recorder, result: StepResult) -> None:
    """Arrivals come from a timer thread (time.sleep is precise to tens of microseconds, asyncio's
    epoll timers only to a millisecond) and are handed to the event loop in batches; the loop sends
    them, or keeps them in a backlog while `max_inflight` requests are outstanding."""
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(spec.seed)
    times = _arrivals(rng, spec.rate, spec.start_at, spec.measure_end)
    first_counted = int(np.searchsorted(times, spec.measure_start))
    result.scheduled = len(times) - first_counted
    backlog: deque[int] = deque()
    tasks: set[asyncio.Task] = set()
    inflight = 0
    scheduled_all = asyncio.Event()
    stop = threading.Event()

    async def send(k: int) -> None:
        nonlocal inflight
        scheduled = float(times[k])
        counted = k >= first_counted
        try:
            sent = time.monotonic()
            code, answer = await _call(calls[k % len(calls)], requests[k % len(requests)], spec.timeout_s)
            finished = time.monotonic()
            rec.answered(finished, code)
            if counted:
                rec.lags.append(sent - scheduled)
                rec.done(finished - scheduled, finished, code, answer)
        except asyncio.CancelledError:
            if counted:
                rec.done(0.0, time.monotonic(), "CLIENT_CANCELLED", "cancelled when the step ended")
            raise
        finally:
            inflight -= 1
            pump()

    def pump() -> None:
        nonlocal inflight
        if not backlog or time.monotonic() >= spec.measure_end + ARRIVAL_GRACE_S:
            return
        while backlog and inflight < spec.max_inflight:
            k = backlog.popleft()
            if k >= first_counted:
                rec.sent += 1
            inflight += 1
            task = loop.create_task(send(k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if backlog:
            result.inflight_cap_hits += 1

    def deliver(first: int, last: int) -> None:
        backlog.extend(range(first, last))
        pump()

    def ticker() -> None:
        i, n = 0, len(times)
        while i < n and not stop.is_set():
            now = time.monotonic()
            if times[i] > now:
                time.sleep(min(times[i] - now, 0.05))
                continue
            j = int(np.searchsorted(times, now, side="right"))
            loop.call_soon_threadsafe(deliver, i, j)
            i = j
        loop.call_soon_threadsafe(scheduled_all.set)

    timer = threading.Thread(target=ticker, name="kiln-bench-arrivals", daemon=True)
    timer.start()
    try:
        await scheduled_all.wait()
        await _sleep_until(spec.measure_end + ARRIVAL_GRACE_S)
    finally:
        stop.set()
        timer.join(1.0)
    result.unsent = result.scheduled - rec.sent
    backlog.clear()
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=spec.timeout_s + 5.0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def run_step(spec: StepSpec, calls, requests: list[bytes], worker: int, progress=None) -> StepResult:
    rec = _Recorder(worker, progress, worker, (spec.measure_start, spec.measure_end))
    result = StepResult(worker=worker, latencies_s=np.empty(0))
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.monotonic()
    if spec.mode == "closed":
        if spec.concurrency > 0:
            await _closed_loop(spec, calls, requests, rec)
    elif spec.mode == "open":
        if spec.rate > 0:
            await _open_loop(spec, calls, requests, rec, result)
    else:
        raise ValueError(f"unknown mode '{spec.mode}'")
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    result.wall_s = time.monotonic() - wall0
    result.latencies_s = np.asarray(rec.latencies, dtype=np.float64)
    result.send_lag_s = np.asarray(rec.lags, dtype=np.float64) if spec.mode == "open" else None
    result.sent = rec.sent
    result.ok = rec.ok
    result.errors = rec.errors
    result.error_examples = rec.error_examples
    result.response_bytes = rec.response_bytes
    result.last_completion = rec.last_completion
    result.answered_in_window = rec.answered_in_window
    return result


def open_channels(url: str, count: int, security: ClientSecurity):
    """`count` channels, each on its own TCP connection (a local subchannel pool per channel)."""
    channels = []
    for i in range(count):
        channels.append(
            security.aio_channel(
                url,
                options=[
                    ("grpc.use_local_subchannel_pool", 1),
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.max_send_message_length", MAX_MESSAGE),
                    ("kiln.bench.channel", i),  # distinct args: never shared with a sibling channel
                ],
            )
        )
    return channels


def _callers(channels, security: ClientSecurity, streaming: bool) -> list:
    """One per channel: awaiting `caller(request, timeout=...)` gives the raw answer or raises."""
    if streaming:
        return [StreamPool(ch, security.metadata or None) for ch in channels]
    calls = [ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None) for ch in channels]
    if security.metadata:  # bound once here: without a token the call path stays as it is
        calls = [functools.partial(call, metadata=security.metadata) for call in calls]
    return calls


async def _serve(worker: int, url: str, security: ClientSecurity, requests: list[bytes], connections: int,
                 tasks, results, progress, streaming: bool) -> None:
    channels = open_channels(url, connections, security)
    calls = _callers(channels, security, streaming)
    loop = asyncio.get_running_loop()
    try:
        try:
            await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 30.0)
        except asyncio.TimeoutError:
            results.put(("error", worker, f"cannot connect to {url} within 30 s"))
            return
        loop_name = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
        results.put(("ready", worker, {"grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""), "event_loop": loop_name}))
        while True:
            spec = await loop.run_in_executor(None, tasks.get)
            if spec is None:
                return
            try:
                result = await run_step(spec, calls, requests, worker, progress)
            except Exception as exc:  # report, don't hang the parent
                results.put(("error", worker, f"{type(exc).__name__}: {exc}"))
                return
            results.put(("result", worker, result))
    finally:
        for call in calls:
            if isinstance(call, StreamPool):
                await call.close()
        for ch in channels:
            await ch.close()


def worker_main(worker: int, url: str, security: ClientSecurity, requests: list[bytes], connections: int,
                tasks, results, progress, event_loop: str = "auto", streaming: bool = False) -> None:
    """Entry point of a worker process (multiprocessing 'spawn')."""
    sys.setswitchinterval(0.0005)  # the arrival timer thread gets the GIL back soon after it wakes
    try:
        with asyncio.Runner(loop_factory=eventloop.loop_factory(event_loop)) as runner:
            runner.run(_serve(worker, url, security, requests, connections, tasks, results, progress, streaming))
    except KeyboardInterrupt:
        pass
