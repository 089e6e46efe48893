"""grpc.health.v1 for Kubernetes probes.

Service "" is ServerReady (readiness probes); service "<model>" is that model's
latest ready version; service "kiln/live" is ServerLive (liveness probes): SERVING
while the process runs, also while models load and while it drains, when a restart
would not help. Status is computed from the repository on every call, so it can
never drift from what ModelReady says; Watch wakes when the repository changes.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.dataplane import DataPlane

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
LIVENESS_SERVICE = "kiln/live"  # no model can have this name: model names have no "/"


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self._changed = asyncio.Event()
        dataplane.repository.listeners.append(lambda _name: self.notify())

    def notify(self) -> None:
        """Wake watchers; they re-read the status and send it if it changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    def status(self, service: str):
        if service == "":
            return SERVING if self.dataplane.ready() else NOT_SERVING
        if service == LIVENESS_SERVICE:
            return SERVING if self.dataplane.live() else NOT_SERVING  # the answer ServerLive gives
        entry = self.dataplane.repository.models.get(service)
        if entry is None:
            return None
        ready = not self.dataplane.shutting_down and entry.latest_ready() is not None
        return SERVING if ready else NOT_SERVING

    async def Check(self, request, context):
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        last = object()
        while True:
            changed = self._changed
            status = self.status(request.service)
            status = SERVICE_UNKNOWN if status is None else status
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await changed.wait()
