"""The bundled digits model served by kiln and asked through tritonclient: on the held-out split it
predicts exactly what onnxruntime predicts in-process, and is accurate.

No torch here: the data comes from export.digits_data (scikit-learn only).
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton

from export.digits_data import load_digits_split

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

BATCH = 64  # the bundled config's max_batch_size


def test_digits_served_accuracy_matches_onnxruntime(start_server, bundled_repo):
    _, _, x_test, y_test = load_digits_split()
    assert x_test.shape[1:] == (1, 8, 8) and x_test.dtype == np.float32
    assert len(x_test) > BATCH  # several batches, the last one partial

    server = start_server(bundled_repo)
    served_logits = []
    with triton.InferenceServerClient(server.url) as client:
        assert client.is_model_ready("digits")
        for start in range(0, len(x_test), BATCH):
            batch = x_test[start:start + BATCH]
            image = triton.InferInput("image", list(batch.shape), "FP32")
            image.set_data_from_numpy(batch)
            result = client.infer("digits", [image], outputs=[triton.InferRequestedOutput("logits")])
            logits = result.as_numpy("logits")
            assert logits.shape == (len(batch), 10) and logits.dtype == np.float32
            served_logits.append(logits)
    served_logits = np.concatenate(served_logits)
    served = served_logits.argmax(axis=1)

    model_file = bundled_repo / "digits" / "1" / "model.onnx"
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    (local_logits,) = session.run(["logits"], {"image": x_test})
    local = local_logits.argmax(axis=1)

    np.testing.assert_allclose(served_logits, local_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(served, local)
    served_accuracy = float((served == y_test).mean())
    local_accuracy = float((local == y_test).mean())
    assert served_accuracy == local_accuracy
    assert served_accuracy >= 0.95, served_accuracy
