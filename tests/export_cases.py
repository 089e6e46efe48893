"""Shared by the export / AOTI / GPU tests: zoo models to export, and a served-parity check.

Parity here is end to end: random inputs go through tritonclient -> the real kiln
server -> the runtime, and come back compared with eager PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

torch = __import__("pytest").importorskip("torch")
import tritonclient.grpc as triton  # noqa: E402

from server.cli import main as kiln  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # kiln export arguments after --name/--model-repository
    outputs: tuple[str, ...]
    batch_sizes: tuple[int, ...] = (1, 7, 64)
    lengths: tuple[int | None, ...] = (None,)
    extra: dict = field(default_factory=dict)

    def export(self, repo: Path, *more: str) -> int:
        return kiln(["export", *self.argv, "--name", self.name, "--model-repository", str(repo), *more])


CASES = {
    "mlp": Case("mlp", ("export.zoo.mlp:build_mlp", "--input", "x:FP32:-1,256", "--output", "y"), ("y",)),
    "digits": Case(
        "digits", ("export.zoo.digits_cnn:build_digits_cnn", "--input", "image:FP32:-1,1,8,8", "--output", "logits"),
        ("logits",),
    ),
    "transformer": Case(
        "transformer",
        ("export.zoo.transformer:build_transformer", "--input", "input_ids:INT64:-1,-1",
         "--input", "attention_mask:INT64:-1,-1", "--output", "logits", "--output", "hidden",
         "--dynamic-axis-names", "1=sequence", "--value-range", "input_ids:0:1000",
         "--parity-batch-sizes", "1", "7", "64", "--parity-lengths", "1", "9", "33"),
        ("logits", "hidden"),
        batch_sizes=(1, 7, 64),
        lengths=(1, 9, 33),
    ),
}


def build_reference(name: str):
    from export.zoo import build_digits_cnn, build_mlp, build_transformer

    return {"mlp": build_mlp, "digits": build_digits_cnn, "transformer": build_transformer}[name]().eval()


def random_feeds(name: str, batch: int, length: int | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if name == "mlp":
        return {"x": rng.standard_normal((batch, 256), dtype=np.float32)}
    if name == "digits":
        return {"image": rng.random((batch, 1, 8, 8), dtype=np.float32)}
    ids = rng.integers(0, 1000, (batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    if length and length > 2:  # padding at the end of some rows
        mask[::2, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def served_infer(client, model: str, feeds: dict[str, np.ndarray], outputs) -> dict[str, np.ndarray]:
    inputs = []
    for k, v in feeds.items():
        inp = triton.InferInput(k, list(v.shape), triton.np_to_triton_dtype(v.dtype))
        inp.set_data_from_numpy(v)
        inputs.append(inp)
    res = client.infer(model, inputs, outputs=[triton.InferRequestedOutput(o) for o in outputs])
    return {o: res.as_numpy(o) for o in outputs}


def check_served_parity(url: str, case: Case, model: str, *, atol: float = 1e-4, rtol: float = 1e-3,
                        fp16: bool = False) -> list[tuple]:
    """Serve random batches of every size (and length) through the server; compare with eager torch."""
    module = build_reference(case.name)
    client = triton.InferenceServerClient(url)
    assert client.is_model_ready(model), f"{model} is not ready"
    rng = np.random.default_rng(123)
    seen = []
    for batch in case.batch_sizes:
        for length in case.lengths:
            feeds = random_feeds(case.name, batch, length, rng)
            with torch.inference_mode():
                ref = module(*(torch.from_numpy(v) for v in feeds.values()))
            refs = ref if isinstance(ref, tuple) else (ref,)
            sent = {k: (v.astype(np.float16) if fp16 and v.dtype == np.float32 else v) for k, v in feeds.items()}
            got = served_infer(client, model, sent, case.outputs)
            for name, r in zip(case.outputs, refs):
                g = got[name]
                assert g.shape == tuple(r.shape), f"{model} {name} batch {batch} len {length}: {g.shape} vs {tuple(r.shape)}"
                np.testing.assert_allclose(g.astype(np.float32), r.numpy(), atol=atol, rtol=rtol,
                                           err_msg=f"{model} {name} batch={batch} length={length}")
                seen.append((batch, length, name))
    return seen
