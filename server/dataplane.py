"""The transport-free inference path: route, schedule, record.

service.py (gRPC) converts messages and calls this; an HTTP front end would too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Mapping

import numpy as np

from server.codec import InferParameters
from server.errors import KilnError, Status, unavailable
from server.repository import ModelRepository, ModelVersion
from server.stats import UnroutedRequests


class DataPlane:
    def __init__(self, repository: ModelRepository, strict_readiness: bool = True) -> None:
        self.repository = repository
        self.strict_readiness = strict_readiness
        self.shutting_down = False
        self.unrouted = UnroutedRequests(repository.models)  # requests that reach no model version
        self.refused = 0  # calls refused because the server is shutting down
        self._inflight = 0  # requests inside infer(): accepted, not yet answered
        self._idle: asyncio.Event | None = None

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (at most timeout_s) until no accepted request is left; True when none is."""
        if self._inflight:
            if self._idle is None:
                self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), max(timeout_s, 0.0))
            except (TimeoutError, asyncio.TimeoutError):
                return False
        return True

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if self.shutting_down:
            return False
        return self.repository.is_startup_ready() if self.strict_readiness else True

    def model(self, name: str, version: str = "") -> ModelVersion:
        if self.shutting_down:
            self.refused += 1
            raise unavailable("server is shutting down")
        return self.repository.get(name, version)

    async def infer(
        self,
        model: ModelVersion,
        inputs: Mapping[str, np.ndarray],
        output_names: list[str],
        parameters: InferParameters,
        deadline: float | None,
        started_ns: int,
    ) -> dict[str, np.ndarray]:
        """Schedule one request on `model`, record its statistics, return the selected outputs."""
        self._inflight += 1  # shutdown waits until accepted requests are answered
        try:
            try:
                outputs, timings = await model.scheduler.submit(
                    dict(inputs), priority=parameters.priority, timeout_us=parameters.timeout_us, deadline=deadline
                )
            except KilnError as exc:
                model.stats.record_failure(exc.status, time.perf_counter_ns() - started_ns)
                raise
            except asyncio.CancelledError:
                model.stats.record_failure(Status.CANCELLED, time.perf_counter_ns() - started_ns)
                raise
            model.stats.record_success(timings, time.perf_counter_ns() - started_ns)
            if len(output_names) == len(outputs):
                return outputs
            return {name: outputs[name] for name in output_names}
        finally:
            self._inflight -= 1
            if not self._inflight and self._idle is not None:
                self._idle.set()

