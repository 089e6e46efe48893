"""The bundled repository served and answered through tritonclient, the client Triton users already run."""

import numpy as np
import tritonclient.grpc as triton


def test_bundled_mlp_round_trip(start_server, bundled_repo):
    server = start_server(bundled_repo)
    client = triton.InferenceServerClient(server.url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    inp = triton.InferInput("x", [3, 256], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp])
    y = result.as_numpy("y")
    assert y.shape == (3, 10)
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundled_repo / "mlp" / "1" / "model.onnx"))
    np.testing.assert_allclose(y, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
