"""The model repository: scan, versions, load/unload/reload, and the control modes.

A model that fails to load is recorded with its reason and never stops the
server. Requests hold a reference to the version they were routed to, so a
reload swaps the serving map at once and lets the old version drain.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from server.batching import Scheduler
from server.config import (
    CONFIG_FILENAME,
    MODEL_FILENAMES,
    ConfigError,
    check_against_model,
    complete_config,
    read_config_file,
    resolve_platform,
    to_model_config,
)
from server.datatypes import NUMPY_DTYPES
from server.errors import KilnError, Status, not_found, unavailable
from server.model_types import ModelConfig, dims_match
from server.protocol import model_config_pb2 as mc
from server.runtime import Runtime, RuntimeLoadError, create_runtime
from server.stats import ModelStats

log = logging.getLogger("kiln.repository")

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,18}$")


class ControlMode(enum.Enum):
    NONE = "none"
    EXPLICIT = "explicit"
    POLL = "poll"


class ModelState(enum.Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelVersion:
    """One loaded, servable version: config, runtime, scheduler and statistics."""

    name: str
    version: int
    config: ModelConfig
    config_proto: mc.ModelConfig
    runtime: Runtime
    scheduler: Scheduler
    stats: ModelStats
    state: ModelState = ModelState.READY
    bytes_as_text: bool = False  # the runtime holds BYTES as UTF-8 text (Runtime.bytes_as_text)

    def __post_init__(self) -> None:
        self.bytes_as_text = getattr(self.runtime, "bytes_as_text", False)

    @property
    def version_str(self) -> str:
        return str(self.version)

    async def close(self, drain_timeout_s: float) -> None:
        self.state = ModelState.UNLOADING
        try:
            await self.scheduler.close(drain_timeout_s)
        finally:
            await asyncio.to_thread(self.runtime.close)
            self.state = ModelState.UNAVAILABLE


@dataclass
class ModelEntry:
    """What the repository knows of one model directory."""

    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    fingerprint: tuple = ()

    def latest_ready(self) -> ModelVersion | None:
        if len(self.versions) == 1:  # the usual case, on every request: no list to build
            (only,) = self.versions.values()
            return only if only.state is ModelState.READY else None
        ready = [v for v in self.versions.values() if v.state is ModelState.READY]
        return max(ready, key=lambda v: v.version) if ready else None


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


def validate_model_name(name: str) -> None:
    """Reject names that could reach outside the repository (path separators, '..', ...)."""
    if not MODEL_NAME_PATTERN.match(name) or name in (".", ".."):
        raise not_found(f"model name '{name}' is not valid: letters, digits, '_', '.', '-' only")


def parse_version(name: str, version: str) -> int | None:
    """'' means the latest ready version (None); otherwise a positive integer."""
    if version == "":
        return None
    if not VERSION_PATTERN.match(version):
        raise not_found(f"model '{name}' has no version '{version}': versions are positive integers")
    return int(version)


class ModelRepository:
    def __init__(
        self,
        root: Path,
        control_mode: ControlMode = ControlMode.NONE,
        startup_models: tuple[str, ...] = (),
        poll_interval_s: float = 15.0,
        drain_timeout_s: float = 30.0,
    ) -> None:
        self.root = Path(root).resolve()
        self.control_mode = control_mode
        self.startup_models = startup_models
        self.poll_interval_s = poll_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.models: dict[str, ModelEntry] = {}
        self.expected_at_start: tuple[str, ...] = ()
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self._poll_task: asyncio.Task | None = None
        self.listeners: list[Callable[[str], None]] = []

    # ---- discovery -------------------------------------------------------------------------

    def scan(self) -> list[str]:
        """Names of model directories in the repository."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME_PATTERN.match(p.name)
        )

    def _fingerprint(self, name: str) -> tuple:
        """What a poll compares: every file's path, size and mtime under the model directory."""
        model_dir = self.root / name
        entries = []
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                stat = path.stat()
                entries.append((str(path.relative_to(model_dir)), stat.st_size, stat.st_mtime_ns))
        return tuple(entries)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.control_mode is ControlMode.EXPLICIT:
            names = list(self.startup_models)
        else:
            names = self.scan()
        self.expected_at_start = tuple(names)
        for name in self.scan():
            self.models.setdefault(name, ModelEntry(name=name, reason="not loaded"))
        await asyncio.gather(*(self._load_logged(name) for name in names))
        if self.control_mode is ControlMode.POLL:
            self._poll_task = asyncio.create_task(self._poll_loop(), name="repository-poll")

    async def _load_logged(self, name: str) -> None:
        try:
            await self.load(name)
        except KilnError as exc:
            log.error("model '%s' failed to load: %s", name, exc.message)

    async def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
        names = list(self.models)
        await asyncio.gather(*(self.unload(name) for name in names), return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)

    def is_startup_ready(self) -> bool:
        return all(
            self.models.get(n) is not None and self.models[n].latest_ready() is not None
            for n in self.expected_at_start
        )

    # ---- lookup ------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version a request goes to; NOT_FOUND or UNAVAILABLE otherwise."""
        entry = self.models.get(name)
        if entry is None:
            validate_model_name(name)
            raise not_found(f"unknown model '{name}'")
        number = parse_version(name, version)
        if number is None:
            found = entry.latest_ready()
            if found is None:
                reason = f": {entry.reason}" if entry.reason else ""
                raise unavailable(f"model '{name}' is not ready ({entry.state.value.lower()}){reason}")
            return found
        found = entry.versions.get(number)
        if found is None:
            if entry.versions or entry.state is ModelState.READY:
                raise not_found(f"model '{name}' has no version {number}")
            raise unavailable(f"model '{name}' is not ready ({entry.state.value.lower()})")
        if found.state is not ModelState.READY:
            raise unavailable(f"model '{name}' version {number} is not ready ({found.state.value.lower()})")
        return found

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        known = set(self.models) | set(self.scan())
        rows: list[IndexEntry] = []
        for name in sorted(known):
            entry = self.models.get(name)
            if entry is None or not entry.versions:
                if not ready_only:
                    state = entry.state.value if entry else ModelState.UNAVAILABLE.value
                    rows.append(IndexEntry(name, "", state, entry.reason if entry else "not loaded"))
                continue
            for number in sorted(entry.versions):
                version = entry.versions[number]
                if ready_only and version.state is not ModelState.READY:
                    continue
                # a failed reload leaves the old versions serving; say why the new one is not
                rows.append(IndexEntry(name, str(number), version.state.value, entry.reason))
        return rows

    # ---- load / unload -----------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> None:
        """Load (or reload) every version the policy selects; the old versions drain in the background."""
        validate_model_name(name)
        if name not in self.models and not (self.root / name).is_dir():
            # an unknown name must leave no entry (or lock) behind: it stays NOT_FOUND everywhere
            raise not_found(f"model '{name}' is not in the repository")
        async with self._lock(name):
            entry = self.models.setdefault(name, ModelEntry(name=name))
            model_dir = self.root / name
            if not model_dir.is_dir():
                entry.state, entry.reason = ModelState.UNAVAILABLE, "no such model directory"
                raise not_found(f"model '{name}' is not in the repository")
            fingerprint = self._fingerprint(name)
            previous_state = entry.state
            entry.state = ModelState.LOADING
            self._notify(name)
            try:
                versions = await self._load_versions(name, model_dir)
            except (ConfigError, RuntimeLoadError, OSError) as exc:
                entry.fingerprint = fingerprint
                entry.reason = f"reload failed, previous versions still serve: {exc}" if entry.versions else str(exc)
                entry.state = previous_state if entry.versions else ModelState.UNAVAILABLE
                self._notify(name)
                raise unavailable(f"model '{name}' failed to load: {exc}") from exc
            old = entry.versions
            entry.versions = versions
            entry.fingerprint = fingerprint
            entry.state, entry.reason = ModelState.READY, ""
            log.info("model '%s' loaded, versions %s", name, sorted(versions))
            self._notify(name)
            self._drain_in_background(old.values())

    async def unload(self, name: str) -> None:
        validate_model_name(name)
        async with self._lock(name):
            entry = self.models.get(name)
            if entry is None:
                raise not_found(f"unknown model '{name}'")
            old = entry.versions
            entry.versions = {}
            entry.state, entry.reason = ModelState.UNAVAILABLE, "unloaded"
            self._notify(name)
            await asyncio.gather(*(v.close(self.drain_timeout_s) for v in old.values()))
            log.info("model '%s' unloaded", name)

    def _drain_in_background(self, versions) -> None:
        for version in versions:
            task = asyncio.create_task(version.close(self.drain_timeout_s))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _notify(self, name: str) -> None:
        for listener in self.listeners:
            listener(name)

    async def _load_versions(self, name: str, model_dir: Path) -> dict[int, ModelVersion]:
        config_path = model_dir / CONFIG_FILENAME
        if config_path.is_file():
            proto = read_config_file(config_path)
        else:
            proto = mc.ModelConfig()
        if proto.name and proto.name != name:
            raise ConfigError(f"config name '{proto.name}' does not match the directory name '{name}'")
        proto.name = name
        on_disk = sorted(
            int(p.name) for p in model_dir.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)
        )
        files = [f.name for v in on_disk for f in (model_dir / str(v)).iterdir()]
        platform = resolve_platform(proto, files)
        loading_config = to_model_config_for_loading(proto, platform)
        selected = loading_config.version_policy.select(on_disk)
        if not selected:
            raise ConfigError(f"no version directory matches the version policy (found {on_disk or 'none'})")
        filename = model_filename(proto, platform)
        check_model_filename(filename, platform)
        loaded: dict[int, ModelVersion] = {}
        try:
            for number in sorted(selected, reverse=True):
                model_file = model_dir / str(number) / filename
                if not model_file.is_file():
                    raise ConfigError(f"version {number} has no {filename}")
                runtime = await asyncio.to_thread(create_runtime, model_file, loading_config)
                try:
                    if not proto.input or not proto.output:
                        complete_config(proto, platform, runtime.inputs, runtime.outputs)
                    config = to_model_config(proto, platform)
                    check_against_model(config, runtime.inputs, runtime.outputs)
                    await asyncio.to_thread(warm_up, runtime, config, proto)
                except BaseException:
                    runtime.close()
                    raise
                loaded[number] = self._make_version(name, number, config, proto, runtime)
        except BaseException:
            for version in loaded.values():
                await version.close(0)
            raise
        return loaded

    @staticmethod
    def _make_version(name, number, config: ModelConfig, proto, runtime: Runtime) -> ModelVersion:
        stats = ModelStats(name, str(number))
        output_names = config.output_names
        scheduler = Scheduler(
            name,
            max_batch_size=config.max_batch_size,
            batching=config.dynamic_batching,
            instance_count=config.instance_group.count,
            execute=lambda inputs: check_outputs(config, runtime.infer(inputs, output_names)),
            on_execution=stats.record_execution,
            # an execution timeout can only be enforced on an instance thread
            inline_max_us=0 if config.execution_timeout_microseconds else config.inline_execution_max_microseconds,
            execution_timeout_s=config.execution_timeout_microseconds / 1e6,
        )
        return ModelVersion(name, number, config, proto, runtime, scheduler, stats)

    # ---- poll mode ---------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a poll must never kill the loop
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """Load new models, reload changed ones, unload removed ones."""
        on_disk = set(self.scan())
        for name in sorted(on_disk):
            entry = self.models.get(name)
            if entry is None or entry.fingerprint != self._fingerprint(name):
                log.info("model '%s' %s on disk; loading", name, "appeared" if entry is None else "changed")
                await self._load_logged(name)
        for name in sorted(set(self.models) - on_disk):
            log.info("model '%s' removed from disk; unloading", name)
            await self.unload(name)
            self.models.pop(name, None)


def model_filename(proto: mc.ModelConfig, platform: str) -> str:
    """The file every version directory holds the model in: default_model_filename, else the platform's own name."""
    return proto.default_model_filename or MODEL_FILENAMES[platform]


def check_model_filename(filename: str, platform: str) -> None:
    """Only the platform's own model file type, inside its version directory, is ever opened:
    no path separators, no other extensions (a .pkl or .pt file is never loaded, nothing is unpickled)."""
    suffix = Path(MODEL_FILENAMES[platform]).suffix
    if filename != Path(filename).name or filename in (".", "..") or "\\" in filename:
        raise ConfigError(f"default_model_filename '{filename}' must be a file name, without a path")
    if Path(filename).suffix != suffix:
        raise ConfigError(
            f"default_model_filename '{filename}' is not a {platform} model file: expected a '{suffix}' file")


def to_model_config_for_loading(proto: mc.ModelConfig, platform: str) -> ModelConfig:
    """A typed config good enough to open the model file before inputs/outputs are known."""
    if proto.input and proto.output:
        return to_model_config(proto, platform)
    placeholder = mc.ModelConfig()
    placeholder.CopyFrom(proto)
    placeholder.input.add(name="_", data_type=mc.TYPE_FP32, dims=[1])
    placeholder.output.add(name="_", data_type=mc.TYPE_FP32, dims=[1])
    return to_model_config(placeholder, platform)


def warm_up(runtime: Runtime, config: ModelConfig, proto: mc.ModelConfig) -> None:
    """Run the config's model_warmup samples (zero or random data) before the version goes ready."""
    rng = np.random.default_rng(0)
    output_names = config.output_names
    for sample in proto.model_warmup:
        batch = max(sample.batch_size, 1)
        inputs = {}
        for input_name, spec in sample.inputs.items():
            dtype = NUMPY_DTYPES.get(
                "BYTES" if spec.data_type == mc.TYPE_STRING else mc.DataType.Name(spec.data_type)[5:]
            )
            if dtype is None:
                raise ConfigError(f"model_warmup '{sample.name}': unsupported data_type for '{input_name}'")
            shape = ((batch,) if config.batching else ()) + tuple(spec.dims)
            if spec.HasField("random_data") and dtype.kind in "fiub":
                inputs[input_name] = rng.random(shape).astype(dtype)
            elif dtype.kind == "O":
                inputs[input_name] = np.full(shape, b"", dtype=object)
            else:
                inputs[input_name] = np.zeros(shape, dtype=dtype)
        try:
            runtime.infer(inputs, output_names)
        except Exception as exc:
            raise ConfigError(f"model_warmup '{sample.name}' failed: {exc}") from exc


def check_outputs(config: ModelConfig, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch's outputs, once each batch: a runtime that returns a missing output, or one of another
    shape than the config declares, fails the batch INTERNAL naming the model (never a response that
    contradicts the metadata). The batcher checks the batch dimension itself."""
    skip = 1 if config.batching else 0
    for spec in config.outputs:
        array = outputs.get(spec.name)
        if array is None:
            raise KilnError(Status.INTERNAL, f"model '{config.name}' returned no output '{spec.name}'")
        shape = getattr(array, "shape", None)
        dims = spec.dims
        if shape is None or len(shape) != len(dims) + skip or not dims_match(dims, shape[skip:]):
            expected = ",".join(str(d) for d in ((-1,) * skip + dims))
            got = list(shape) if shape is not None else type(array).__name__
            raise KilnError(
                Status.INTERNAL, f"model '{config.name}' returned output '{spec.name}' of shape {got}, expected [{expected}]"
            )
    return outputs
