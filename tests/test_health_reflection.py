"""grpc.health.v1 (what Kubernetes gRPC probes call) and server reflection (what grpcurl uses), over real channels."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import InferenceServerClient

from onnx_models import scale_model, write_config
from server.health import LIVENESS_SERVICE

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def make_model(repo, name: str) -> None:
    write_config(
        repo / name,
        f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }} ]
""",
    )
    scale_model(repo / name / "1" / "model.onnx", 1.0, [4])


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    make_model(repo, "a")
    make_model(repo, "b")
    return repo


@pytest.fixture
def channel_factory():
    channels: list[grpc.Channel] = []

    def open_channel(url: str) -> grpc.Channel:
        channel = grpc.insecure_channel(url)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()


def check(stub, service: str):
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


# ---- health ----------------------------------------------------------------------------------


def test_health_server_and_models(repo, start_server, channel_factory):
    server = start_server(repo, control_mode="explicit", load_models=("a", "b"))
    stub = health_pb2_grpc.HealthStub(channel_factory(server.url))
    assert check(stub, "") == SERVING
    assert check(stub, "a") == SERVING
    assert check(stub, "b") == SERVING
    client = InferenceServerClient(server.url)
    client.unload_model("b")
    assert check(stub, "b") == NOT_SERVING
    assert check(stub, "a") == SERVING
    client.load_model("b")
    assert check(stub, "b") == SERVING


def test_health_unknown_service_is_not_found(repo, start_server, channel_factory):
    server = start_server(repo)
    stub = health_pb2_grpc.HealthStub(channel_factory(server.url))
    for service in ("nosuch", "../a", "inference.GRPCInferenceService/x"):
        with pytest.raises(grpc.RpcError) as exc:
            check(stub, service)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND, service


def test_health_server_not_serving_until_startup_models_are_ready(tmp_path, start_server, channel_factory):
    repo = tmp_path / "repo"
    make_model(repo, "good")
    write_config(repo / "broken", '{name: "broken"')  # unparsable config
    (repo / "broken" / "1").mkdir()
    server = start_server(repo)
    stub = health_pb2_grpc.HealthStub(channel_factory(server.url))
    assert check(stub, "") == NOT_SERVING
    assert check(stub, "good") == SERVING
    assert check(stub, "broken") == NOT_SERVING


def test_health_watch_follows_model_state(repo, start_server, channel_factory):
    server = start_server(repo, control_mode="explicit", load_models=("a", "b"))
    stub = health_pb2_grpc.HealthStub(channel_factory(server.url))
    stream = stub.Watch(health_pb2.HealthCheckRequest(service="b"), timeout=10)
    try:
        assert next(stream).status == SERVING
        server.call(server.repository.unload("b"))
        assert next(stream).status == NOT_SERVING
        server.call(server.repository.load("b"))
        assert next(stream).status == SERVING
    finally:
        stream.cancel()


def test_health_at_shutdown(repo, start_server, channel_factory):
    server = start_server(repo)
    stub = health_pb2_grpc.HealthStub(channel_factory(server.url))
    assert check(stub, "") == SERVING

    # a watcher sees NOT_SERVING as soon as the shutdown begins ...
    stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
    assert next(stream).status == SERVING
    seen: list = []

    def watch():
        try:
            for response in stream:
                seen.append(response.status)
                if response.status == NOT_SERVING:
                    stream.cancel()
                    return
        except grpc.RpcError as exc:
            seen.append(exc.code())

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
    watcher.join(10)
    assert seen and seen[0] == NOT_SERVING, seen
    stopping.result(15)
    # the open watch stream, ended by the client, did not hold the shutdown for the grace period
    assert time.monotonic() - started < server.settings.grace_period_s

    # ... and once stopped, the server no longer answers at all
    with pytest.raises(grpc.RpcError) as exc:
        check(stub, "")
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_not_serving_while_draining(repo, start_server, channel_factory):
    """Between the start of a shutdown and the end of the drain, Check answers NOT_SERVING for
    readiness, and SERVING for liveness (the process is busy finishing its work: don't restart it)."""
    server = start_server(repo)
    stub = health_pb2_grpc.HealthStub(channel_factory(server.url))
    server.server.dataplane.shutting_down = True  # the first thing stop() does
    try:
        assert check(stub, "") == NOT_SERVING
        assert check(stub, "a") == NOT_SERVING
        assert check(stub, LIVENESS_SERVICE) == SERVING
    finally:
        server.server.dataplane.shutting_down = False
    assert check(stub, "") == SERVING


def test_liveness_is_serving_while_readiness_is_not(tmp_path, start_server, channel_factory):
    """A server whose start-up model failed is not ready but alive: a liveness probe must not restart it."""
    repo = tmp_path / "repo"
    write_config(repo / "broken", '{name: "broken"')  # unparsable config
    (repo / "broken" / "1").mkdir()
    server = start_server(repo)
    stub = health_pb2_grpc.HealthStub(channel_factory(server.url))
    assert check(stub, "") == NOT_SERVING
    assert check(stub, LIVENESS_SERVICE) == SERVING


# ---- reflection ------------------------------------------------------------------------------


def reflect(channel, **request):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5))
    assert len(responses) == 1
    return responses[0]


def test_reflection_lists_services(repo, start_server, channel_factory):
    server = start_server(repo)
    response = reflect(channel_factory(server.url), list_services="")
    names = {service.name for service in response.list_services_response.service}
    assert "inference.GRPCInferenceService" in names
    assert "grpc.health.v1.Health" in names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


def test_reflection_describes_the_inference_service(repo, start_server, channel_factory):
    """What grpcurl does: fetch the file holding a symbol (with its dependencies) and build the types."""
    server = start_server(repo)
    channel = channel_factory(server.url)
    response = reflect(channel, file_containing_symbol="inference.GRPCInferenceService")
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    assert files
    services = {f"{f.package}.{s.name}": s for f in files for s in f.service}
    methods = {m.name for m in services["inference.GRPCInferenceService"].method}
    assert {"ServerLive", "ServerReady", "ModelReady", "ModelInfer", "ModelStreamInfer",
            "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"} <= methods

    # every dependency is either in the answer or fetchable by name: a client can build the full pool
    pool = descriptor_pool.DescriptorPool()
    pending = {f.name: f for f in files}
    added: set[str] = set()

    def add(file_proto):
        for dependency in file_proto.dependency:
            if dependency in added:
                continue
            if dependency not in pending:
                answer = reflect(channel, file_by_filename=dependency)
                for raw in answer.file_descriptor_response.file_descriptor_proto:
                    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                    pending.setdefault(proto.name, proto)
            add(pending[dependency])
        if file_proto.name not in added:
            pool.Add(file_proto)
            added.add(file_proto.name)

    for file_proto in list(pending.values()):
        add(file_proto)
    method = pool.FindServiceByName("inference.GRPCInferenceService").FindMethodByName("ModelInfer")
    assert method.input_type.full_name == "inference.ModelInferRequest"
    assert pool.FindMessageTypeByName("inference.ModelConfig").fields_by_name["max_batch_size"]


def test_reflection_describes_health(repo, start_server, channel_factory):
    server = start_server(repo)
    response = reflect(channel_factory(server.url), file_containing_symbol="grpc.health.v1.Health")
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    assert any(f.package == "grpc.health.v1" and any(s.name == "Health" for s in f.service) for f in files)


def test_reflection_unknown_symbol_is_not_found(repo, start_server, channel_factory):
    server = start_server(repo)
    response = reflect(channel_factory(server.url), file_containing_symbol="inference.NoSuchService")
    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
