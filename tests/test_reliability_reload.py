"""Hot reload under a steady load: version 1 replaced by version 2 with zero failed requests, the
answers switching from v1's outputs to v2's. Explicit mode here (load_model again after the files
change); poll mode is test_repository.py::test_poll_new_version_replaces_old_without_failing_requests."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import tritonclient.grpc as triton

from test_repository import add_version_atomically, make_scale, wait_for, x_input


def test_explicit_reload_under_load_loses_nothing(tmp_path, start_server):
    repo = tmp_path / "repo"
    model_dir = make_scale(repo, "s", {1: 1.0})
    server = start_server(repo, control_mode="explicit", load_models=("s",))
    client = triton.InferenceServerClient(server.url)
    x, inp = x_input(rows=4, seed=3)

    results: list = []
    lock = threading.Lock()
    stop = threading.Event()
    sent = [0]

    def steady(period_s: float = 0.004) -> None:  # ~250 requests/s, evenly spaced
        next_at = time.monotonic()
        while not stop.is_set():
            client.async_infer("s", [inp], lambda result, error: (lock.acquire(), results.append((result, error)),
                                                                   lock.release()))
            sent[0] += 1
            next_at += period_s
            time.sleep(max(0.0, next_at - time.monotonic()))

    sender = threading.Thread(target=steady)
    sender.start()
    admin = triton.InferenceServerClient(server.url)
    try:
        time.sleep(0.3)
        add_version_atomically(model_dir, 2, 2.0, tmp_path / "staging")
        time.sleep(0.2)  # the new files alone change nothing in explicit mode
        assert admin.infer("s", [inp]).get_response().model_version == "1"
        admin.load_model("s")  # the reload: v2 serves at once, v1 drains
        assert admin.infer("s", [inp]).get_response().model_version == "2"
        time.sleep(0.3)
        shutil.rmtree(model_dir / "1")  # the old version's files go; loading again changes nothing served
        admin.load_model("s")
        time.sleep(0.3)
    finally:
        stop.set()
        sender.join()
    wait_for(lambda: len(results) == sent[0], timeout=10, what="every request to come back")

    errors = [error for _, error in results if error is not None]
    assert not errors, f"{len(errors)} of {len(results)} requests failed during the reload: {errors[0]}"
    versions = [result.get_response().model_version for result, _ in results]
    for result, _ in results:
        np.testing.assert_allclose(result.as_numpy("y"), int(result.get_response().model_version) * x, rtol=1e-6)
    # responses switch from v1 to v2 once (requests sent after the reload never see v1)
    switch = versions.index("2")
    assert set(versions[:switch]) == {"1"} and len(versions) - switch > 50, (switch, len(versions))
    assert versions.count("1") > 50
    assert [m.version for m in admin.get_model_repository_index().models if m.name == "s"] == ["2"]
