"""Regenerate the example model zoo into a model repository, through `kiln export`.

    python -m export.make_zoo --model-repository DIR [--only NAME ...] [--aoti] [--list]

Every model goes through the same path a user's model does (`kiln export`:
torch.export -> ONNX -> checker -> parity vs PyTorch -> atomic install), so this
is also the zoo's parity proof. With --aoti, each is also compiled with
`kiln compile --target aoti` (tens of seconds per model).

The big ones (resnet18 ~47 MB, resnet50 ~100 MB, mlp_wide ~100 MB) are not
committed; the bundled repository (mlp, digits) is built by export.make_bundled.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ZooModel:
    name: str
    factory: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    extra: tuple[str, ...] = field(default=())
    note: str = ""

    def export_argv(self, repo: str) -> list[str]:
        argv = ["export", self.factory, "--name", self.name, "--model-repository", repo]
        for i in self.inputs:
            argv += ["--input", i]
        for o in self.outputs:
            argv += ["--output", o]
        return argv + list(self.extra)


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("mlp", "export.zoo.mlp:build_mlp", ("x:FP32:-1,256",), ("y",), note="256 -> 128 -> 10"),
        ZooModel("digits_cnn", "export.zoo.digits_cnn:build_digits_cnn", ("image:FP32:-1,1,8,8",), ("logits",),
                 note="untrained digits CNN (the trained one is `digits`, from make_bundled)"),
        ZooModel("transformer", "export.zoo.transformer:build_transformer",
                 ("input_ids:INT64:-1,-1", "attention_mask:INT64:-1,-1"), ("logits", "hidden"),
                 ("--dynamic-axis-names", "1=sequence", "--value-range", "input_ids:0:1000",
                  "--value-range", "attention_mask:0:2", "--parity-lengths", "1", "7", "32", "128"),
                 note="2-layer encoder, dynamic sequence length 1..128"),
        ZooModel("resnet18", "export.zoo.resnet:build_resnet18", ("image:FP32:-1,3,224,224",), ("logits",),
                 ("--max-batch-size", "32"), note="ResNet-18 layout, 11.7M params, not committed"),
        ZooModel("resnet50", "export.zoo.resnet:build_resnet50", ("image:FP32:-1,3,224,224",), ("logits",),
                 ("--max-batch-size", "32"), note="ResNet-50 layout, 25.6M params, not committed"),
        ZooModel("mlp_wide", "export.zoo.mlp_wide:build_mlp_wide", ("x:FP32:-1,1024",), ("y",),
                 note="1024 -> 4096 -> 4096 -> 1024, ~100 MB, not committed"),
    )
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.make_zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-repository", default="zoo_repo", help="repository dir (default: zoo_repo)")
    ap.add_argument("--only", nargs="+", choices=sorted(ZOO), metavar="NAME", help=f"subset of: {', '.join(ZOO)}")
    ap.add_argument("--aoti", action="store_true", help="also compile each with kiln compile --target aoti")
    ap.add_argument("--list", action="store_true", help="list the zoo and exit")
    args = ap.parse_args(argv)
    if args.list:
        for m in ZOO.values():
            print(f"{m.name:12s} {m.factory:45s} {m.note}")
        return 0

    from server.cli import main as kiln

    t0 = time.perf_counter()
    failed = []
    for name in args.only or list(ZOO):
        model = ZOO[name]
        print(f"[make_zoo] === {name}: {model.note}", flush=True)
        if kiln(model.export_argv(args.model_repository)) != 0:
            failed.append(name)
            continue
        if args.aoti and kiln(["compile", name, "--target", "aoti", "--model-repository", args.model_repository]) != 0:
            failed.append(f"{name}_aoti")
    print(f"[make_zoo] finished in {time.perf_counter() - t0:.1f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
