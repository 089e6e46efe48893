"""Three real `kiln serve` replicas behind a real L7 gRPC balancer (Debian's nginx, grpc_pass over
HTTP/2) and behind grpc's client-side round_robin policy: calls are spread over every replica,
and SIGTERM to one replica under load loses no request of a client that retries UNAVAILABLE."""

from __future__ import annotations

import json
import re
import shutil
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import REPO_ROOT, require_tool
from loadtests.ports import free_port
from loadtests.replicas import (NGINX_CONF, Nginx, SteadyLoad, mlp_request, nginx_test, render_nginx_config,
                                round_robin_target, start_replicas, stop_replicas)
from server.client import connect, response_arrays, service_config

MODEL = "mlp"
CALLS = 30


@pytest.fixture(scope="module")
def nginx_tool():
    return require_tool("nginx")


@pytest.fixture(scope="module")
def cluster(nginx_tool, tmp_path_factory):
    """Three replicas of the bundled mlp and nginx in front of them."""
    workdir = tmp_path_factory.mktemp("cluster")
    replicas = start_replicas(3, REPO_ROOT / "model_repo", MODEL, workdir)
    nginx = None
    try:
        nginx = Nginx(free_port(), [r.port for r in replicas], workdir)
        yield replicas, nginx
    finally:
        if nginx is not None:
            nginx.stop()
        stop_replicas(replicas)


def test_the_shipped_nginx_config_is_valid(nginx_tool, tmp_path):
    result = nginx_test(NGINX_CONF, tmp_path)
    assert result.returncode == 0, result.stderr
    text = NGINX_CONF.read_text()
    assert re.search(r"listen 127\.0\.0\.1:8001 http2;", text)  # HTTP/2 to the clients ...
    assert "grpc_pass grpc://kiln;" in text  # ... and to the replicas


def test_rendered_config_names_exactly_the_given_replicas(nginx_tool, tmp_path):
    text = render_nginx_config(18001, [18101, 18102])
    assert re.findall(r"server 127\.0\.0\.1:(\d+)", text) == ["18101", "18102"]
    assert "listen 127.0.0.1:18001 http2;" in text and "listen 127.0.0.1:8001" not in text
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    result = nginx_test(conf, tmp_path)
    assert result.returncode == 0, result.stderr


def counts(replicas) -> list[int]:
    return [r.success_count(MODEL) for r in replicas]


def send_calls(connection, n: int) -> None:
    for i in range(n):
        request, x = mlp_request(MODEL, 1 + i % 3, seed=i)
        outputs = response_arrays(connection.call("ModelInfer", request, 30))
        (y,) = outputs.values()
        assert y.shape[0] == x.shape[0] and np.isfinite(y).all()


def calls_per_replica(replicas, connection) -> list[int]:
    """Send CALLS calls over `connection` (then close it): how many each replica served."""
    before = counts(replicas)
    try:
        grpc.channel_ready_future(connection.channel).result(timeout=30)
        send_calls(connection, CALLS)
    finally:
        connection.close()
    moved = [a - b for a, b in zip(counts(replicas), before)]
    assert sum(moved) == CALLS
    return moved


def test_nginx_spreads_the_calls_of_one_connection_over_every_replica(cluster):
    replicas, nginx = cluster
    moved = calls_per_replica(replicas, connect(nginx.url))  # one channel: one HTTP/2 connection to nginx
    assert all(m > 0 for m in moved), f"requests per replica: {moved}"


def test_client_side_round_robin_spreads_calls_over_every_replica(cluster):
    replicas, _ = cluster
    moved = calls_per_replica(replicas, connect(round_robin_target(replicas), round_robin=True))
    assert all(m > 0 for m in moved), f"requests per replica: {moved}"


def test_round_robin_skips_a_replica_that_is_not_ready(cluster, tmp_path):
    """Client health checking: a replica whose health "" is NOT_SERVING (a start-up model failed)
    gets no calls, although it would answer them."""
    replicas, _ = cluster
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "model_repo" / MODEL, repo / MODEL)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('{name: "broken"')  # unparsable: never ready
    (unready,) = start_replicas(1, repo, MODEL, tmp_path, extra_args=("--load-model", "broken"))
    try:
        with grpc.insecure_channel(unready.url) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        everyone = replicas + [unready]
        moved = calls_per_replica(everyone, connect(round_robin_target(everyone), round_robin=True))
        assert moved[-1] == 0 and all(m > 0 for m in moved[:-1]), f"requests per replica: {moved}"
    finally:
        stop_replicas([unready])


def test_tritonclient_balances_with_kilns_service_config(cluster):
    """Existing Triton clients get the same balancing and retries through their channel_args."""
    import tritonclient.grpc as triton

    replicas, _ = cluster
    before = counts(replicas)
    client = triton.InferenceServerClient(
        round_robin_target(replicas),
        channel_args=[("grpc.service_config", service_config(retries=4, round_robin=True)), ("grpc.enable_retries", 1)],
    )
    try:
        x = np.ones((2, 256), np.float32)
        for _ in range(CALLS):
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            assert client.infer(MODEL, [tensor]).as_numpy("y").shape == (2, 10)
    finally:
        client.close()
    moved = [a - b for a, b in zip(counts(replicas), before)]
    assert sum(moved) == CALLS and all(m > 0 for m in moved), f"requests per replica: {moved}"


def test_without_round_robin_one_channel_sticks_to_one_replica(cluster):
    """The reason for L7 or client-side balancing: a plain channel pins every call to one replica."""
    replicas, _ = cluster
    moved = calls_per_replica(replicas, connect(round_robin_target(replicas)))  # default policy: pick_first
    assert sorted(moved) == [0, 0, CALLS]


def test_nginx_refuses_calls_beyond_its_in_flight_limit_with_unavailable(nginx_tool, tmp_path):
    """limit_conn admits at most N calls in flight; the rest get a gRPC UNAVAILABLE at once."""
    (replica,) = start_replicas(1, REPO_ROOT / "model_repo", MODEL, tmp_path)
    nginx = None
    try:
        nginx = Nginx(free_port(), [replica.port], tmp_path, inflight_limit=1)
        assert "limit_conn kiln_inflight 1;" in nginx.conf.read_text()
        channel = grpc.insecure_channel(nginx.url)
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        request = mlp_request(MODEL, 1, seed=0)[0].SerializeToString()
        futures = [call.future(request, timeout=30) for _ in range(64)]  # all in flight at once
        outcomes = []
        for future in futures:
            try:
                future.result()
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(f"{exc.code().name}: {exc.details()}")
        channel.close()
        assert "OK" in outcomes
        assert set(outcomes) == {"OK", "UNAVAILABLE: too many calls in flight, retry later"}, set(outcomes)
    finally:
        if nginx is not None:
            nginx.stop()
        stop_replicas([replica])


@pytest.fixture
def cluster_down(nginx_tool, tmp_path):
    """nginx whose only upstream port has nothing listening."""
    nginx = Nginx(free_port(), [free_port()], tmp_path)
    yield nginx
    nginx.stop()


def test_nginx_answers_unavailable_when_no_replica_is_up(cluster_down):
    nginx = cluster_down
    connection = connect(nginx.url)
    try:
        with pytest.raises(grpc.RpcError) as info:
            connection.call("ModelInfer", mlp_request(MODEL, 1, seed=0)[0], 30)
    finally:
        connection.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "no kiln replica answered"


def test_retry_policy_retries_unavailable_and_cancelled_only():
    config = json.loads(service_config(retries=3, round_robin=True))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    (method,) = config["methodConfig"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert "retryPolicy" not in service_config()
    with pytest.raises(ValueError, match="retries"):
        service_config(retries=5)  # gRPC caps attempts at 5


def test_sigterm_to_one_replica_under_load_loses_no_request(nginx_tool, tmp_path):
    replicas = start_replicas(3, REPO_ROOT / "model_repo", MODEL, tmp_path, grace_s=10)
    nginx = None
    try:
        nginx = Nginx(free_port(), [r.port for r in replicas], tmp_path)
        # a client without retries shows what the retrying ones absorb: the drain's refusals
        with SteadyLoad(nginx.url, MODEL, threads=3) as via_nginx, \
                SteadyLoad(round_robin_target(replicas), MODEL, threads=3, round_robin=True) as via_client, \
                SteadyLoad(nginx.url, MODEL, threads=2, retries=0) as no_retries:
            time.sleep(2.0)
            served_before_signal = counts(replicas)
            assert served_before_signal[0] > 0, "the replica to stop was not serving"
            loads_before_signal = (via_nginx.count(), via_client.count())
            assert replicas[0].terminate() == 0
            survivors_at_exit = counts(replicas[1:])
            time.sleep(2.0)
        assert via_nginx.failures == [] and via_client.failures == []
        assert no_retries.failures, "the stopped replica refused nothing: the drain was not exercised"
        # CANCELLED: a call reaching the port in the instant it closes (grpc/grpc#41785); retried as well.
        # nginx's own UNAVAILABLE: a call whose body already went to the closing replica, which nginx
        # cannot replay on another one (502 -> its @unavailable page); the retrying clients absorb it too.
        assert "UNAVAILABLE: server is shutting down" in no_retries.failures
        assert set(no_retries.failures) <= {"UNAVAILABLE: server is shutting down", "CANCELLED: CANCELLED",
                                            "UNAVAILABLE: no kiln replica answered"}
        assert via_nginx.count() > loads_before_signal[0] and via_client.count() > loads_before_signal[1]
        survivors_now = counts(replicas[1:])
        assert all(now > then for now, then in zip(survivors_now, survivors_at_exit)), "a survivor stopped serving"
    finally:
        if nginx is not None:
            nginx.stop()
        stop_replicas(replicas)
