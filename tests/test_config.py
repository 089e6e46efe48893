"""config.pbtxt parsing, warnings for ignored fields, validation and auto-completion."""

import logging

import pytest

from server.config import (
    ConfigError,
    check_against_model,
    complete_config,
    parse_config_text,
    to_model_config,
    unsupported_fields,
)
from server.model_types import TimeoutAction, VersionPolicy
from server.protocol import model_config_pb2 as mc
from server.runtime.base import TensorInfo

TRITON_CONFIG = """
name: "resnet"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ { name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 224, 224 ] } ]
output [ { name: "probs" data_type: TYPE_FP32 dims: [ 1000 ] label_filename: "labels.txt" } ]
dynamic_batching {
  preferred_batch_size: [ 8, 16 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 10 timeout_action: DELAY default_timeout_microseconds: 5000 }
  priority_queue_policy { key: 1 value: { max_queue_size: 4 allow_timeout_override: true } }
}
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { latest: { num_versions: 2 } }
response_cache { enable: true }
model_transaction_policy { decoupled: false }
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
"""


def test_triton_config_loads_and_names_each_ignored_field_once(caplog):
    with caplog.at_level(logging.WARNING, logger="kiln.config"):
        message = parse_config_text(TRITON_CONFIG, "resnet/config.pbtxt")
    warnings = [r.getMessage() for r in caplog.records if r.name == "kiln.config"]
    assert len(warnings) == 1
    for field in ("response_cache", "model_transaction_policy", "input.format", "output.label_filename"):
        assert field in warnings[0]
    config = to_model_config(message, "onnxruntime_onnx")
    assert config.max_batch_size == 32
    assert config.inputs[0].dims == (3, 224, 224)
    batching = config.dynamic_batching
    assert batching.preferred_batch_size == (8, 16)
    assert batching.max_queue_delay_microseconds == 100
    assert batching.default_queue_policy.timeout_action is TimeoutAction.DELAY
    assert batching.default_queue_policy.max_queue_size == 10
    assert batching.policy_for(1).allow_timeout_override
    assert batching.policy_for(2).max_queue_size == 10
    assert config.instance_group.count == 2 and config.instance_group.kind == "KIND_CPU"
    assert config.version_policy == VersionPolicy(kind="latest", latest_num_versions=2)
    assert config.parameters == {"intra_op_thread_count": "2"}


def test_supported_config_has_no_warning():
    message = parse_config_text('name: "m" max_batch_size: 4 input [{name: "x" data_type: TYPE_FP32 dims: [2]}]')
    assert unsupported_fields(message) == []


def test_syntax_error_names_the_file():
    with pytest.raises(ConfigError, match="m/config.pbtxt"):
        parse_config_text("name: 'm' max_batch_size: {", "m/config.pbtxt")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('max_batch_size: 4 input [{name: "x" data_type: TYPE_FP32 dims: [2]}] output [{name: "y" data_type: TYPE_FP32 dims: [2]}]', "no name"),
        ('name: "m" max_batch_size: -1 input [{name: "x" data_type: TYPE_FP32 dims: [2]}] output [{name: "y" data_type: TYPE_FP32 dims: [2]}]', "max_batch_size"),
        ('name: "m" input [{name: "x" data_type: TYPE_FP32 dims: [0]}] output [{name: "y" data_type: TYPE_FP32 dims: [2]}]', "dims must be positive"),
        ('name: "m" input [{name: "x" data_type: TYPE_FP32 dims: [2]}, {name: "x" data_type: TYPE_FP32 dims: [2]}] output [{name: "y" data_type: TYPE_FP32 dims: [2]}]', "duplicate input"),
        ('name: "m" max_batch_size: 4 input [{name: "x" data_type: TYPE_FP32 dims: [2]}] output [{name: "y" data_type: TYPE_FP32 dims: [2]}] dynamic_batching { preferred_batch_size: [8] }', "preferred_batch_size"),
        ('name: "m" max_batch_size: 4 input [{name: "x" data_type: TYPE_FP32 dims: [2]}] output [{name: "y" data_type: TYPE_FP32 dims: [2]}] dynamic_batching { priority_levels: 2 default_priority_level: 3 }', "default_priority_level"),
        ('name: "m" input [{name: "x" data_type: TYPE_FP32 dims: [2]}] output [{name: "y" data_type: TYPE_FP32 dims: [2]}] version_policy { latest { num_versions: 0 } }', "num_versions"),
    ],
)
def test_invalid_configs_are_rejected_with_the_reason(text, expected):
    with pytest.raises(ConfigError, match=expected):
        to_model_config(parse_config_text(text), "onnxruntime_onnx")


def test_auto_complete_from_model_file_with_dynamic_batch():
    message = mc.ModelConfig(name="auto")
    inputs = [TensorInfo("x", "FP32", (-1, 16))]
    outputs = [TensorInfo("y", "INT64", (-1, 3))]
    complete_config(message, "onnxruntime_onnx", inputs, outputs)
    config = to_model_config(message, "onnxruntime_onnx")
    assert config.max_batch_size == 64
    assert config.dynamic_batching is not None
    assert config.inputs[0].dims == (16,) and config.outputs[0].datatype == "INT64"
    check_against_model(config, inputs, outputs)


def test_auto_complete_without_batch_dim_keeps_full_shape():
    message = mc.ModelConfig(name="fixed")
    complete_config(message, "onnxruntime_onnx", [TensorInfo("x", "FP32", (4, 4))], [TensorInfo("y", "FP32", (4,))])
    config = to_model_config(message, "onnxruntime_onnx")
    assert config.max_batch_size == 0 and config.inputs[0].dims == (4, 4)


def test_config_that_contradicts_the_model_file_is_rejected():
    message = parse_config_text(
        'name: "m" max_batch_size: 4 input [{name: "x" data_type: TYPE_FP32 dims: [2]}] '
        'output [{name: "y" data_type: TYPE_FP32 dims: [2]}]'
    )
    config = to_model_config(message, "onnxruntime_onnx")
    with pytest.raises(ConfigError, match="input 'x': config says FP32, model file says INT32"):
        check_against_model(config, [TensorInfo("x", "INT32", (-1, 2))], [TensorInfo("y", "FP32", (-1, 2))])
    with pytest.raises(ConfigError, match="not in the model file"):
        check_against_model(config, [TensorInfo("input", "FP32", (-1, 2))], [TensorInfo("y", "FP32", (-1, 2))])
    with pytest.raises(ConfigError, match="does not fit"):
        check_against_model(config, [TensorInfo("x", "FP32", (-1, 3))], [TensorInfo("y", "FP32", (-1, 2))])


@pytest.mark.parametrize(
    "policy, available, expected",
    [
        (VersionPolicy(), [1, 3, 2], [3]),
        (VersionPolicy(kind="latest", latest_num_versions=2), [1, 3, 2], [2, 3]),
        (VersionPolicy(kind="all"), [2, 1], [1, 2]),
        (VersionPolicy(kind="specific", specific_versions=(1, 3)), [1, 2], [1]),
        (VersionPolicy(), [], []),
    ],
)
def test_version_policy_selection(policy, available, expected):
    assert policy.select(available) == expected
