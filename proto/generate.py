"""Regenerate the Python protocol modules in server/protocol/ from proto/*.proto.

    python proto/generate.py          # write server/protocol/*
    python proto/generate.py --check  # exit 1 (listing stale files) if out of date

Uses grpc_tools.protoc with its bundled well-known protos, then post-processes
the output:

* the generated top-level imports (``import model_config_pb2 as ...``) become
  package-relative ones, so ``from server.protocol import grpc_service_pb2``
  works;
* the descriptors go into a private pool (``server/protocol/_pool.py``) instead
  of protobuf's process-wide default pool. tritonclient registers the very same
  file names (``model_config.proto``, ``grpc_service.proto``) and message names
  (``inference.*``) in the default pool, and protobuf refuses to load both, so
  without this kiln and tritonclient could not be imported in one process.
  Full names are unchanged, so the wire format is unaffected.

Output depends only on the .proto files and the grpcio-tools version.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
OUT_DIR = ROOT / "server" / "protocol"

PROTOS = ("model_config.proto", "grpc_service.proto")
INIT_TEXT = '"""Generated from proto/ by proto/generate.py; do not edit."""\n'
POOL_TEXT = '''"""Private descriptor pool for the generated modules (written by proto/generate.py; do not edit).

Keeps the ``inference.*`` types out of protobuf's default pool, where
tritonclient registers the same file and message names.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''
EXTRA_FILES = {"__init__.py": INIT_TEXT, "_pool.py": POOL_TEXT}

_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_POOL_IMPORT = "from google.protobuf import descriptor_pool as _descriptor_pool\n"

# `import model_config_pb2 as model__config__pb2` -> `from . import model_config_pb2 as ...`
_ABS_IMPORT = re.compile(r"^import (\w+_pb2(?:_grpc)?)( as \w+)?$", re.MULTILINE)


def _local_modules() -> set[str]:
    names = set()
    for proto in PROTOS:
        stem = Path(proto).stem
        names.update({f"{stem}_pb2", f"{stem}_pb2_grpc"})
    return names


def _relativize(text: str) -> str:
    local = _local_modules()

    def sub(m: re.Match) -> str:
        if m.group(1) not in local:
            return m.group(0)
        return f"from . import {m.group(1)}{m.group(2) or ''}"

    return _ABS_IMPORT.sub(sub, text)


def generate(dest: Path) -> list[Path]:
    """Run protoc into ``dest``; return the written files (relative to dest)."""
    from grpc_tools import protoc  # imported lazily: only needed to generate

    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={dest}",
        f"--pyi_out={dest}",
        f"--grpc_python_out={dest}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")

    # protoc emits an (empty) grpc module for every proto; keep only real ones.
    for stub in dest.glob("*_pb2_grpc.py"):
        if "class " not in stub.read_text():
            stub.unlink()

    written = []
    for path in sorted(dest.iterdir()):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = _relativize(path.read_text())
        if path.name.endswith("_pb2.py"):
            text = _use_private_pool(text, path.name)
        text = text.rstrip("\n") + "\n"
        path.write_text(text)
        written.append(path.relative_to(dest))
    for name, content in EXTRA_FILES.items():
        (dest / name).write_text(content)
        written.append(Path(name))
    return sorted(written)


def _use_private_pool(text: str, name: str) -> str:
    if text.count(_DEFAULT_POOL) != 1 or text.count(_POOL_IMPORT) != 1:
        raise SystemExit(f"{name}: unexpected protoc output; cannot switch it to the private pool")
    text = text.replace(_POOL_IMPORT, _POOL_IMPORT + "from . import _pool\n")
    return text.replace(_DEFAULT_POOL, "_pool.POOL.AddSerializedFile(")


def _managed(directory: Path) -> set[Path]:
    """Files in ``directory`` that this script owns."""
    if not directory.is_dir():
        return set()
    return {
        p.relative_to(directory)
        for p in directory.iterdir()
        if p.is_file() and (p.name in EXTRA_FILES or re.search(r"_pb2(_grpc)?\.pyi?$", p.name))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify server/protocol/ is up to date")
    opts = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kiln-proto-") as tmp:
        tmp_dir = Path(tmp)
        fresh = set(generate(tmp_dir))

        if opts.check:
            stale = []
            for rel in sorted(fresh | _managed(OUT_DIR)):
                new, old = tmp_dir / rel, OUT_DIR / rel
                if not new.exists():
                    stale.append(f"{rel} (not generated any more)")
                elif not old.exists():
                    stale.append(f"{rel} (missing)")
                elif new.read_bytes() != old.read_bytes():
                    stale.append(f"{rel} (differs)")
            if stale:
                print("server/protocol/ is stale; run `python proto/generate.py`:", file=sys.stderr)
                for line in stale:
                    print(f"  server/protocol/{line}", file=sys.stderr)
                return 1
            print("server/protocol/ is up to date")
            return 0

        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for rel in _managed(OUT_DIR) - fresh:
            (OUT_DIR / rel).unlink()
        for rel in sorted(fresh):
            (OUT_DIR / rel).write_bytes((tmp_dir / rel).read_bytes())
            print(f"wrote server/protocol/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
