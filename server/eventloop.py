"""Which asyncio event loop the server runs on.

uvloop (libuv, in C) takes less CPU per call than asyncio's own loop: on 2 cores kiln served
2-10% more ModelInfer calls per second with it under concurrency, for ~0.03 ms more p50 at one
call in flight (docs/BENCHMARKS.md, "Event loop"). It is a dependency wherever it is built
(not Windows); "auto" falls back to asyncio's loop without it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine

log = logging.getLogger("kiln.eventloop")

CHOICES = ("auto", "uvloop", "asyncio")


def resolve(choice: str) -> str:
    """The loop `choice` names here: "uvloop" or "asyncio"; ValueError for uvloop when it is missing."""
    if choice not in CHOICES:
        raise ValueError(f"unknown event loop {choice!r}; choose one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise ValueError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    return _factory_of(resolve(choice))


def run(main: Coroutine[Any, Any, Any], choice: str = "auto") -> Any:
    """asyncio.run(main) on the chosen loop."""
    name = resolve(choice)
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=_factory_of(name)) as runner:
        return runner.run(main)


def _factory_of(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop
