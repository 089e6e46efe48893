"""Typed, validated model configuration (the parts kiln acts on).

config.py turns a config.pbtxt into these; the batcher, runtimes and service
read only these, never the raw protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property


def dims_match(dims: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether `shape` fits `dims` dimension by dimension (-1: any size; sizes below 0 never fit).
    Lengths are the caller's to compare. A loop, not any(...): it runs for every tensor of every
    request and every output of every batch."""
    for d, s in zip(dims, shape):
        if s < 0 or (d != -1 and d != s):
            return False
    return True


@dataclass(frozen=True)
class TensorConfig:
    """One input or output. `dims` excludes the batch dimension when the model batches."""

    name: str
    datatype: str  # v2 name: FP32, INT64, BYTES, ...
    dims: tuple[int, ...]  # -1 marks a variable dimension
    optional: bool = False


class TimeoutAction(enum.Enum):
    REJECT = "REJECT"
    DELAY = "DELAY"


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy. 0 means 'no limit' for both size and timeout."""

    timeout_action: TimeoutAction = TimeoutAction.REJECT
    default_timeout_microseconds: int = 0
    allow_timeout_override: bool = False
    max_queue_size: int = 0


@dataclass(frozen=True)
class DynamicBatchingConfig:
    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0  # 0: priorities disabled (one level)
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = field(default_factory=QueuePolicy)
    priority_queue_policy: dict[int, QueuePolicy] = field(default_factory=dict)

    def policy_for(self, level: int) -> QueuePolicy:
        return self.priority_queue_policy.get(level, self.default_queue_policy)


@dataclass(frozen=True)
class InstanceGroupConfig:
    count: int = 1
    kind: str = "KIND_AUTO"  # KIND_AUTO | KIND_CPU | KIND_GPU | KIND_MODEL
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk are served: latest(n), all, or specific ones."""

    kind: str = "latest"  # latest | all | specific
    latest_num_versions: int = 1
    specific_versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.specific_versions]
        return ordered[-self.latest_num_versions:] if ordered else []


@dataclass(frozen=True)
class ModelConfig:
    name: str
    platform: str  # onnxruntime_onnx | tensorrt_plan | torch_aoti
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    dynamic_batching: DynamicBatchingConfig | None = None
    instance_group: InstanceGroupConfig = field(default_factory=InstanceGroupConfig)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    parameters: dict[str, str] = field(default_factory=dict)
    default_model_filename: str = ""
    # Execution accelerators asked for in optimization.execution_accelerators, e.g. ("tensorrt",).
    gpu_accelerators: tuple[str, ...] = ()
    cpu_accelerators: tuple[str, ...] = ()
    execution_timeout_microseconds: int = 0  # 0: no limit
    # A lone request on an idle model whose lone executions take less than this runs on the
    # event loop instead of an instance thread (0: never). See batching.Scheduler.
    inline_execution_max_microseconds: int = 200

    @property
    def batching(self) -> bool:
        """True when dimension 0 of every tensor is the batch dimension."""
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorConfig | None:
        return self._inputs_by_name.get(name)

    def output(self, name: str) -> TensorConfig | None:
        return self._outputs_by_name.get(name)

    # looked up for every tensor of every request: a dict, built once (the first of a name wins)
    @cached_property
    def _inputs_by_name(self) -> dict[str, TensorConfig]:
        return {t.name: t for t in reversed(self.inputs)}

    @cached_property
    def _outputs_by_name(self) -> dict[str, TensorConfig]:
        return {t.name: t for t in reversed(self.outputs)}

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)
