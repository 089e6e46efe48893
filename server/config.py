"""config.pbtxt: parse (Triton's text format), warn about what kiln ignores, validate, auto-complete.

The protobuf message stays the source of truth for the ModelConfig RPC; the
typed ModelConfig of model_types.py is what the rest of the server reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from google.protobuf import text_format
from google.protobuf.message import Message

from server.datatypes import DATATYPES, config_type_to_datatype, datatype_to_config_type
from server.model_types import (
    DynamicBatchingConfig,
    InstanceGroupConfig,
    ModelConfig,
    QueuePolicy,
    TensorConfig,
    TimeoutAction,
    VersionPolicy,
)
from server.protocol import model_config_pb2 as mc
from server.runtime import BACKENDS

log = logging.getLogger("kiln.config")

CONFIG_FILENAME = "config.pbtxt"

# platform -> the file a version directory holds
MODEL_FILENAMES = {platform: backend.model_filename for platform, backend in BACKENDS.items()}
# config `backend` values accepted as synonyms of a platform
BACKEND_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch_aoti": "torch_aoti"}

DEFAULT_MAX_BATCH_SIZE = 64  # used when auto-completing a model whose batch dim is dynamic
# Lone executions faster than this run on the event loop: the thread hand-off would cost more.
DEFAULT_INLINE_EXECUTION_MAX_US = 200

# Fields kiln acts on, per message; anything else that is set gets named in one warning.
_SUPPORTED_FIELDS = {
    "ModelConfig": {
        "name", "platform", "backend", "max_batch_size", "input", "output", "version_policy",
        "instance_group", "dynamic_batching", "parameters", "optimization", "model_warmup",
        "default_model_filename", "runtime",
    },
    "ModelInput": {"name", "data_type", "dims", "optional"},
    "ModelOutput": {"name", "data_type", "dims"},
    "ModelInstanceGroup": {"name", "kind", "count", "gpus"},
    "ModelOptimizationPolicy": {"execution_accelerators", "graph", "cuda", "priority"},
    "ModelDynamicBatching": {
        "preferred_batch_size", "max_queue_delay_microseconds", "preserve_ordering",
        "priority_levels", "default_priority_level", "default_queue_policy",
        "priority_queue_policy",
    },
}


class ConfigError(ValueError):
    """config.pbtxt is unreadable or contradicts itself or the model file."""


class _RecordingParser(text_format._Parser):  # the public Parse() cannot report what it skipped
    """Text-format parser that skips fields unknown to kiln's proto (newer Triton fields) and records their names."""

    def __init__(self) -> None:
        super().__init__(allow_unknown_extension=True, allow_unknown_field=True)
        self.unknown: list[str] = []
        self._skipping = 0

    def _SkipFieldContents(self, tokenizer, field_name, immediate_message_type):
        if self._skipping == 0:  # name the outermost unknown field, not what is nested inside it
            owner = immediate_message_type.rsplit(".", 1)[-1]
            name = field_name if owner == "ModelConfig" else f"{owner}.{field_name}"
            if name not in self.unknown:
                self.unknown.append(name)
        self._skipping += 1
        try:
            super()._SkipFieldContents(tokenizer, field_name, immediate_message_type)
        finally:
            self._skipping -= 1


def parse_config_text(text: str, source: str = CONFIG_FILENAME) -> mc.ModelConfig:
    message = mc.ModelConfig()
    parser = _RecordingParser()
    try:
        parser.ParseLines(text.split("\n"), message)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    ignored = unsupported_fields(message) + [f"{name} (unknown field)" for name in parser.unknown]
    if ignored:
        log.warning("%s: kiln ignores these fields: %s", source, ", ".join(ignored))
    return message


def read_config_file(path: Path) -> mc.ModelConfig:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return parse_config_text(text, str(path))


def unsupported_fields(message: Message, prefix: str = "") -> list[str]:
    """Dotted names of set fields kiln does not implement (recursing into supported ones)."""
    supported = _SUPPORTED_FIELDS.get(message.DESCRIPTOR.name)
    names: list[str] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if supported is not None and field.name not in supported:
            names.append(path)
            continue
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        children = value if field.is_repeated else [value]
        for child in children:
            if child.DESCRIPTOR.name in _SUPPORTED_FIELDS:
                names.extend(n for n in unsupported_fields(child, path + ".") if n not in names)
    return names


def resolve_platform(message: mc.ModelConfig, version_dir_files: Sequence[str] = ()) -> str:
    """The platform a config names, or the one its model files imply."""
    if message.platform:
        if message.platform not in MODEL_FILENAMES:
            raise ConfigError(
                f"platform '{message.platform}' is not supported; expected one of {sorted(MODEL_FILENAMES)}"
            )
        return message.platform
    if message.backend:
        if message.backend not in BACKEND_PLATFORMS:
            raise ConfigError(
                f"backend '{message.backend}' is not supported; expected one of {sorted(BACKEND_PLATFORMS)}"
            )
        return BACKEND_PLATFORMS[message.backend]
    for platform, filename in MODEL_FILENAMES.items():
        if filename in version_dir_files:
            return platform
    raise ConfigError("no platform or backend in the config and no model file to infer it from")


def complete_config(message: mc.ModelConfig, platform: str, inputs, outputs) -> None:
    """Fill inputs, outputs and max_batch_size from the model file's own metadata (in place).

    `inputs`/`outputs` are runtime TensorInfo: full shapes, batch dim included.
    """
    message.platform = platform
    model_tensors = list(inputs) + list(outputs)
    batch_dynamic = bool(model_tensors) and all(t.shape and t.shape[0] == -1 for t in model_tensors)
    if not message.input and not message.output and message.max_batch_size == 0 and batch_dynamic:
        message.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        if not message.HasField("dynamic_batching") and not message.HasField("sequence_batching"):
            message.dynamic_batching.SetInParent()
    skip = 1 if message.max_batch_size > 0 else 0
    for tensors, field in ((inputs, message.input), (outputs, message.output)):
        if len(field):
            continue
        for tensor in tensors:
            entry = field.add(name=tensor.name, data_type=datatype_to_config_type(tensor.datatype))
            entry.dims.extend(tensor.shape[skip:])


def check_against_model(config: ModelConfig, inputs, outputs) -> None:
    """Raise ConfigError when the config disagrees with the model file's declared tensors."""
    for kind, declared, actual in (("input", config.inputs, inputs), ("output", config.outputs, outputs)):
        by_name = {t.name: t for t in actual}
        for tensor in declared:
            model_tensor = by_name.get(tensor.name)
            if model_tensor is None:
                raise ConfigError(
                    f"{kind} '{tensor.name}' is not in the model file, which has {sorted(by_name)}"
                )
            if model_tensor.datatype != tensor.datatype:
                raise ConfigError(
                    f"{kind} '{tensor.name}': config says {tensor.datatype}, model file says {model_tensor.datatype}"
                )
            expected = ((-1,) if config.batching else ()) + tensor.dims
            if not _shapes_compatible(expected, model_tensor.shape):
                raise ConfigError(
                    f"{kind} '{tensor.name}': config shape {list(expected)} does not fit "
                    f"the model file's {list(model_tensor.shape)}"
                )
    declared_inputs = {t.name for t in config.inputs}
    missing = [t.name for t in inputs if t.name not in declared_inputs]
    if missing:
        raise ConfigError(f"the model file needs inputs {missing} that the config does not declare")


def _shapes_compatible(config_shape: Sequence[int], model_shape: Sequence[int]) -> bool:
    if len(config_shape) != len(model_shape):
        return False
    return all(c == m or c == -1 or m == -1 for c, m in zip(config_shape, model_shape))


def to_model_config(message: mc.ModelConfig, platform: str) -> ModelConfig:
    """Validate the protobuf config and turn it into the typed ModelConfig."""
    if not message.name:
        raise ConfigError("config has no name")
    if message.max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be >= 0, got {message.max_batch_size}")
    inputs = tuple(_tensor(t, "input", optional=t.optional) for t in message.input)
    outputs = tuple(_tensor(t, "output") for t in message.output)
    for kind, tensors in (("input", inputs), ("output", outputs)):
        names = [t.name for t in tensors]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ConfigError(f"duplicate {kind} names: {sorted(duplicates)}")
    if not inputs or not outputs:
        raise ConfigError("config needs at least one input and one output")
    batching = None
    if message.HasField("dynamic_batching") and message.max_batch_size > 0:
        batching = _dynamic_batching(message.dynamic_batching, message.max_batch_size)
    optimization = message.optimization.execution_accelerators
    return ModelConfig(
        name=message.name,
        platform=platform,
        max_batch_size=message.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        dynamic_batching=batching,
        instance_group=_instance_group(message.instance_group),
        version_policy=_version_policy(message),
        parameters={key: value.string_value for key, value in message.parameters.items()},
        default_model_filename=message.default_model_filename,
        gpu_accelerators=tuple(a.name for a in optimization.gpu_execution_accelerator),
        cpu_accelerators=tuple(a.name for a in optimization.cpu_execution_accelerator),
        execution_timeout_microseconds=_int_parameter(message, "execution_timeout_microseconds"),
        inline_execution_max_microseconds=_int_parameter(
            message, "inline_execution_max_microseconds", DEFAULT_INLINE_EXECUTION_MAX_US
        ),
    )


def _int_parameter(message: mc.ModelConfig, key: str, default: int = 0) -> int:
    if key not in message.parameters:
        return default
    raw = message.parameters[key].string_value
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"parameter '{key}' must be an integer, got '{raw}'") from None
    if value < 0:
        raise ConfigError(f"parameter '{key}' must be >= 0, got {value}")
    return value


def _tensor(t, kind: str, optional: bool = False) -> TensorConfig:
    if not t.name:
        raise ConfigError(f"an {kind} has no name")
    datatype = config_type_to_datatype(mc.DataType.Name(t.data_type))
    if datatype not in DATATYPES:
        raise ConfigError(f"{kind} '{t.name}': data_type {mc.DataType.Name(t.data_type)} is not supported")
    if not t.dims and not t.HasField("reshape"):
        raise ConfigError(f"{kind} '{t.name}' has no dims")
    if any(d < -1 or d == 0 for d in t.dims):
        raise ConfigError(f"{kind} '{t.name}': dims must be positive or -1, got {list(t.dims)}")
    return TensorConfig(name=t.name, datatype=datatype, dims=tuple(t.dims), optional=optional)


def _queue_policy(policy) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=TimeoutAction(mc.ModelQueuePolicy.TimeoutAction.Name(policy.timeout_action)),
        default_timeout_microseconds=policy.default_timeout_microseconds,
        allow_timeout_override=policy.allow_timeout_override,
        max_queue_size=policy.max_queue_size,
    )


def _dynamic_batching(db, max_batch_size: int) -> DynamicBatchingConfig:
    preferred = tuple(db.preferred_batch_size)
    bad = [p for p in preferred if not 0 < p <= max_batch_size]
    if bad:
        raise ConfigError(f"preferred_batch_size {bad} must be within 1..max_batch_size ({max_batch_size})")
    if db.priority_levels and not 0 <= db.default_priority_level <= db.priority_levels:
        raise ConfigError(
            f"default_priority_level {db.default_priority_level} must be within 1..priority_levels ({db.priority_levels})"
        )
    if db.priority_levels and db.default_priority_level == 0:
        raise ConfigError("default_priority_level must be set (1..priority_levels) when priority_levels is set")
    bad_levels = [lvl for lvl in db.priority_queue_policy if not 1 <= lvl <= db.priority_levels]
    if bad_levels:
        raise ConfigError(f"priority_queue_policy levels {bad_levels} are outside 1..{db.priority_levels}")
    return DynamicBatchingConfig(
        preferred_batch_size=tuple(sorted(preferred)),
        max_queue_delay_microseconds=db.max_queue_delay_microseconds,
        preserve_ordering=db.preserve_ordering,
        priority_levels=db.priority_levels,
        default_priority_level=db.default_priority_level,
        default_queue_policy=_queue_policy(db.default_queue_policy),
        priority_queue_policy={lvl: _queue_policy(p) for lvl, p in db.priority_queue_policy.items()},
    )


def _instance_group(groups) -> InstanceGroupConfig:
    if not groups:
        return InstanceGroupConfig()
    # Several groups are summed into one pool; kind and gpus come from the first group.
    count = sum(max(g.count, 1) for g in groups)
    first = groups[0]
    return InstanceGroupConfig(
        count=count, kind=mc.ModelInstanceGroup.Kind.Name(first.kind), gpus=tuple(first.gpus)
    )


def _version_policy(message: mc.ModelConfig) -> VersionPolicy:
    policy = message.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy(kind="all")
    if choice == "specific":
        return VersionPolicy(kind="specific", specific_versions=tuple(policy.specific.versions))
    if choice == "latest":
        n = policy.latest.num_versions
        if n < 1:
            raise ConfigError(f"version_policy latest num_versions must be >= 1, got {n}")
        return VersionPolicy(kind="latest", latest_num_versions=n)
    return VersionPolicy()
