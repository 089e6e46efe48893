"""A locust user that speaks the KServe v2 / Triton gRPC protocol to kiln (or any v2 server).

    locust -f loadtests/locustfile.py --headless -u 32 -r 32 -t 30s --host 127.0.0.1:8001

Each user opens its own channel, reads the model's ModelMetadata once to build valid
random inputs (or loads them from .npy files) and sends ModelInfer over the project's
generated stubs as fast as its wait time allows. Every call is reported to locust's
request event: request_type "grpc", name = the model, response time in ms, the
response's serialized size, and on failure an exception named after the gRPC status
code (UNAVAILABLE, INVALID_ARGUMENT, ...), so locust groups failures by status.

Options (flag, or environment variable):
  --model NAME            KILN_MODEL           model to call (default: mlp)
  --model-version V       KILN_MODEL_VERSION   version (default: latest ready)
  --batch-size N          KILN_BATCH_SIZE      rows per request for random inputs (default: 1)
  --input-shape NAME=D,.. KILN_INPUT_SHAPE     non-batch dims for inputs with dynamic dims (comma list of NAME=D,D;...)
  --data NAME=FILE.npy    KILN_DATA            request input from a .npy file (';'-separated for several)
  --grpc-timeout SECONDS  KILN_GRPC_TIMEOUT    per-call deadline (default: 30)
  --think-time SECONDS    KILN_THINK_TIME      pause between a user's calls (default: 0)
  --grpc-tls              KILN_TLS             connect with TLS (also implied by --host https://...)
  --grpc-tls-ca PEM       KILN_TLS_CA          CA certificate to trust (default with TLS: the system's)
  --grpc-tls-cert PEM     KILN_TLS_CERT        client certificate, for mutual TLS (with --grpc-tls-key)
  --grpc-tls-key PEM      KILN_TLS_KEY         the client certificate's private key
  --grpc-token-file FILE  KILN_TOKEN_FILE      bearer token sent with every call
(locust's own --tls-cert/--tls-key are for its web UI.)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel: grpc's C core must cooperate with gevent's greenlets

import grpc  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

try:  # installed (pip install kiln-serve[dev]) or run from the repository root
    from loadtests.inputs import fetch_metadata, make_requests, parse_assignments, parse_dims
except ImportError:  # locust -f path/to/locustfile.py from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loadtests.inputs import fetch_metadata, make_requests, parse_assignments, parse_dims
from server.channels import ClientSecurity  # noqa: E402
from server.protocol import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

MAX_MESSAGE = 256 * 1024 * 1024
log = logging.getLogger("kiln.locust")


class GrpcStatusError(Exception):
    """A failed call; str() starts with the gRPC status code name, which locust uses to group failures."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self.code = code
        super().__init__(f"{code.name}: {details or ''}".rstrip(": "))


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("kiln gRPC user")
    group.add_argument("--model", env_var="KILN_MODEL", default="mlp", help="model to call (default: mlp)")
    group.add_argument("--model-version", env_var="KILN_MODEL_VERSION", default="", help="model version (default: latest)")
    group.add_argument("--batch-size", env_var="KILN_BATCH_SIZE", type=int, default=1, help="rows per request (default: 1)")
    group.add_argument(
        "--input-shape", env_var="KILN_INPUT_SHAPE", default="",
        help="dims of inputs with dynamic non-batch dims: 'NAME=D,D;NAME2=D' (default: 1 per dynamic dim)",
    )
    group.add_argument("--data", env_var="KILN_DATA", default="", help="inputs from .npy files: 'NAME=FILE.npy;NAME2=FILE2.npy'")
    group.add_argument("--grpc-timeout", env_var="KILN_GRPC_TIMEOUT", type=float, default=30.0, help="per-call deadline in seconds (default: 30)")
    group.add_argument("--think-time", env_var="KILN_THINK_TIME", type=float, default=0.0, help="pause between calls in seconds (default: 0)")
    group.add_argument("--grpc-tls", env_var="KILN_TLS", action="store_true", help="connect with TLS (also implied by --host https://...)")
    group.add_argument("--grpc-tls-ca", env_var="KILN_TLS_CA", default=None, help="CA certificate to trust (default with TLS: the system's)")
    group.add_argument("--grpc-tls-cert", env_var="KILN_TLS_CERT", default=None, help="client certificate for mutual TLS (with --grpc-tls-key)")
    group.add_argument("--grpc-tls-key", env_var="KILN_TLS_KEY", default=None, help="the client certificate's private key")
    group.add_argument("--grpc-token-file", env_var="KILN_TOKEN_FILE", default=None, help="bearer token sent with every call")


def _target(host: str | None) -> str:
    if not host:
        raise ValueError("no server address: pass --host HOST:PORT (e.g. --host 127.0.0.1:8001)")
    for scheme in ("grpc://", "http://", "https://"):
        if host.startswith(scheme):
            host = host[len(scheme):]
    return host.rstrip("/")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(";") if part.strip()]


_REQUESTS: dict[tuple, list] = {}  # built once per process and reused by every user
_SECURITY: dict[tuple, ClientSecurity] = {}


def _security_for(options, host: str | None) -> ClientSecurity:
    """TLS and token files, read once per process; ValueError/OSError when unusable."""
    tls = bool(options.grpc_tls) or (host or "").startswith("https://")
    key = (tls, options.grpc_tls_ca, options.grpc_tls_cert, options.grpc_tls_key, options.grpc_token_file)
    if key not in _SECURITY:
        paths = [Path(p) if p else None for p in key[1:]]
        _SECURITY[key] = ClientSecurity.from_files(tls, *paths)
    return _SECURITY[key]


def _requests_for(stub, options, metadata):
    key = (options.model, options.model_version, options.batch_size, options.input_shape, options.data)
    if key not in _REQUESTS:
        model = fetch_metadata(stub, options.model, options.model_version, metadata=metadata)
        shapes = {name: parse_dims(dims) for name, dims in parse_assignments(_split(options.input_shape), "--input-shape").items()}
        files = parse_assignments(_split(options.data), "--data")
        _REQUESTS[key] = make_requests(
            model, options.batch_size, version=options.model_version, files=files, shapes=shapes
        )
    return _REQUESTS[key]


class KilnGrpcUser(User):
    """One user = one channel, calling ModelInfer in a loop."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.model = options.model
        self.timeout = options.grpc_timeout
        self.think_time = options.think_time
        self.channel = None
        self.requests = None
        self.next = 0
        # a failure here is reported as a failed call and the user stops at its first task (a
        # StopUser raised here would make locust log a bare traceback per user)
        try:
            security = _security_for(options, self.host)
        except (OSError, ValueError) as exc:
            self._stop_with(exc)
            return
        self.metadata = security.metadata
        self.channel = security.channel(
            _target(self.host),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        try:
            self.requests = _requests_for(self.stub, options, self.metadata)
        except grpc.RpcError as exc:
            self._stop_with(GrpcStatusError(exc.code(), f"ModelMetadata: {exc.details()}"))

    def _stop_with(self, error: Exception) -> None:
        self._report(0.0, 0, error)
        log.error("user stops: %s", error)

    def on_stop(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()

    def _report(self, elapsed_ms: float, length: int, exception: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=self.model,
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )

    @task
    def infer(self) -> None:
        if self.requests is None:
            raise StopUser()
        request = self.requests[self.next % len(self.requests)]
        self.next += 1
        started = time.perf_counter()
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            self._report((time.perf_counter() - started) * 1000.0, 0, GrpcStatusError(exc.code(), exc.details()))
        else:
            self._report((time.perf_counter() - started) * 1000.0, response.ByteSize(), None)
        if self.think_time > 0:
            time.sleep(self.think_time)  # gevent-patched by locust
