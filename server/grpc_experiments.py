"""grpc-core experiments kiln turns off, through GRPC_EXPERIMENTS, before grpc is first imported.

grpc-core reads GRPC_EXPERIMENTS once, when the grpc module is loaded: a later change has no
effect, so server/__init__.py applies this before any kiln module imports grpc. grpc-core now runs
connections on its EventEngine endpoints; its older posix (iomgr) endpoints cost less CPU per call
on this Python server (mlp on 2 cores: p50 of a lone call ~0.1 ms lower, 1.0-1.1x the calls/s at
c=16) and on kiln bench's client (docs/BENCHMARKS.md, "grpc's iomgr server endpoints" and "kiln
bench on grpc's iomgr client path"). An experiment the operator's GRPC_EXPERIMENTS already names,
on or off, stays as they set it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, MutableMapping

SERVER_EXPERIMENTS = ("-event_engine_listener", "-event_engine_for_all_other_endpoints")
CLIENT_EXPERIMENTS = ("-event_engine_client",)


def merged(current: str, wanted: Iterable[str]) -> str:
    """`current` (a GRPC_EXPERIMENTS value) plus each of `wanted` whose experiment it does not name."""
    names = [n.strip() for n in current.split(",") if n.strip()]
    named = {n.lstrip("-") for n in names}
    return ",".join(names + [w for w in wanted if w.lstrip("-") not in named])


_operators_value: str | None = os.environ.get("GRPC_EXPERIMENTS")  # before apply() changes it


def apply(wanted: Iterable[str] = SERVER_EXPERIMENTS, environ: MutableMapping[str, str] = os.environ) -> None:
    environ["GRPC_EXPERIMENTS"] = merged(environ.get("GRPC_EXPERIMENTS", ""), wanted)


@contextmanager
def added(wanted: Iterable[str]) -> Iterator[None]:
    """GRPC_EXPERIMENTS with `wanted` merged in, for child processes started inside the block
    (multiprocessing's spawn passes no environment of its own); the old value comes back after."""
    saved = os.environ.get("GRPC_EXPERIMENTS")
    apply(wanted)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["GRPC_EXPERIMENTS"]
        else:
            os.environ["GRPC_EXPERIMENTS"] = saved


def operators_environment() -> dict[str, str]:
    """This process's environment with GRPC_EXPERIMENTS as the operator set it: for programs that are
    not kiln (peer servers, perf_analyzer), which must run with their own defaults."""
    env = dict(os.environ)
    env.pop("GRPC_EXPERIMENTS", None)
    if _operators_value is not None:
        env["GRPC_EXPERIMENTS"] = _operators_value
    return env
