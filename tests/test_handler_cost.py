"""loadtests/handler_cost.py: kiln's ModelInfer handler and the floor's, called in-process on a real model."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import REPO_ROOT
from loadtests import handler_cost


def test_measures_both_handlers_on_every_round_and_kiln_serves_every_call():
    result = asyncio.run(handler_cost.measure(REPO_ROOT / "model_repo", "mlp", calls=50, rounds=3))
    assert len(result["rounds_us"]["kiln"]) == len(result["rounds_us"]["floor"]) == 3
    assert result["kiln_us"] == min(result["rounds_us"]["kiln"]) > 0
    assert result["floor_us"] == min(result["rounds_us"]["floor"]) > 0
    assert result["kiln_extra_us"] == pytest.approx(result["kiln_us"] - result["floor_us"])
    assert result["kiln_requests_served"] == 50 + 3 * 50  # warm-up, then the rounds


def test_cli_writes_json_and_refuses_an_empty_run(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert handler_cost.main(["--calls", "20", "--rounds", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["calls_per_round"] == 20
    assert "kiln - floor:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        handler_cost.main(["--calls", "0"])


def test_names_the_missing_onnx_file_the_floor_would_need(tmp_path):
    class Version:  # what _onnx_file reads of a loaded version
        name, version = "mlp", 1

        class config_proto:
            default_model_filename = ""

        class config:
            platform = "onnxruntime_onnx"

    with pytest.raises(SystemExit, match="floor runs ONNX models only"):
        handler_cost._onnx_file(tmp_path, Version)
    assert handler_cost._onnx_file(REPO_ROOT / "model_repo", Version) == REPO_ROOT / "model_repo/mlp/1/model.onnx"
