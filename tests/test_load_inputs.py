"""loadtests/inputs.py: the requests `kiln bench` and the locust user send, from a model's metadata."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.inputs import make_arrays, make_requests, request_rows
from server.protocol import grpc_service_pb2 as pb


def metadata(*inputs: tuple[str, str, list[int]]) -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse(name="m", versions=["1"], platform="onnxruntime_onnx")
    for name, datatype, shape in inputs:
        meta.inputs.add(name=name, datatype=datatype, shape=shape)
    return meta


TWO_INPUTS = metadata(("ids", "INT64", [-1, 8]), ("mask", "FP32", [-1, 8]))


def test_random_inputs_take_the_batch_size_and_declared_dims():
    arrays = make_arrays(TWO_INPUTS, 5, np.random.default_rng(0))
    assert {name: (a.dtype, a.shape) for name, a in arrays.items()} == {
        "ids": (np.dtype(np.int64), (5, 8)), "mask": (np.dtype(np.float32), (5, 8))
    }


def test_a_files_rows_set_the_batch_of_the_random_inputs_and_its_dtype_is_the_models(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(24, dtype=np.int32).reshape(3, 8))
    arrays = make_arrays(TWO_INPUTS, 1, np.random.default_rng(0), files={"ids": tmp_path / "ids.npy"})
    assert list(arrays) == ["ids", "mask"]  # the model's order
    assert arrays["ids"].dtype == np.int64 and arrays["ids"][2, 7] == 23
    assert arrays["mask"].shape == (3, 8)
    [request] = make_requests(TWO_INPUTS, 1, files={"ids": tmp_path / "ids.npy", "mask": tmp_path / "ids.npy"})
    assert request_rows(TWO_INPUTS, request) == 3


def test_files_that_disagree_on_rows_and_unknown_inputs_are_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 8), np.int64))
    np.save(tmp_path / "b.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        make_arrays(TWO_INPUTS, 1, np.random.default_rng(0), files={"ids": tmp_path / "a.npy", "mask": tmp_path / "b.npy"})
    with pytest.raises(ValueError, match=r"no input\(s\) \['nope'\]"):
        make_arrays(TWO_INPUTS, 1, np.random.default_rng(0), files={"nope": tmp_path / "a.npy"})


def test_request_rows_is_one_for_a_model_without_a_batch_dim():
    fixed = metadata(("x", "FP32", [4, 8]))
    [request] = make_requests(fixed, 7, variants=1)
    assert list(request.inputs[0].shape) == [4, 8]
    assert request_rows(fixed, request) == 1
    [request] = make_requests(TWO_INPUTS, 7, variants=1)
    assert request_rows(TWO_INPUTS, request) == 7
