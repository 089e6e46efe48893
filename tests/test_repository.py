"""The model repository through a real server and tritonclient: control modes, version policies,
broken models, auto-complete and Triton configs with fields kiln does not implement."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from onnx_models import scale_config, scale_model, write_config

DIMS = [4]


def make_scale(repo: Path, name: str, factors: dict[int, float], extra: str = "") -> Path:
    """A model directory whose version N computes y = x * factors[N]."""
    model_dir = repo / name
    write_config(model_dir, scale_config(name, extra))
    for version, factor in factors.items():
        scale_model(model_dir / str(version) / "model.onnx", factor, DIMS)
    return model_dir


def add_version_atomically(model_dir: Path, version: int, factor: float, staging: Path) -> None:
    """Build the version directory elsewhere and rename it in, so a poll never sees half a file."""
    staged = staging / f"{model_dir.name}-{version}"
    scale_model(staged / "model.onnx", factor, DIMS)
    os.rename(staged, model_dir / str(version))


def x_input(rows: int = 1, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return x, inp


def infer(client, name: str, version: str = ""):
    """(x, y, answering version) of one request."""
    x, inp = x_input()
    result = client.infer(name, [inp], model_version=version)
    return x, result.as_numpy("y"), result.get_response().model_version


def status_of(exc_info) -> str:
    return exc_info.value.status()


def index_rows(client) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for model in client.get_model_repository_index(as_json=True).get("models", []):
        rows.setdefault(model["name"], []).append(model)
    return rows


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---- explicit mode ---------------------------------------------------------------------------


@pytest.fixture
def explicit_server(tmp_path, start_server):
    repo = tmp_path / "repo"
    make_scale(repo, "a", {1: 1.0})
    make_scale(repo, "b", {1: 3.0})
    server = start_server(repo, control_mode="explicit", load_models=("a",))
    return server, triton.InferenceServerClient(server.url)


def test_explicit_only_startup_models_are_ready(explicit_server):
    _, client = explicit_server
    assert client.is_server_ready()
    assert client.is_model_ready("a")
    assert not client.is_model_ready("b")
    with pytest.raises(InferenceServerException) as exc:
        infer(client, "b")
    assert status_of(exc) == "StatusCode.UNAVAILABLE"
    rows = index_rows(client)
    assert rows["a"][0]["state"] == "READY"
    assert rows["b"][0].get("state") != "READY"


def test_explicit_load_then_unload(explicit_server):
    _, client = explicit_server
    client.load_model("b")
    assert client.is_model_ready("b")
    x, y, version = infer(client, "b")
    np.testing.assert_allclose(y, 3 * x, rtol=1e-6)
    assert version == "1"

    client.unload_model("b")
    assert not client.is_model_ready("b")
    with pytest.raises(InferenceServerException) as exc:
        infer(client, "b")
    assert status_of(exc) == "StatusCode.UNAVAILABLE"
    # a is untouched, and b can come back
    assert client.is_model_ready("a")
    client.load_model("b")
    x, y, _ = infer(client, "b")
    np.testing.assert_allclose(y, 3 * x, rtol=1e-6)


def test_explicit_load_unknown_model_names_it(explicit_server):
    server, client = explicit_server
    with pytest.raises(InferenceServerException) as exc:
        client.load_model("nosuch")
    assert status_of(exc) == "StatusCode.NOT_FOUND"
    assert "nosuch" in exc.value.message()
    # a failed load of a name that is not in the repository leaves no trace behind
    assert "nosuch" not in index_rows(client)
    with pytest.raises(InferenceServerException) as exc:
        infer(client, "nosuch")
    assert status_of(exc) == "StatusCode.NOT_FOUND"
    assert client.is_server_ready()


@pytest.mark.parametrize("name", ["../x", "..", "a/../b", "/etc", "a\\b"])
def test_explicit_load_path_like_name_is_not_found(explicit_server, name):
    _, client = explicit_server
    with pytest.raises(InferenceServerException) as exc:
        client.load_model(name)
    assert status_of(exc) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as exc:
        client.unload_model(name)
    assert status_of(exc) == "StatusCode.NOT_FOUND"


def test_load_is_refused_outside_explicit_mode(tmp_path, start_server):
    repo = tmp_path / "repo"
    make_scale(repo, "a", {1: 1.0})
    client = triton.InferenceServerClient(start_server(repo).url)
    for action in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as exc:
            action("a")
        assert status_of(exc) == "StatusCode.FAILED_PRECONDITION"
    assert client.is_model_ready("a")


# ---- poll mode -------------------------------------------------------------------------------


def test_poll_new_version_replaces_old_without_failing_requests(tmp_path, start_server):
    repo = tmp_path / "repo"
    staging = tmp_path / "staging"
    model_dir = make_scale(repo, "s", {1: 1.0})
    server = start_server(repo, control_mode="poll", poll_secs=0.3)
    client = triton.InferenceServerClient(server.url)
    x, y, version = infer(client, "s")
    np.testing.assert_allclose(y, x, rtol=1e-6)
    assert version == "1"

    # Keep requests flowing through the swap; each must finish, on v1 or on v2, and say which.
    results: list = []
    lock = threading.Lock()
    stop = threading.Event()
    sent = [0]
    x8, inp8 = x_input(rows=8, seed=1)

    def callback(result, error):
        with lock:
            results.append((result, error))

    def fire():
        while not stop.is_set():
            for _ in range(4):
                client.async_infer("s", [inp8], callback)
                sent[0] += 1
            time.sleep(0.01)

    sender = threading.Thread(target=fire)
    sender.start()
    try:
        time.sleep(0.2)
        add_version_atomically(model_dir, 2, 2.0, staging)

        def answered_by_v2():
            _, y, version = infer(client, "s")
            return version == "2"

        wait_for(answered_by_v2, timeout=8, what="version 2 to answer")
        time.sleep(0.3)
    finally:
        stop.set()
        sender.join()
    wait_for(lambda: len(results) == sent[0], timeout=10, what="every request sent to come back")

    errors = [error for _, error in results if error is not None]
    assert not errors, f"{len(errors)} of {len(results)} requests failed during the swap: {errors[0]}"
    versions = set()
    for result, _ in results:
        version = result.get_response().model_version
        versions.add(version)
        np.testing.assert_allclose(result.as_numpy("y"), int(version) * x8, rtol=1e-6)
    assert versions == {"1", "2"}, versions

    # latest(1): version 1 is gone once version 2 serves
    x, y, version = infer(client, "s")
    np.testing.assert_allclose(y, 2 * x, rtol=1e-6)
    assert version == "2"
    with pytest.raises(InferenceServerException) as exc:
        infer(client, "s", "1")
    assert status_of(exc) == "StatusCode.NOT_FOUND"
    assert [row.get("version") for row in index_rows(client)["s"]] == ["2"]
    assert client.is_model_ready("s", "2")


def test_poll_swap_lets_queued_requests_finish_on_the_old_version(tmp_path, start_server):
    """Requests already routed to v1 when v2 appears finish on v1 (it drains), none fail."""
    repo = tmp_path / "repo"
    model_dir = make_scale(repo, "s", {1: 1.0})
    server = start_server(repo, control_mode="poll", poll_secs=0.3)
    client = triton.InferenceServerClient(server.url)
    v1 = server.repository.models["s"].versions[1]
    real_infer = v1.runtime.infer
    release = threading.Event()

    def held_infer(inputs, output_names):  # scripted: v1 executions wait until the test lets them go
        release.wait(10)
        return real_infer(inputs, output_names)

    v1.runtime.infer = held_infer
    results: list = []
    x8, inp8 = x_input(rows=8, seed=2)
    for _ in range(8):
        client.async_infer("s", [inp8], lambda result, error: results.append((result, error)))
    # all 8 routed to version 1: one executing (held), the rest queued behind it
    wait_for(lambda: v1.scheduler.inflight == 8, timeout=5,
             what="the requests to reach version 1")
    add_version_atomically(model_dir, 2, 2.0, tmp_path / "staging")
    try:
        wait_for(lambda: [r.get("version") for r in index_rows(client)["s"]] == ["2"], timeout=8,
                 what="version 2 to replace version 1")
        assert results == [], "version 1's requests cannot have finished: they are held"
        # new requests go to version 2 at once, while version 1 still holds its requests
        x, y, version = infer(client, "s")
        assert version == "2"
        np.testing.assert_allclose(y, 2 * x, rtol=1e-6)
    finally:
        release.set()
    wait_for(lambda: len(results) == 8, timeout=10, what="the held requests to finish")
    errors = [error for _, error in results if error is not None]
    assert not errors, errors[0]
    for result, _ in results:
        assert result.get_response().model_version == "1"
        np.testing.assert_allclose(result.as_numpy("y"), x8, rtol=1e-6)
    x, y, version = infer(client, "s")
    assert version == "2"
    np.testing.assert_allclose(y, 2 * x, rtol=1e-6)


def test_poll_adds_and_removes_models(tmp_path, start_server):
    repo = tmp_path / "repo"
    staging = tmp_path / "staging"
    make_scale(repo, "keep", {1: 1.0})
    server = start_server(repo, control_mode="poll", poll_secs=0.3)
    client = triton.InferenceServerClient(server.url)
    assert client.is_model_ready("keep")

    # a new model directory appears (built aside and renamed in, as a deploy script would)
    make_scale(staging, "fresh", {1: 5.0})
    os.rename(staging / "fresh", repo / "fresh")
    wait_for(lambda: "fresh" in index_rows(client) and index_rows(client)["fresh"][0].get("state") == "READY",
             timeout=8, what="the new model to load")
    x, y, _ = infer(client, "fresh")
    np.testing.assert_allclose(y, 5 * x, rtol=1e-6)

    # a model directory disappears
    shutil.rmtree(repo / "fresh")
    wait_for(lambda: "fresh" not in index_rows(client), timeout=8, what="the removed model to unload")
    with pytest.raises(InferenceServerException) as exc:
        infer(client, "fresh")
    assert status_of(exc) == "StatusCode.NOT_FOUND"
    assert client.is_model_ready("keep")
    assert client.is_server_ready()


def test_poll_keeps_serving_when_a_new_version_is_broken(tmp_path, start_server, caplog):
    repo = tmp_path / "repo"
    model_dir = make_scale(repo, "s", {1: 1.0})
    caplog.set_level(logging.ERROR, logger="kiln.repository")
    server = start_server(repo, control_mode="poll", poll_secs=0.3)
    client = triton.InferenceServerClient(server.url)
    (model_dir / "2").mkdir()
    (model_dir / "2" / "model.onnx").write_bytes(b"this is not an onnx file")
    wait_for(lambda: any("'s' failed to load" in r.getMessage() for r in caplog.records), timeout=8,
             what="the failed reload to be logged")
    x, y, version = infer(client, "s")
    np.testing.assert_allclose(y, x, rtol=1e-6)
    assert version == "1"
    assert client.is_model_ready("s")
    assert client.is_server_ready()


# ---- version policies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, served, absent, default",
    [
        ("version_policy: { all { } }", [1, 2, 3], [], 3),
        ("version_policy: { specific { versions: [1, 3] } }", [1, 3], [2], 3),
        ("version_policy: { latest { num_versions: 2 } }", [2, 3], [1], 3),
        ("", [3], [1, 2], 3),
    ],
    ids=["all", "specific", "latest2", "default-latest1"],
)
def test_version_policy(tmp_path, start_server, policy, served, absent, default):
    repo = tmp_path / "repo"
    make_scale(repo, "v", {1: 1.0, 2: 2.0, 3: 3.0}, extra=policy)
    client = triton.InferenceServerClient(start_server(repo).url)
    for number in served:
        x, y, version = infer(client, "v", str(number))
        assert version == str(number)
        np.testing.assert_allclose(y, number * x, rtol=1e-6)
        assert client.is_model_ready("v", str(number))
    for number in absent:
        with pytest.raises(InferenceServerException) as exc:
            infer(client, "v", str(number))
        assert status_of(exc) == "StatusCode.NOT_FOUND"
    x, y, version = infer(client, "v")
    assert version == str(default)
    np.testing.assert_allclose(y, default * x, rtol=1e-6)
    assert sorted(int(r["version"]) for r in index_rows(client)["v"]) == served
    assert client.get_model_metadata("v", as_json=True)["versions"] == [str(n) for n in served]


# ---- broken models ---------------------------------------------------------------------------


@pytest.fixture
def broken_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    make_scale(repo, "good", {1: 1.0})
    bad_bytes = repo / "bad_bytes"
    write_config(bad_bytes, scale_config("bad_bytes"))
    (bad_bytes / "1").mkdir()
    (bad_bytes / "1" / "model.onnx").write_bytes(b"\x08\x01garbage that is not an ONNX model")
    mismatch = repo / "mismatch"
    write_config(mismatch, scale_config("mismatch").replace('name: "x"', 'name: "input_0"'))
    scale_model(mismatch / "1" / "model.onnx", 1.0, DIMS)
    return repo


def test_broken_models_do_not_take_the_server_down(broken_repo, start_server):
    client = triton.InferenceServerClient(start_server(broken_repo).url)
    assert client.is_server_live()
    assert client.is_model_ready("good")
    x, y, _ = infer(client, "good")
    np.testing.assert_allclose(y, x, rtol=1e-6)
    rows = index_rows(client)
    for name in ("bad_bytes", "mismatch"):
        assert not client.is_model_ready(name)
        assert len(rows[name]) == 1
        assert rows[name][0]["state"] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException) as exc:
            infer(client, name)
        assert status_of(exc) == "StatusCode.UNAVAILABLE"
    assert "model.onnx" in rows["bad_bytes"][0]["reason"]
    reason = rows["mismatch"][0]["reason"]
    assert "input_0" in reason and "x" in reason, reason
    # strict readiness (the default): a start-up model failed, so the server is not ready
    assert not client.is_server_ready()


def test_broken_model_with_lenient_readiness(broken_repo, start_server):
    client = triton.InferenceServerClient(start_server(broken_repo, strict_readiness=False).url)
    assert client.is_server_ready()
    assert client.is_model_ready("good")
    assert not client.is_model_ready("bad_bytes")


# ---- auto-complete ---------------------------------------------------------------------------


def test_model_without_config_is_auto_completed(tmp_path, start_server):
    repo = tmp_path / "repo"
    scale_model(repo / "auto" / "1" / "model.onnx", 4.0, [3, 5])
    assert not (repo / "auto" / "config.pbtxt").exists()
    client = triton.InferenceServerClient(start_server(repo).url)
    assert client.is_server_ready()
    assert client.is_model_ready("auto")
    config = client.get_model_config("auto", as_json=True)["config"]
    assert config["name"] == "auto"
    assert config["platform"] == "onnxruntime_onnx"
    assert int(config["max_batch_size"]) > 0
    assert "dynamic_batching" in config
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("x", "TYPE_FP32", [3, 5])
    ]
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["output"]] == [
        ("y", "TYPE_FP32", [3, 5])
    ]
    x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    inp = triton.InferInput("x", [2, 3, 5], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("auto", [inp]).as_numpy("y"), 4 * x, rtol=1e-6)


# ---- Triton configs with fields kiln does not implement --------------------------------------


TRITON_CONFIG = """
name: "triton"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 4 ]
    reshape: { shape: [ 4 ] }
  }
]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
response_cache { enable: true }
model_transaction_policy { decoupled: false }
future_triton_option { enable: true level: 2 }
"""


def test_triton_config_with_unimplemented_fields_loads_with_one_warning(tmp_path, start_server, caplog):
    repo = tmp_path / "repo"
    write_config(repo / "triton", TRITON_CONFIG)
    scale_model(repo / "triton" / "1" / "model.onnx", 2.0, DIMS)
    caplog.set_level(logging.WARNING, logger="kiln.config")
    client = triton.InferenceServerClient(start_server(repo).url)
    assert client.is_model_ready("triton")
    x, y, _ = infer(client, "triton")
    np.testing.assert_allclose(y, 2 * x, rtol=1e-6)
    warnings = [r for r in caplog.records if r.name == "kiln.config" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    # set fields of the proto that kiln does not act on, and a field the proto does not even have
    for field in ("response_cache", "model_transaction_policy", "reshape", "future_triton_option"):
        assert field in message, message
    # fields kiln does implement are not named
    for field in ("dynamic_batching", "max_batch_size", "platform"):
        assert field not in message, message


def test_model_needing_a_missing_library_fails_alone_naming_the_extra(tmp_path, start_server):
    """A TensorRT engine on a machine without TensorRT: that model is UNAVAILABLE with the extra to install,
    the ONNX model beside it serves."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    make_scale(tmp_path, "onnx", {1: 2.0})
    engine_dir = tmp_path / "engine"
    write_config(engine_dir, scale_config("engine").replace('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"'))
    (engine_dir / "1").mkdir()
    (engine_dir / "1" / "model.plan").write_bytes(b"not an engine")
    server = start_server(tmp_path, strict_readiness=False)
    client = triton.InferenceServerClient(server.url)
    assert client.is_model_ready("onnx") and not client.is_model_ready("engine")
    reason = {m.name: m.reason for m in client.get_model_repository_index().models}["engine"]
    assert "pip install 'kiln-serve[tensorrt]'" in reason
    x, inp = x_input()
    np.testing.assert_allclose(client.infer("onnx", [inp]).as_numpy("y"), 2 * x, rtol=1e-6)
