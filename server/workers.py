"""`kiln serve --workers N`: N serving processes on one gRPC port (SO_REUSEPORT), one supervisor.

One kiln process runs one asyncio event loop, and on a small model that loop (the Python gRPC
layer) is what caps throughput, not the runtime. N workers use N cores:

- The **supervisor** (the `kiln serve` process; server/supervisor.py) reserves the gRPC port (a
  bound, never listening SO_REUSEPORT socket: resolves port 0, keeps other programs off it),
  starts N workers with `python -m server.workers`, owns the public /metrics port, forwards
  SIGTERM/SIGINT to every worker, and restarts a worker that dies unexpectedly (at most
  MAX_RESTARTS within RESTART_WINDOW_S, else it stops all and exits 1). It exits 0 when every
  worker drained and exited 0.
- Each **worker** is a full KilnServer: the same repository, its own batcher per model, bound to
  the shared port with SO_REUSEPORT (the kernel spreads *connections* over the workers: one
  client connection always lands on one worker) plus a private loopback port on the same grpc.aio
  server, reported to the supervisor and shared with its siblings in `peers.json`.
- A call with the metadata `kiln-local: 1` is answered by the receiving worker alone. Without it:
  ModelStatistics sums every worker's statistics; RepositoryModelLoad/Unload are applied locally
  and forwarded to every sibling (OK only when all succeeded, else the first error). Health,
  readiness, RepositoryIndex, metadata and inference are answered by the receiving worker.
- /metrics on the supervisor scrapes each worker's own loopback endpoint and merges: kiln_*
  counters, histograms and gauges summed per label set, except kiln_model_ready (the minimum:
  1 only where every worker is ready) and kiln_gpu_* (one device seen by all: the maximum);
  process_* and python_* series keep one series per worker (label `worker`).

With the default `--workers 1` none of this runs: `kiln serve` is one process as before.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Iterable

import grpc
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from server import eventloop
from server.app import KilnServer, ServerSettings
from server.auth import read_token_file
from server.errors import KilnError, Status
from server.logs import configure_logging
from server.protocol import grpc_service_pb2 as pb
from server.protocol import grpc_service_pb2_grpc as pb_grpc
from server.repository import ControlMode
from server.service import InferenceService, grpc_errors

log = logging.getLogger("kiln.workers")

LOCAL_METADATA = "kiln-local"  # "1": the receiving worker answers for itself only
WORKER_METADATA = "kiln-worker"  # trailing metadata of ServerMetadata: the answering worker's index
WORKER_PID_METADATA = "kiln-worker-pid"
PRIVATE_HOST = "127.0.0.1"
PEERS_FILE = "peers.json"
SETTINGS_FILE = "settings.pickle"
STATS_TIMEOUT_S = 10.0

# metadata never forwarded to a sibling (transport headers; the local flag is set anew)
_NOT_FORWARDED = ("user-agent", "content-type", "te", "grpc-", ":", LOCAL_METADATA)


# ---- merging (pure functions) ---------------------------------------------------------------------


def _add_durations(target, source) -> None:
    """target += source for every StatisticDuration field of two messages of one type."""
    for fd in source.DESCRIPTOR.fields:
        if fd.message_type is not None and fd.message_type.name == "StatisticDuration":
            a, b = getattr(target, fd.name), getattr(source, fd.name)
            a.count += b.count
            a.ns += b.ns


def _add_model_stats(target: pb.ModelStatistics, source: pb.ModelStatistics) -> None:
    target.last_inference = max(target.last_inference, source.last_inference)
    target.inference_count += source.inference_count
    target.execution_count += source.execution_count
    _add_durations(target.inference_stats, source.inference_stats)
    batches = {b.batch_size: b for b in target.batch_stats}
    for batch in source.batch_stats:
        if batch.batch_size in batches:
            _add_durations(batches[batch.batch_size], batch)
        else:
            added = pb.InferBatchStatistics()
            added.CopyFrom(batch)
            batches[batch.batch_size] = added
    ordered = [batches[size] for size in sorted(batches)]
    copies = [pb.InferBatchStatistics() for _ in ordered]
    for copy, batch in zip(copies, ordered):
        copy.CopyFrom(batch)
    del target.batch_stats[:]
    target.batch_stats.extend(copies)
    for key, value in source.response_stats.items():
        _add_durations(target.response_stats[key], value)


def merge_statistics(responses: Iterable[pb.ModelStatisticsResponse]) -> pb.ModelStatisticsResponse:
    """One ModelStatisticsResponse summing several workers' per (model, version); first-seen order."""
    merged = pb.ModelStatisticsResponse()
    seen: dict[tuple[str, str], pb.ModelStatistics] = {}
    for response in responses:
        for stats in response.model_stats:
            key = (stats.name, stats.version)
            if key in seen:
                _add_model_stats(seen[key], stats)
            else:
                target = merged.model_stats.add()
                target.CopyFrom(stats)
                seen[key] = target
    return merged


def merge_metrics(texts: dict[str, str]) -> list[Metric]:
    """Merge Prometheus text expositions of several workers (worker label -> text), as the module
    docstring says: kiln_* summed (kiln_model_ready min, absent counting as 0; kiln_gpu_* max),
    other families one series per worker with a `worker` label."""
    families: dict[str, Metric] = {}
    # family -> series key (labels without le) -> (sample name, labels) -> [values]
    values: dict[str, dict[tuple, dict[tuple, list[float]]]] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = family.name.startswith("kiln_")
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            series_map = values[family.name]
            for sample in family.samples:
                labels = dict(sample.labels)
                if not merged:
                    labels["worker"] = worker
                labels_key = tuple(sorted(labels.items()))
                series_key = tuple(item for item in labels_key if item[0] != "le")
                series_map.setdefault(series_key, {}).setdefault((sample.name, labels_key), []).append(sample.value)
    workers = len(texts)
    out = []
    for name, metric in families.items():
        for series in values[name].values():
            for (sample_name, labels_key), vals in series.items():
                if name == "kiln_model_ready":
                    value = min(vals) if len(vals) == workers else 0.0
                elif name.startswith("kiln_gpu_"):
                    value = max(vals)
                elif sample_name.endswith("_created"):
                    value = min(vals)
                else:
                    value = sum(vals)
                metric.add_sample(sample_name, dict(labels_key), value)
        out.append(metric)
    return out


# ---- worker side ----------------------------------------------------------------------------------


def _is_local(context) -> bool:
    return any(key == LOCAL_METADATA and value == "1" for key, value in (context.invocation_metadata() or ()))


def _forwarded_metadata(context) -> tuple[tuple[str, str], ...]:
    """The caller's metadata (credentials included) plus the local flag, for a call to a sibling."""
    kept = tuple(
        (key, value) for key, value in (context.invocation_metadata() or ())
        if not key.startswith(_NOT_FORWARDED)
    )
    return kept + ((LOCAL_METADATA, "1"),)


class Siblings:
    """The other workers' private addresses (from the supervisor's peers.json) and channels to them."""

    def __init__(self, run_dir: Path, index: int) -> None:
        self.path = Path(run_dir) / PEERS_FILE
        self.index = index
        self._peers: dict[int, str] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def peers(self) -> dict[int, str]:
        """index -> private address of every other worker that has reported. Read anew on every call
        (a few hundred bytes, read only by statistics and load/unload calls): file timestamps are too
        coarse to tell two quick rewrites apart."""
        try:
            rows = json.loads(self.path.read_text())
        except FileNotFoundError:
            rows = []
        except (OSError, ValueError):  # never half-written (os.replace), but keep the last good list
            return self._peers
        self._peers = {int(r["index"]): r["address"] for r in rows if int(r["index"]) != self.index}
        for address in set(self._channels) - set(self._peers.values()):
            channel = self._channels.pop(address)
            task = asyncio.ensure_future(channel.close())
            task.add_done_callback(lambda t: t.exception())
        return self._peers

    def stub(self, address: str) -> pb_grpc.GRPCInferenceServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    async def call(self, method: str, request, context, timeout: float | None) -> dict[int, object]:
        """Call `method` on every sibling with the local flag; index -> response or exception."""
        peers = self.peers()
        if not peers:
            return {}
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        metadata = _forwarded_metadata(context)
        calls = [getattr(self.stub(address), method)(request, metadata=metadata, timeout=timeout)
                 for address in peers.values()]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return dict(zip(peers, results))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _sibling_error(index: int, exc: BaseException) -> KilnError:
    if isinstance(exc, grpc.aio.AioRpcError):
        status = Status.__members__.get(exc.code().name, Status.INTERNAL)
        return KilnError(status, f"worker {index}: {exc.details()}")
    return KilnError(Status.INTERNAL, f"worker {index}: {exc}")


class WorkerInferenceService(InferenceService):
    """InferenceService of one worker: statistics and explicit load/unload span all workers."""

    def __init__(self, dataplane, index: int, siblings: Siblings) -> None:
        super().__init__(dataplane)
        self.index = index
        self.siblings = siblings

    @grpc_errors
    async def ServerMetadata(self, request, context):
        context.set_trailing_metadata(((WORKER_METADATA, str(self.index)), (WORKER_PID_METADATA, str(os.getpid()))))
        return await InferenceService.ServerMetadata.__wrapped__(self, request, context)

    @grpc_errors
    async def ModelStatistics(self, request, context):
        local = await InferenceService.ModelStatistics.__wrapped__(self, request, context)
        if _is_local(context):
            return local
        answers = await self.siblings.call("ModelStatistics", request, context, STATS_TIMEOUT_S)
        responses = [local]
        for index, answer in sorted(answers.items()):
            if isinstance(answer, BaseException):  # restarting, or the model is not loaded there
                log.debug("statistics of worker %d left out: %s", index, answer)
            else:
                responses.append(answer)
        return merge_statistics(responses)

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        return await self._on_all(InferenceService.RepositoryModelLoad.__wrapped__, "RepositoryModelLoad",
                                  "load", request, context)

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        return await self._on_all(InferenceService.RepositoryModelUnload.__wrapped__, "RepositoryModelUnload",
                                  "unload", request, context)

    async def _on_all(self, local_method, name: str, action: str, request, context):
        """Apply locally and on every sibling at once; OK only if all succeeded, else the first error
        (this worker's first, then the siblings' in index order)."""
        if _is_local(context):
            return await local_method(self, request, context)
        self._require_explicit(action)
        local, answers = await asyncio.gather(
            local_method(self, request, context),
            self.siblings.call(name, request, context, None),
            return_exceptions=True,
        )
        if isinstance(local, BaseException):
            raise local
        if isinstance(answers, BaseException):
            raise answers
        for index, answer in sorted(answers.items()):
            if isinstance(answer, BaseException):
                raise _sibling_error(index, answer)
        return local


@dataclasses.dataclass
class WorkerSpec:
    """What the supervisor hands every worker (pickled into the run directory)."""

    settings: ServerSettings
    log_format: str = "plain"
    log_level: str = "INFO"


def worker_settings(settings: ServerSettings) -> ServerSettings:
    metrics = settings.allow_metrics and settings.metrics_port is not None
    return dataclasses.replace(
        settings,
        reuse_port=True,
        private_host=PRIVATE_HOST,
        metrics_host=PRIVATE_HOST,
        metrics_port=0 if metrics else None,  # the supervisor serves the public /metrics
    )


class _WorkerLogFilter(logging.Filter):
    """Say which worker logs: a `worker` field in JSON lines, a "[worker i]" prefix in plain ones."""

    def __init__(self, index: int, plain: bool) -> None:
        super().__init__()
        self.index = index
        self.plain = plain

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_kiln_worker", False):
            return True
        record._kiln_worker = True
        if self.plain:
            record.msg = f"[worker {self.index}] {record.msg}"
        else:
            record.fields = {**(getattr(record, "fields", None) or {}), "worker": self.index}
        return True


def _own_metadata(settings: ServerSettings) -> tuple[tuple[str, str], ...]:
    """Metadata of a worker's own call to a sibling: the local flag, and a token of ours when tokens are on."""
    metadata: tuple[tuple[str, str], ...] = ((LOCAL_METADATA, "1"),)
    for path in (settings.auth_token_file, settings.admin_token_file):
        if path is not None:
            token = read_token_file(path)[0].decode()
            return metadata + (("authorization", f"Bearer {token}"),)
    return metadata


async def _sync_loaded_models(server: KilnServer, siblings: Siblings, index: int) -> None:
    """A restarted worker in explicit mode loads what its siblings serve (loads it missed)."""
    names: set[str] = set()
    metadata = _own_metadata(server.settings)
    for address in siblings.peers().values():
        try:
            answer = await siblings.stub(address).RepositoryIndex(
                pb.RepositoryIndexRequest(ready=True), metadata=metadata, timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot read the repository index of %s: %s", address, exc.details())
            continue
        names.update(model.name for model in answer.models)
    for name in sorted(names):
        entry = server.repository.models.get(name)
        if entry is None or entry.latest_ready() is None:
            log.info("loading '%s' as the other workers serve it", name)
            try:
                await server.repository.load(name)
            except KilnError as exc:
                log.error("model '%s' failed to load: %s", name, exc.message)


async def _run_worker(spec: WorkerSpec, run_dir: Path, index: int, report_fd: int, restarted: bool) -> None:
    siblings = Siblings(run_dir, index)
    server = KilnServer(worker_settings(spec.settings),
                        service_factory=lambda dataplane: WorkerInferenceService(dataplane, index, siblings))
    loop = asyncio.get_running_loop()
    await server.start(load_models=False)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.stop_soon)

    def supervisor_gone() -> None:  # stdin is a pipe from the supervisor: EOF means it is gone
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            log.warning("supervisor gone: stopping")
            server.stop_soon()

    loop.add_reader(0, supervisor_gone)
    report = {
        "index": index, "pid": os.getpid(), "address": f"{PRIVATE_HOST}:{server.private_grpc_port}",
        "metrics_port": server.metrics_port,
    }
    os.write(report_fd, (json.dumps(report) + "\n").encode())  # the fd stays open: its EOF tells our exit
    await server.repository.start()
    if restarted and server.repository.control_mode is ControlMode.EXPLICIT:
        await _sync_loaded_models(server, siblings, index)
    server.health.notify()
    log.info("server ready: %s", server.dataplane.ready())
    try:
        await server.wait_closed()
    finally:
        await siblings.close()


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.workers", description="one worker of `kiln serve --workers N`")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--restarted", action="store_true")
    args = parser.parse_args(argv)
    spec: WorkerSpec = pickle.loads((args.run_dir / SETTINGS_FILE).read_bytes())
    configure_logging(spec.log_format, spec.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerLogFilter(args.index, spec.log_format != "json"))
    eventloop.run(_run_worker(spec, args.run_dir, args.index, args.report_fd, args.restarted), spec.settings.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
