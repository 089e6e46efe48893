"""MLServer custom runtime: one onnxruntime session, inputs merged by MLServer's adaptive batching.

Used by loadtests/peers/serve_mlserver.py, which writes settings.json and model-settings.json
(max_batch_size / max_batch_time turn adaptive batching on) and runs `mlserver start`.
Runs inside loadtests/peers/.venvs/mlserver (MLServer 1.7), not in kiln's venv.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        options = ort.SessionOptions()
        extra = (params.extra or {}) if params else {}
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 1))
        self._session = ort.InferenceSession(params.uri, sess_options=options, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for request_input in payload.inputs:
            array = NumpyCodec.decode_input(request_input)
            feeds[request_input.name] = np.ascontiguousarray(array, dtype=np.float32)
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results)],
        )
