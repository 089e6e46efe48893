"""Writing into a model repository: config.pbtxt text, and atomic installation of a built model.

A model is built in a temp dir beside the repository (same filesystem, outside
it, so a polling server never sees it), then renamed into place. On failure the
temp dir is removed and the repository is exactly as before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from server.datatypes import datatype_to_config_type

DEFAULT_QUEUE_DELAY_US = 500


def config_text(
    name: str,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    *,
    max_batch_size: int,
    platform: str | None = "onnxruntime_onnx",
    backend: str | None = None,
    instance_kind: str | None = None,
    preferred_batch_size: Sequence[int] = (),
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    parameters: dict[str, str] | None = None,
) -> str:
    """config.pbtxt for a model; tensors are (name, v2 datatype, full shape incl. batch dim)."""
    skip = 1 if max_batch_size > 0 else 0

    def tensors(items) -> str:
        rows = []
        for tname, datatype, shape in items:
            dims = ", ".join(str(d) for d in list(shape)[skip:]) or "1"
            rows.append(f'  {{ name: "{tname}" data_type: {datatype_to_config_type(datatype)} dims: [ {dims} ] }}')
        return ",\n".join(rows)

    lines = [f'name: "{name}"']
    if platform:
        lines.append(f'platform: "{platform}"')
    if backend:
        lines.append(f'backend: "{backend}"')
    lines.append(f"max_batch_size: {max_batch_size}")
    lines.append("input [\n" + tensors(inputs) + "\n]")
    lines.append("output [\n" + tensors(outputs) + "\n]")
    if max_batch_size > 0:
        pref = f"preferred_batch_size: [ {', '.join(map(str, preferred_batch_size))} ] " if preferred_batch_size else ""
        lines.append(f"dynamic_batching {{ {pref}max_queue_delay_microseconds: {queue_delay_us} }}")
    if instance_kind:
        lines.append(f"instance_group [ {{ count: 1 kind: {instance_kind} }} ]")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


@contextmanager
def staged_model(repo: Path, name: str) -> Iterator[Path]:
    """Yield an empty staging dir for ``repo/name``; the caller fills it (config.pbtxt, <version>/...).

    Leaving the block normally installs it; an exception removes it and leaves the repository untouched.
    """
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.staging.", dir=repo.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a model dir should look like any other
    try:
        yield tmp
        install(tmp, repo / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(staged: Path, final: Path) -> None:
    """Move the staged model into place.

    A new model: one rename of the whole dir. An existing one: each staged version dir
    replaces its namesake (renamed aside, then removed) and config.pbtxt is replaced with
    os.replace; other versions already there are kept.
    """
    if not final.exists():
        staged.rename(final)
        return
    for child in sorted(staged.iterdir()):
        if child.is_dir():
            target = final / child.name
            if target.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.resolve().parent.parent))
                aside.rmdir()
                target.rename(aside)
                child.rename(target)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                child.rename(target)
    for child in staged.iterdir():
        if child.is_file():
            os.replace(child, final / child.name)
