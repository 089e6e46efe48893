"""The gRPC servicer of the v2 / Triton inference protocol: convert messages, call the data plane.

Errors are KilnError everywhere below this layer; `grpc_errors` maps them to
gRPC status codes once, for every RPC.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from typing import AsyncIterator

import grpc

from server import __version__, codec
from server.dataplane import DataPlane
from server.errors import KilnError, Status, internal
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError
from server.repository import ControlMode, ModelVersion

log = logging.getLogger("kiln.service")

GRPC_CODES = {status: getattr(grpc.StatusCode, status.name) for status in Status}

SERVER_EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy")


def grpc_errors(method):
    """Map KilnError to its gRPC status; anything unexpected becomes INTERNAL and is logged."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except KilnError as exc:
            await context.abort(GRPC_CODES[exc.status], exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    return wrapper


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.repository = dataplane.repository

    # ---- health and metadata ----------------------------------------------------------------

    @grpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @grpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @grpc_errors
    async def ModelReady(self, request, context):
        try:
            self.dataplane.model(request.name, request.version)
        except KilnError as exc:
            if exc.status is Status.UNAVAILABLE:
                return pb.ModelReadyResponse(ready=False)
            raise
        return pb.ModelReadyResponse(ready=True)

    @grpc_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="kiln", version=__version__, extensions=SERVER_EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(self, request, context):
        model = self.dataplane.model(request.name, request.version)
        config = model.config
        entry = self.repository.models[model.name]
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(entry.versions)],
            platform=config.platform,
        )
        for tensors, target in ((config.inputs, response.inputs), (config.outputs, response.outputs)):
            for tensor in tensors:
                target.add(name=tensor.name, datatype=tensor.datatype, shape=codec.expected_shape(config, tensor))
        return response

    @grpc_errors
    async def ModelConfig(self, request, context):
        model = self.dataplane.model(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config_proto)

    @grpc_errors
    async def ModelStatistics(self, request, context):
        response = pb.ModelStatisticsResponse()
        if request.name:
            models = [self.repository.models.get(request.name)]
            if models[0] is None or not models[0].versions:
                self.dataplane.model(request.name, request.version)  # raises the right error
        else:
            models = list(self.repository.models.values())
        for entry in models:
            versions = sorted(entry.versions.values(), key=lambda v: v.version)
            if request.version:
                versions = [self.dataplane.model(entry.name, request.version)]
            for version in versions:
                version.stats.fill(response.model_stats.add())
        return response

    # ---- inference --------------------------------------------------------------------------

    async def _infer(self, request, deadline: float | None) -> pb.ModelInferResponse:
        started = time.perf_counter_ns()
        try:
            model: ModelVersion = self.dataplane.model(request.model_name, request.model_version)
        except KilnError as exc:
            self.dataplane.unrouted.record(request.model_name, exc.status, time.perf_counter_ns() - started)
            raise
        try:
            inputs = codec.decode_inputs(request, model.config, model.bytes_as_text)
            output_names = codec.requested_outputs(request, model.config)
            parameters = codec.parse_parameters(request.parameters)
        except KilnError as exc:
            model.stats.record_failure(exc.status, time.perf_counter_ns() - started)
            raise
        outputs = await self.dataplane.infer(model, inputs, output_names, parameters, deadline, started)
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version_str, id=request.id)
        codec.encode_outputs(response, outputs, model.config)
        return response

    @grpc_errors
    async def ModelInfer(self, request, context):
        return await self._infer(request, _deadline(context))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of a stream run concurrently (so they can batch); each answer, or error, is sent as it is ready."""
        deadline = _deadline(context)
        answers: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()

        async def answer(request) -> None:
            try:
                response = await self._infer(request, deadline)
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except KilnError as exc:
                answers.put_nowait(_stream_error(request, exc))
            except Exception as exc:  # never let one request end the stream
                log.exception("unexpected error in a streamed request")
                answers.put_nowait(_stream_error(request, internal(f"internal error: {exc}")))

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*list(pending))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    # ---- repository -------------------------------------------------------------------------

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for row in self.repository.index(ready_only=request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return response

    def _require_explicit(self, action: str) -> None:
        if self.repository.control_mode is not ControlMode.EXPLICIT:
            raise KilnError(
                Status.FAILED_PRECONDITION,
                f"cannot {action} models in '{self.repository.control_mode.value}' control mode; "
                "start the server with --model-control-mode explicit",
            )

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        self._require_explicit("load")
        if request.parameters:
            raise KilnError(
                Status.INVALID_ARGUMENT,
                f"load parameters {sorted(request.parameters)} are not supported; put the config in the repository",
            )
        await self.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        self._require_explicit("unload")
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _stream_error(request, exc: KilnError) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=f"[{exc.status.name}] {exc.message}",
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


# ---- registration -------------------------------------------------------------------------------


class _Malformed:
    """What the deserializer hands over for bytes that are not the RPC's request message."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe_deserializer(message_class):
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, ValueError) as exc:
            return _Malformed(f"request is not a valid {name} message: {exc}")

    return deserialize


def _guard_unary(behavior):
    @functools.wraps(behavior)
    async def guarded(request, context):
        if type(request) is _Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return guarded


class _MalformedInStream(Exception):
    """A stream message that does not parse. The request reader raises it and the handler turns it
    into the call's INVALID_ARGUMENT: aborting from the reader task could race an answer being
    written (grpc-core refuses the second operation and the call would hang until its deadline)."""


def _guard_stream(behavior):
    @functools.wraps(behavior)
    async def guarded(request_iterator, context):
        async def checked():
            async for request in request_iterator:
                if type(request) is _Malformed:
                    raise _MalformedInStream(request.message)
                yield request

        try:
            async for response in behavior(checked(), context):
                yield response
        except _MalformedInStream as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return guarded


# The RPCs grpc-core matches itself (see add_inference_service): the per-request one.
REGISTERED_METHODS = ("ModelInfer",)


class GenericOnly:
    """A server as a generated add_..._to_server sees it, minus method registration: for services
    that are not per request (health, reflection), so they add no future to grpc.aio's wait."""

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers) -> None:
        pass


def add_inference_service(servicer: InferenceService, server) -> None:
    """Register the servicer as the generated add_..._to_server does, except that a message that
    does not parse is INVALID_ARGUMENT naming its type (grpc's own deserializer failure says UNKNOWN)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        deserializer = _safe_deserializer(request_class)
        if method.client_streaming:
            if inspect.isasyncgenfunction(behavior):
                behavior = _guard_stream(behavior)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behavior, request_deserializer=deserializer, response_serializer=response_class.SerializeToString)
        else:
            if inspect.iscoroutinefunction(behavior):
                behavior = _guard_unary(behavior)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behavior, request_deserializer=deserializer, response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # grpc.aio waits on one pending-call future per registered method, and does so once per
    # accepted call: with all 20 methods registered that wait costs ~28 µs a call, ~10 µs with
    # two. So only the hot RPC is registered; the rest are found by name through the generic handler.
    server.add_registered_method_handlers(service.full_name, {name: handlers[name] for name in REGISTERED_METHODS})
