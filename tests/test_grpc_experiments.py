"""server/grpc_experiments.py: the grpc-core experiments kiln turns off, and the operator's own choice."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT
from server.grpc_experiments import CLIENT_EXPERIMENTS, SERVER_EXPERIMENTS, merged


def test_merged_adds_what_is_not_named_and_keeps_what_is():
    assert merged("", SERVER_EXPERIMENTS) == "-event_engine_listener,-event_engine_for_all_other_endpoints"
    assert merged(" tcp_frame_size_tuning ", CLIENT_EXPERIMENTS) == "tcp_frame_size_tuning,-event_engine_client"
    # named by the operator, on or off: left as they set it
    assert merged("event_engine_listener", SERVER_EXPERIMENTS) == "event_engine_listener,-event_engine_for_all_other_endpoints"
    assert merged("-event_engine_client", CLIENT_EXPERIMENTS) == "-event_engine_client"


def _environment_seen_by_grpc(extra: dict[str, str]) -> str:
    """GRPC_EXPERIMENTS at the moment a fresh interpreter that imports kiln's server first loads grpc."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"} | extra
    env["PYTHONPATH"] = str(REPO_ROOT)
    code = (
        "import os, sys; import server; assert 'grpc' not in sys.modules; "  # set, and grpc not loaded yet
        "seen = os.environ['GRPC_EXPERIMENTS']; import server.app; print(seen)"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_importing_kiln_sets_them_before_grpc_loads_and_keeps_the_operators():
    assert _environment_seen_by_grpc({}) == ",".join(SERVER_EXPERIMENTS)
    assert _environment_seen_by_grpc({"GRPC_EXPERIMENTS": "event_engine_listener"}) == (
        "event_engine_listener,-event_engine_for_all_other_endpoints"
    )


def test_programs_that_are_not_kiln_get_the_operators_value():
    code = (
        "import server.grpc_experiments as g; env = g.operators_environment(); "
        "print(env.get('GRPC_EXPERIMENTS', '<unset>'))"
    )
    for given, expected in ((None, "<unset>"), ("tcp_frame_size_tuning", "tcp_frame_size_tuning")):
        env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"} | {"PYTHONPATH": str(REPO_ROOT)}
        if given is not None:
            env["GRPC_EXPERIMENTS"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected


def test_added_merges_for_the_block_and_restores_after(monkeypatch):
    from server.grpc_experiments import added

    monkeypatch.setenv("GRPC_EXPERIMENTS", "tcp_frame_size_tuning")
    with added(CLIENT_EXPERIMENTS):
        assert os.environ["GRPC_EXPERIMENTS"] == "tcp_frame_size_tuning,-event_engine_client"
    assert os.environ["GRPC_EXPERIMENTS"] == "tcp_frame_size_tuning"
    monkeypatch.delenv("GRPC_EXPERIMENTS")
    with added(CLIENT_EXPERIMENTS):
        assert os.environ["GRPC_EXPERIMENTS"] == "-event_engine_client"
    assert "GRPC_EXPERIMENTS" not in os.environ
