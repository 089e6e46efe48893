"""ONNX Runtime session options read from config parameters."""

import pytest

from server.config import parse_config_text, to_model_config
from server.runtime.base import RuntimeLoadError
from server.runtime.onnxruntime import OrtOptions

BASE = 'name: "m" max_batch_size: 4 input [{name: "x" data_type: TYPE_FP32 dims: [2]}] output [{name: "y" data_type: TYPE_FP32 dims: [2]}] '


def options(extra: str) -> OrtOptions:
    return OrtOptions.from_config(to_model_config(parse_config_text(BASE + extra), "onnxruntime_onnx"))


def param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }} '


def test_defaults_are_cpu_with_ort_defaults():
    default = options("instance_group [{ kind: KIND_CPU }]")
    assert default.providers == ("CPUExecutionProvider",)
    assert (default.intra_op_threads, default.inter_op_threads, default.graph_level) == (0, 0, 2)
    assert default.allow_spinning and not default.parallel_execution


def test_thread_counts_execution_mode_spinning_and_graph_level():
    parsed = options(
        param("intra_op_thread_count", "1") + param("inter_op_thread_count", "2") + param("execution_mode", "1")
        + param("allow_spinning", "0") + param("graph_optimization_level", "-1")
    )
    assert (parsed.intra_op_threads, parsed.inter_op_threads) == (1, 2)
    assert parsed.parallel_execution and not parsed.allow_spinning and parsed.graph_level == -1


def test_gpu_accelerators_shape_the_provider_list():
    parsed = options(
        'instance_group [{ kind: KIND_GPU gpus: [1] }] optimization { execution_accelerators { '
        'gpu_execution_accelerator: [{ name: "tensorrt" }] } }'
    )
    assert parsed.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert parsed.device_id == 1


@pytest.mark.parametrize("extra", [param("intra_op_thread_count", "two"), param("graph_optimization_level", "7")])
def test_bad_values_fail_the_load_with_the_key(extra):
    with pytest.raises(RuntimeLoadError, match="intra_op_thread_count|graph_optimization_level"):
        options(extra)


@pytest.mark.parametrize(("share", "configured", "expected"), [("", "", 0), ("1", "", 1), ("1", "3", 3)])
def test_a_workers_share_of_the_cores_sizes_ort_when_the_config_does_not(tmp_path, monkeypatch, share, configured, expected):
    """`kiln serve --workers N` sets KILN_CPU_SHARE in each worker: N ORT pools of every core would oversubscribe."""
    from onnx_models import scale_model
    from server.runtime.base import CPU_SHARE_ENV
    from server.runtime.onnxruntime import OnnxRuntime

    scale_model(tmp_path / "model.onnx", 2.0, [4])
    monkeypatch.setenv(CPU_SHARE_ENV, share)
    extra = param("intra_op_thread_count", configured) if configured else ""
    config = to_model_config(parse_config_text(BASE.replace("[2]", "[4]") + extra), "onnxruntime_onnx")
    runtime = OnnxRuntime(tmp_path / "model.onnx", config)
    assert runtime._session.get_session_options().intra_op_num_threads == expected
