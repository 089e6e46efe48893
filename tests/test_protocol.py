"""The wire protocol: generated code is fresh, Triton configs parse, and our
messages are wire-compatible with tritonclient's own generated classes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format

from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from server.protocol import model_config_pb2 as mc

ROOT = Path(__file__).resolve().parent.parent

tc_service = pytest.importorskip("tritonclient.grpc.service_pb2")
tc_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")


# An unmodified Triton-style config.pbtxt for an ONNX model.
ONNX_CONFIG_PBTXT = r"""
name: "resnet50_onnx"
platform: "onnxruntime_onnx"
max_batch_size: 32
version_policy: { latest: { num_versions: 2 } }
input [
  {
    name: "input"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  },
  {
    name: "embedding"
    data_type: TYPE_FP16
    dims: [ -1 ]
    reshape: { shape: [ 1, -1 ] }
  }
]
dynamic_batching {
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 2000
  preserve_ordering: false
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy {
    timeout_action: REJECT
    default_timeout_microseconds: 100000
    allow_timeout_override: true
    max_queue_size: 256
  }
  priority_queue_policy {
    key: 2
    value: { timeout_action: DELAY, max_queue_size: 64 }
  }
}
instance_group [
  {
    name: "cpu_pool"
    count: 2
    kind: KIND_CPU
  }
]
parameters { key: "intra_op_thread_count" value: { string_value: "4" } }
parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }
optimization {
  graph: { level: 1 }
  execution_accelerators {
    gpu_execution_accelerator : [ {
      name : "tensorrt"
      parameters { key: "precision_mode" value: "FP16" }
      parameters { key: "max_workspace_size_bytes" value: "1073741824" }
    } ]
    cpu_execution_accelerator : [ { name : "openvino" } ]
  }
  input_pinned_memory { enable: true }
}
model_warmup [
  {
    name: "zeros_batch8"
    batch_size: 8
    count: 2
    inputs {
      key: "input"
      value: {
        data_type: TYPE_FP32
        dims: [ 3, 224, 224 ]
        zero_data: true
      }
    }
  }
]
response_cache { enable: true }
metric_tags { key: "team" value: "vision" }
"""


def test_generated_code_is_fresh():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_triton_onnx_config_parses():
    cfg = text_format.Parse(ONNX_CONFIG_PBTXT, mc.ModelConfig())
    assert cfg.name == "resnet50_onnx"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 32
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert cfg.version_policy.latest.num_versions == 2

    assert [i.name for i in cfg.input] == ["input"]
    assert cfg.input[0].data_type == mc.TYPE_FP32
    assert cfg.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert list(cfg.input[0].dims) == [3, 224, 224]
    assert [o.name for o in cfg.output] == ["logits", "embedding"]
    assert list(cfg.output[1].dims) == [-1]
    assert list(cfg.output[1].reshape.shape) == [1, -1]
    assert cfg.output[1].data_type == mc.TYPE_FP16

    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [8, 16, 32]
    assert db.max_queue_delay_microseconds == 2000
    assert db.priority_levels == 2
    assert db.default_queue_policy.max_queue_size == 256
    assert db.default_queue_policy.allow_timeout_override
    assert db.priority_queue_policy[2].timeout_action == mc.ModelQueuePolicy.DELAY

    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert cfg.instance_group[0].count == 2
    assert cfg.parameters["intra_op_thread_count"].string_value == "4"

    accel = cfg.optimization.execution_accelerators
    assert accel.gpu_execution_accelerator[0].name == "tensorrt"
    assert accel.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP16"
    assert accel.cpu_execution_accelerator[0].name == "openvino"
    assert cfg.optimization.graph.level == 1
    assert cfg.optimization.input_pinned_memory.enable

    warm = cfg.model_warmup[0]
    assert warm.batch_size == 8 and warm.count == 2
    assert warm.inputs["input"].WhichOneof("input_data_type") == "zero_data"
    assert cfg.response_cache.enable
    assert cfg.metric_tags["team"] == "vision"

    # Text format round trip.
    again = text_format.Parse(text_format.MessageToString(cfg), mc.ModelConfig())
    assert again == cfg


def test_newer_triton_config_fields_parse():
    # Fields newer than tritonclient 2.41's copy of the schema.
    cfg = text_format.Parse(
        """
        name: "m" backend: "onnxruntime" runtime: "libtriton_onnxruntime.so"
        input [ { name: "x" data_type: TYPE_BF16 dims: [ 4 ] is_non_linear_format_io: false } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] is_non_linear_format_io: false } ]
        model_metrics {
          metric_control [ {
            metric_identifier { family: "nv_inference_first_response_histogram_ms" }
            histogram_options { buckets: [ -5.0, -2, 0, 3.5, 5 ] }
          } ]
        }
        """,
        mc.ModelConfig(),
    )
    assert cfg.runtime == "libtriton_onnxruntime.so"
    assert list(cfg.model_metrics.metric_control[0].histogram_options.buckets) == [-5.0, -2, 0, 3.5, 5]
    ens = text_format.Parse(
        'ensemble_scheduling { step [ { model_name: "a" model_version: -1 input_map { key: "i" value: "x" } } ] '
        "max_inflight_responses: 4 }",
        mc.ModelConfig(),
    )
    assert ens.ensemble_scheduling.max_inflight_responses == 4


def test_model_config_response_ours_to_tritonclient():
    ours = pb.ModelConfigResponse(config=text_format.Parse(ONNX_CONFIG_PBTXT, mc.ModelConfig()))
    theirs = tc_service.ModelConfigResponse.FromString(ours.SerializeToString())
    # tritonclient's messages render to identical text, field for field.
    assert text_format.MessageToString(theirs) == text_format.MessageToString(ours)
    assert theirs.config.dynamic_batching.preferred_batch_size == [8, 16, 32]
    assert theirs.config.instance_group[0].kind == tc_config.ModelInstanceGroup.KIND_CPU
    assert (
        theirs.config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"]
        == "FP16"
    )


def test_model_config_response_tritonclient_to_ours():
    theirs = tc_service.ModelConfigResponse(
        config=text_format.Parse(ONNX_CONFIG_PBTXT, tc_config.ModelConfig())
    )
    ours = pb.ModelConfigResponse.FromString(theirs.SerializeToString())
    assert text_format.MessageToString(ours) == text_format.MessageToString(theirs)
    assert ours.config.input[0].data_type == mc.TYPE_FP32


def _infer_request(module):
    req = module.ModelInferRequest(model_name="resnet50_onnx", model_version="1", id="req-7")
    req.parameters["priority"].int64_param = 2
    req.parameters["timeout"].uint64_param = 5_000_000
    req.parameters["sequence_start"].bool_param = True
    req.parameters["scale"].double_param = 0.5
    req.parameters["tag"].string_param = "load-test"
    inp = req.inputs.add(name="input", datatype="FP32", shape=[2, 3, 224, 224])
    inp.parameters["binary_data_size"].int64_param = 1204224
    typed = req.inputs.add(name="tokens", datatype="INT64", shape=[2, 3])
    typed.contents.int64_contents.extend([1, 2, 3, 4, 5, -6])
    text = req.inputs.add(name="text", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend([b"hello", b"\x00\xff"])
    out = req.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 5
    req.raw_input_contents.append(bytes(range(256)) * 4)
    return req


def test_model_infer_request_roundtrip_both_ways():
    ours = _infer_request(pb)
    theirs = tc_service.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "resnet50_onnx" and theirs.id == "req-7"
    assert theirs.parameters["timeout"].uint64_param == 5_000_000
    assert theirs.parameters["scale"].double_param == 0.5
    assert list(theirs.inputs[1].contents.int64_contents) == [1, 2, 3, 4, 5, -6]
    assert list(theirs.inputs[2].contents.bytes_contents) == [b"hello", b"\x00\xff"]
    assert theirs.raw_input_contents[0] == bytes(range(256)) * 4
    assert text_format.MessageToString(theirs) == text_format.MessageToString(ours)

    back = pb.ModelInferRequest.FromString(_infer_request(tc_service).SerializeToString())
    assert back == ours


def test_infer_response_and_stream_response_to_tritonclient():
    resp = pb.ModelInferResponse(model_name="m", model_version="1", id="a")
    o = resp.outputs.add(name="logits", datatype="FP32", shape=[1, 4])
    o.parameters["binary_data_size"].int64_param = 16
    resp.raw_output_contents.append(b"\x00" * 16)
    stream = pb.ModelStreamInferResponse(infer_response=resp)
    theirs = tc_service.ModelStreamInferResponse.FromString(stream.SerializeToString())
    assert theirs.error_message == ""
    assert theirs.infer_response.outputs[0].shape == [1, 4]
    assert theirs.infer_response.raw_output_contents[0] == b"\x00" * 16


def test_statistics_and_repository_messages_to_tritonclient():
    stats = pb.ModelStatisticsResponse()
    s = stats.model_stats.add(name="m", version="1", inference_count=64, execution_count=2)
    s.inference_stats.success.count = 64
    s.inference_stats.queue.ns = 123
    s.batch_stats.add(batch_size=32).compute_infer.ns = 99
    s.memory_usage.add(type="GPU", id=0, byte_size=1 << 20)
    s.response_stats["0"].success.count = 1  # newer than tritonclient 2.41: skipped as unknown
    theirs = tc_service.ModelStatisticsResponse.FromString(stats.SerializeToString())
    t = theirs.model_stats[0]
    assert (t.inference_count, t.execution_count) == (64, 2)
    assert t.inference_stats.queue.ns == 123
    assert t.batch_stats[0].compute_infer.ns == 99
    assert t.memory_usage[0].byte_size == 1 << 20

    load = tc_service.RepositoryModelLoadRequest(model_name="m")
    load.parameters["config"].string_param = '{"max_batch_size": 8}'
    load.parameters["file:1/model.onnx"].bytes_param = b"\x08\x01"
    ours = pb.RepositoryModelLoadRequest.FromString(load.SerializeToString())
    assert ours.parameters["config"].string_param == '{"max_batch_size": 8}'
    assert ours.parameters["file:1/model.onnx"].bytes_param == b"\x08\x01"

    index = pb.RepositoryIndexResponse()
    index.models.add(name="m", version="1", state="READY", reason="")
    assert tc_service.RepositoryIndexResponse.FromString(index.SerializeToString()).models[0].state == "READY"


def _all_messages(file_desc):
    def walk(desc):
        yield desc
        for nested in desc.nested_types:
            yield from walk(nested)

    for top in file_desc.message_types_by_name.values():
        yield from walk(top)


def _all_enums(file_desc):
    def walk(desc):
        yield from desc.enum_types
        for nested in desc.nested_types:
            yield from walk(nested)

    yield from file_desc.enum_types_by_name.values()
    for top in file_desc.message_types_by_name.values():
        yield from walk(top)


def _field_sig(f):
    kind = f.message_type.full_name if f.message_type else (f.enum_type.full_name if f.enum_type else "")
    oneof = f.containing_oneof.name if f.containing_oneof else None
    repeated = f.is_repeated
    return (f.number, f.type, kind, repeated, oneof)


@pytest.mark.parametrize(
    "theirs, ours",
    [(tc_config.DESCRIPTOR, mc.DESCRIPTOR), (tc_service.DESCRIPTOR, pb.DESCRIPTOR)],
    ids=["model_config", "grpc_service"],
)
def test_descriptors_are_a_superset_of_tritonclient(theirs, ours):
    our_msgs = {m.full_name: m for m in _all_messages(ours)}
    problems = []
    for their_msg in _all_messages(theirs):
        mine = our_msgs.get(their_msg.full_name)
        if mine is None:
            problems.append(f"missing message {their_msg.full_name}")
            continue
        for f in their_msg.fields:
            g = mine.fields_by_name.get(f.name)
            if g is None:
                problems.append(f"{their_msg.full_name}: missing field {f.name}")
            elif _field_sig(g) != _field_sig(f):
                problems.append(f"{their_msg.full_name}.{f.name}: ours {_field_sig(g)} != theirs {_field_sig(f)}")

    our_enums = {e.full_name: e for e in _all_enums(ours)}
    for their_enum in _all_enums(theirs):
        mine = our_enums.get(their_enum.full_name)
        if mine is None:
            problems.append(f"missing enum {their_enum.full_name}")
            continue
        for v in their_enum.values:
            w = mine.values_by_name.get(v.name)
            if w is None or w.number != v.number:
                problems.append(f"{their_enum.full_name}.{v.name}: number mismatch or missing")
    assert not problems, "\n".join(problems)


def test_service_has_every_tritonclient_rpc():
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = tc_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    for m in theirs.methods:
        mine = ours.methods_by_name.get(m.name)
        assert mine is not None, f"missing rpc {m.name}"
        assert mine.input_type.full_name == m.input_type.full_name
        assert mine.output_type.full_name == m.output_type.full_name
        assert (mine.client_streaming, mine.server_streaming) == (m.client_streaming, m.server_streaming)
    assert hasattr(pb_grpc, "GRPCInferenceServiceServicer")
    assert hasattr(pb_grpc, "add_GRPCInferenceServiceServicer_to_server")


def test_importable_alongside_tritonclient_in_any_order():
    # Both packages register inference.* under the same proto file names; ours
    # lives in a private pool, so either import order works in one process.
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]: importlib.import_module(name)\n"
        "print('ok')\n"
    )
    mods = ["server.protocol.grpc_service_pb2_grpc", "tritonclient.grpc"]
    for order in (mods, mods[::-1]):
        proc = subprocess.run(
            [sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
