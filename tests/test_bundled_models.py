"""The bundled model repository: each model.onnx loads in onnxruntime with the contract's names,
dtypes and a dynamic batch dim, and the digits model is accurate on the held-out split.

No torch here: these run with the serving dependencies plus scikit-learn (for the digits data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parent.parent / "model_repo"

# name -> (input name, input dims without batch, output name, output dims without batch)
BUNDLED = {
    "mlp": ("x", [256], "y", [10]),
    "digits": ("image", [1, 8, 8], "logits", [10]),
}


def _session(name: str) -> "ort.InferenceSession":
    path = REPO / name / "1" / "model.onnx"
    assert path.is_file(), f"missing {path}; run `python -m export.make_bundled`"
    assert not list(path.parent.glob("*.data")), "model.onnx must be self-contained (no external data)"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_model_io(name: str) -> None:
    in_name, in_dims, out_name, out_dims = BUNDLED[name]
    sess = _session(name)
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert inp.name == in_name and out.name == out_name
    assert inp.type == "tensor(float)" and out.type == "tensor(float)"
    # Dynamic batch dim: onnxruntime reports a symbolic dim as its name (a str).
    assert isinstance(inp.shape[0], str) and inp.shape[0] == "batch", inp.shape
    assert isinstance(out.shape[0], str), out.shape
    assert list(inp.shape[1:]) == in_dims and list(out.shape[1:]) == out_dims

    rng = np.random.default_rng(0)
    for batch in (1, 5, 64):
        x = rng.random((batch, *in_dims), dtype=np.float32)
        (y,) = sess.run([out_name], {in_name: x})
        assert y.shape == (batch, *out_dims) and y.dtype == np.float32
        assert np.isfinite(y).all()
        # Rows are independent: the first row does not depend on what it is batched with.
        (y1,) = sess.run([out_name], {in_name: x[:1]})
        np.testing.assert_allclose(y[:1], y1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_config_present(name: str) -> None:
    text = (REPO / name / "config.pbtxt").read_text()
    assert f'name: "{name}"' in text
    assert 'platform: "onnxruntime_onnx"' in text
    assert "max_batch_size: 64" in text


def test_digits_heldout_accuracy() -> None:
    pytest.importorskip("sklearn")
    from export.digits_data import load_digits_split

    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_test.dtype == np.float32 and x_test.shape[1:] == (1, 8, 8)
    assert 0.0 <= x_test.min() and x_test.max() <= 1.0
    assert len(x_test) == 450 and len(x_train) + len(x_test) == 1797

    sess = _session("digits")
    (logits,) = sess.run(["logits"], {"image": x_test})
    accuracy = float(np.mean(logits.argmax(axis=1) == y_test))
    assert accuracy >= 0.95, f"digits held-out accuracy {accuracy:.4f} < 0.95"
