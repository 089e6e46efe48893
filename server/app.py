"""Process wiring: the gRPC server, the metrics endpoint, signals and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import start_http_server

from server.auth import TokenAuthInterceptor, read_token_file
from server.dataplane import DataPlane
from server.health import HealthService
from server import stats
from server.metrics import build_registry, latency_buckets
from server.protocol import grpc_service_pb2 as pb
from server.protocol._pool import POOL
from server.repository import ControlMode, ModelRepository
from server.service import GenericOnly, InferenceService, add_inference_service

log = logging.getLogger("kiln.app")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SHUTDOWN_LINGER_S = 0.25  # after the drain: refusals go on at most this long, then open streams get as long
SHUTDOWN_QUIET_S = 0.02  # ... but the port closes after this long without a refusal


@dataclass
class ServerSettings:
    model_repository: Path = Path("model_repo")
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_host: str | None = None  # None: same as host
    metrics_port: int | None = 8002  # None: no metrics endpoint
    control_mode: ControlMode = ControlMode.NONE
    load_models: tuple[str, ...] = ()
    poll_secs: float = 15.0
    strict_readiness: bool = True
    grace_period_s: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    allow_metrics: bool = True  # False: no /metrics endpoint and no histogram recording (ModelStatistics stays)
    latency_buckets: tuple[float, ...] | None = None  # None: KILN_LATENCY_BUCKETS or the defaults
    access_log: bool = False  # one log line per inference request (logger kiln.access)
    max_pending_calls: int = 0  # > 0: grpc-core refuses calls beyond it before they reach Python (see pending_call_limits)
    extra_options: list = field(default_factory=list)
    reuse_port: bool = False  # SO_REUSEPORT on the gRPC port, so that `kiln serve --workers N` processes share it
    private_host: str | None = None  # also listen on an ephemeral port of this host (workers reach each other there)
    tls_cert: Path | None = None  # PEM certificate chain: TLS on the gRPC port (with tls_key)
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM CA bundle: mutual TLS, clients must present a certificate it signed
    auth_token_file: Path | None = None  # bearer tokens (one per line) every inference RPC needs
    admin_token_file: Path | None = None  # bearer tokens allowed to load/unload models
    event_loop: str = "auto"  # server.eventloop.CHOICES: uvloop where installed, else asyncio's own


def pending_call_limits(limit: int) -> list[tuple[str, int]]:
    """grpc-core's backlog of calls not yet taken by the Python server: past the soft limit it refuses a
    growing share of new calls, past the hard limit (twice) all of them, in C, before they cost the event
    loop anything. Under overload this bounds the wait of every accepted call."""
    if limit <= 0:
        return []
    return [("grpc.server.max_pending_requests", limit), ("grpc.server.max_pending_requests_hard_limit", 2 * limit)]


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port from the settings' PEM files; None without --tls-cert."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    try:
        chain = Path(settings.tls_cert).read_bytes()
        key = Path(settings.tls_key).read_bytes()
        client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ValueError(f"cannot read a TLS file: {exc}") from exc
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def auth_interceptors(settings: ServerSettings) -> list:
    """The token interceptor when --auth-token-file or --admin-token-file is set (else none: no cost)."""
    if settings.auth_token_file is None and settings.admin_token_file is None:
        return []
    tokens = read_token_file(settings.auth_token_file) if settings.auth_token_file else ()
    admin = read_token_file(settings.admin_token_file) if settings.admin_token_file else ()
    return [TokenAuthInterceptor(tokens, admin)]


def _reflection_pool():
    """Our private pool plus the health and reflection protocols, so reflection can describe all three."""
    for module in (health_pb2, reflection_pb2):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return POOL


class KilnServer:
    """A running kiln: call start(), then wait_closed(); stop() drains and exits."""

    def __init__(self, settings: ServerSettings, service_factory=InferenceService) -> None:
        self.settings = settings
        self.service_factory = service_factory  # DataPlane -> servicer (server/workers.py passes its own)
        self.repository = ModelRepository(
            settings.model_repository,
            control_mode=settings.control_mode,
            startup_models=settings.load_models,
            poll_interval_s=settings.poll_secs,
            drain_timeout_s=settings.grace_period_s,
        )
        self.dataplane = DataPlane(self.repository, strict_readiness=settings.strict_readiness)
        stats.configure(
            metrics=settings.allow_metrics,
            latency_buckets=settings.latency_buckets or latency_buckets(),
            access_log=settings.access_log,
        )
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.private_grpc_port: int | None = None  # with settings.private_host
        self.metrics_registry = None  # the /metrics CollectorRegistry, once started
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task | None = None

    async def start(self, load_models: bool = True) -> None:
        settings = self.settings
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            *pending_call_limits(settings.max_pending_calls),
            *settings.extra_options,
        ]
        server = grpc.aio.server(options=options, interceptors=auth_interceptors(settings))
        add_inference_service(self.service_factory(self.dataplane), server)
        self.health = HealthService(self.dataplane)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, GenericOnly(server))
        service_names = (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, GenericOnly(server), pool=_reflection_pool())
        address = f"{settings.host}:{settings.grpc_port}"
        credentials = server_credentials(settings)
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.grpc_port = port
        if settings.private_host:
            self.private_grpc_port = server.add_insecure_port(f"{settings.private_host}:0")
            if self.private_grpc_port == 0:
                raise OSError(f"cannot listen on {settings.private_host}:0")
        if settings.metrics_port is not None and settings.allow_metrics:
            self.metrics_registry = build_registry(self.repository, self.dataplane.unrouted)
            self._metrics_http, _ = start_http_server(
                settings.metrics_port, addr=settings.metrics_host or settings.host, registry=self.metrics_registry
            )
            self.metrics_port = self._metrics_http.server_port
        await server.start()
        self._server = server
        log.info(
            "kiln serving %s on %s:%s%s (metrics on port %s), control mode %s%s",
            settings.model_repository, settings.host, port,
            "" if credentials is None else " with TLS" + (" (client certificates required)" if settings.tls_client_ca else ""),
            self.metrics_port, settings.control_mode.value,
            ", bearer tokens required" if settings.auth_token_file else "",
        )
        if load_models:
            await self.repository.start()
            self.health.notify()
            log.info("server ready: %s", self.dataplane.ready())

    def stop_soon(self) -> None:
        """Begin a graceful stop (signal handlers call this); idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        """Refuse new work at once, let accepted requests finish within the grace period, then close."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period_s
        log.info("shutting down: draining for up to %.0f s", grace)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # 1. refuse new work (UNAVAILABLE, health NOT_SERVING) while the port still answers, so clients
        #    and probes get a clear answer instead of a cancelled call ...
        self.dataplane.shutting_down = True
        self.health.notify()
        # 2. ... let every accepted request finish within the grace period ...
        if not await self.dataplane.wait_idle(grace):
            log.warning("grace period of %.0f s over: cancelling the requests still running", grace)
        # 3. ... keep refusing a moment longer: calls that reached the port while the loop was busy are
        #    answered UNAVAILABLE (closing the port now would cancel them unanswered) ...
        if self._server is not None:
            linger_end = min(loop.time() + SHUTDOWN_LINGER_S, started + grace)
            refused = -1
            while refused != self.dataplane.refused and loop.time() < linger_end:
                refused = self.dataplane.refused  # until a quiet moment with no refusal
                await asyncio.sleep(SHUTDOWN_QUIET_S)
        # 4. ... then close the port: what is left (health watches, idle streams) gets a moment.
        if self._server is not None:
            await self._server.stop(min(max(grace - (loop.time() - started), 0.0), SHUTDOWN_LINGER_S))
        await self.repository.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def serve(settings: ServerSettings) -> None:
    """Run until SIGINT/SIGTERM, then drain and return."""
    server = KilnServer(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.stop_soon)
    await server.start()
    await server.wait_closed()
