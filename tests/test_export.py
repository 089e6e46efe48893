"""`kiln export`: zoo models exported once per module, then served through the real server and
compared with eager PyTorch at several batch sizes (and sequence lengths); the written
repository layout; the FP16 path; defaults that load with no hand edits; and the pieces
(spec parsing, FP16 conversion, atomic install, TensorRT profile planning) as units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import tritonclient.grpc as triton  # noqa: E402

from export_cases import CASES, check_served_parity, served_infer  # noqa: E402
from server.cli import main as kiln  # noqa: E402
from server.config import parse_config_text, read_config_file, to_model_config  # noqa: E402


@pytest.fixture(scope="module")
def zoo_repo(tmp_path_factory) -> Path:
    """mlp, digits (untrained CNN) and the transformer, each exported once with `kiln export`."""
    repo = tmp_path_factory.mktemp("export") / "repo"
    for case in CASES.values():
        assert case.export(repo) == 0, f"kiln export {case.name} failed"
    return repo


def test_export_layout_and_config(zoo_repo: Path) -> None:
    for name in CASES:
        vdir = zoo_repo / name / "1"
        assert (vdir / "model.onnx").is_file()
        onnx.checker.check_model(str(vdir / "model.onnx"), full_check=True)
        recipe = json.loads((vdir / "export.json").read_text())
        assert recipe["factory"].startswith("export.zoo.")
        config = to_model_config(read_config_file(zoo_repo / name / "config.pbtxt"), "onnxruntime_onnx")
        assert config.max_batch_size == 64 and config.dynamic_batching is not None
    # nothing but the models: the staging dirs lived outside the repository and are gone
    assert sorted(p.name for p in zoo_repo.iterdir()) == sorted(CASES)
    assert not [p for p in zoo_repo.parent.iterdir() if p.name.startswith(".")]

    tx = read_config_file(zoo_repo / "transformer" / "config.pbtxt")
    assert [(t.name, list(t.dims)) for t in tx.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert [(t.name, list(t.dims)) for t in tx.output] == [("logits", [4]), ("hidden", [-1, 64])]
    model = onnx.load(str(zoo_repo / "transformer" / "1" / "model.onnx"))
    dims = [[d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]


@pytest.mark.parametrize("name", sorted(CASES))
def test_served_parity_onnxruntime(zoo_repo: Path, start_server, name: str) -> None:
    server = start_server(zoo_repo)
    seen = check_served_parity(server.url, CASES[name], name)
    assert len(seen) >= 3


def test_export_defaults_load_without_edits(tmp_path: Path, start_server, capsys) -> None:
    """Only the required arguments: default output name, max_batch_size 64, version 1."""
    repo = tmp_path / "repo"
    assert kiln(["export", "export.zoo.mlp:build_mlp", "--name", "plain", "--input", "x:FP32:-1,256",
                 "--model-repository", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "parity onnxruntime [batch=64] output" in out and "max abs" in out and "max rel" in out
    server = start_server(repo)
    client = triton.InferenceServerClient(server.url)
    assert client.is_model_ready("plain")
    meta = client.get_model_metadata("plain")
    assert [o.name for o in meta.outputs] == ["output"]
    x = np.random.default_rng(0).standard_normal((5, 256), dtype=np.float32)
    y = served_infer(client, "plain", {"x": x}, ["output"])["output"]
    from export.zoo import build_mlp

    np.testing.assert_allclose(y, build_mlp(0)(torch.from_numpy(x)).detach().numpy(), atol=1e-5, rtol=1e-4)


def test_export_fp16_served(tmp_path: Path, start_server) -> None:
    repo = tmp_path / "repo"
    assert CASES["mlp"].export(repo, "--fp16") == 0
    config = read_config_file(repo / "mlp" / "config.pbtxt")
    from server.protocol import model_config_pb2 as mc

    assert [t.data_type for t in (*config.input, *config.output)] == [mc.TYPE_FP16, mc.TYPE_FP16]
    model = onnx.load(str(repo / "mlp" / "1" / "model.onnx"))
    assert all(i.data_type != onnx.TensorProto.FLOAT for i in model.graph.initializer)
    server = start_server(repo)
    check_served_parity(server.url, CASES["mlp"], "mlp", atol=2e-2, rtol=2e-2, fp16=True)


def test_export_second_version_keeps_first(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert CASES["mlp"].export(repo, "--parity-batch-sizes", "2") == 0
    assert CASES["mlp"].export(repo, "--version", "2", "--max-batch-size", "8", "--parity-batch-sizes", "2") == 0
    assert (repo / "mlp" / "1" / "model.onnx").is_file() and (repo / "mlp" / "2" / "model.onnx").is_file()
    assert read_config_file(repo / "mlp" / "config.pbtxt").max_batch_size == 8


# ---- units ------------------------------------------------------------------------------------


def test_tensor_spec_parsing() -> None:
    from export.spec import ExportError, TensorSpec, parse_axis_names

    assert TensorSpec.parse("x:fp32:-1,256") == TensorSpec("x", "FP32", (-1, 256))
    for bad in ("x:FP32", "x:FLOAT:-1,3", "x:FP32:-1,a", "x:FP32:", "x:FP32:-1,0", "x:BYTES:-1"):
        with pytest.raises(ExportError):
            TensorSpec.parse(bad)
    specs = [TensorSpec.parse("ids:INT64:-1,-1"), TensorSpec.parse("mask:INT64:-1,-1")]
    assert parse_axis_names([], specs) == {("ids", 0): "batch", ("ids", 1): "dim1", ("mask", 0): "batch", ("mask", 1): "dim1"}
    named = parse_axis_names(["1=seq", "mask:1=mseq"], specs)
    assert named[("ids", 1)] == "seq" and named[("mask", 1)] == "mseq"
    with pytest.raises(ExportError, match="batch"):
        parse_axis_names(["0=rows"], specs)
    with pytest.raises(ExportError, match="not dynamic"):
        parse_axis_names(["2=x"], specs)


def test_fp16_conversion_unit() -> None:
    from onnx import TensorProto, helper, numpy_helper

    from export.fp16 import convert_to_fp16

    w = numpy_helper.from_array(np.full((2, 2), 1e9, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Mul", ["xw", "mf"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("m", TensorProto.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [w],
    )
    model = convert_to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert model.graph.input[1].type.tensor_type.elem_type == TensorProto.INT64
    assert model.graph.node[0].attribute[0].i == TensorProto.FLOAT16
    assert np.isfinite(numpy_helper.to_array(model.graph.initializer[0])).all()  # clipped, not inf


def test_config_text_round_trips() -> None:
    from export.repo_io import config_text

    text = config_text("m", [("ids", "INT64", [-1, -1])], [("y", "FP32", [-1, 4])], max_batch_size=16,
                       preferred_batch_size=[8])
    config = to_model_config(parse_config_text(text), "onnxruntime_onnx")
    assert config.max_batch_size == 16 and config.inputs[0].dims == (-1,) and config.outputs[0].dims == (4,)
    assert config.dynamic_batching.preferred_batch_size == (8,)


def test_atomic_install_failure_leaves_nothing(tmp_path: Path) -> None:
    from export.repo_io import staged_model

    repo = tmp_path / "repo"
    with pytest.raises(RuntimeError):
        with staged_model(repo, "m") as stage:
            (stage / "1").mkdir()
            (stage / "1" / "model.onnx").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(repo.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_tensorrt_profile_plan() -> None:
    """The TensorRT profile planning is pure Python: checked here, without a GPU."""
    from export.compiler import parse_dim_ranges, trt_profiles
    from export.spec import ExportError

    inputs = [("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"])]
    profiles = trt_profiles(inputs, 64, [16], parse_dim_ranges(["sequence=1:64:128"]))
    assert profiles[0]["input_ids"] == ((1, 1), (1, 64), (8, 128))
    assert profiles[1]["attention_mask"] == ((1, 1), (16, 64), (64, 128))
    (only,) = trt_profiles([("x", ["batch", 256])], 4, [], {})
    assert only["x"] == ((1, 256), (4, 256), (4, 256))
    with pytest.raises(ExportError, match="match no dynamic axis"):
        trt_profiles([("x", ["batch", 256])], 4, [], parse_dim_ranges(["seq=1:2:3"]))
    with pytest.raises(ExportError):
        parse_dim_ranges(["seq=4:2:3"])


def test_export_state_dict(tmp_path: Path) -> None:
    """--state-dict weights (torch.load weights_only=True) replace the factory's; parity runs on them."""
    import onnxruntime as ort

    from export.zoo import build_mlp

    trained = build_mlp(seed=5)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    repo = tmp_path / "repo"
    assert CASES["mlp"].export(repo, "--state-dict", str(tmp_path / "w.pt"), "--parity-batch-sizes", "3") == 0
    x = np.random.default_rng(1).standard_normal((3, 256), dtype=np.float32)
    (y,) = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx")).run(["y"], {"x": x})
    np.testing.assert_allclose(y, trained(torch.from_numpy(x)).detach().numpy(), atol=1e-5, rtol=1e-4)
    assert json.loads((repo / "mlp" / "1" / "export.json").read_text())["state_dict"] == str(tmp_path / "w.pt")
    torch.save({"fc1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    assert CASES["mlp"].export(tmp_path / "repo2", "--state-dict", str(tmp_path / "bad.pt")) == 1
    assert not (tmp_path / "repo2" / "mlp").exists()
