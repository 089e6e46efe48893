"""The `kiln` command: serve a model repository, send a request, list models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from server import eventloop
from server.app import DEFAULT_MAX_MESSAGE_BYTES, ServerSettings, auth_interceptors, serve, server_credentials
from server.channels import add_security_flags
from server.logs import configure_logging
from server.metrics import latency_buckets
from server.repository import ControlMode
from server.threadpriority import MAX_NICE, RUNTIME_NICE_ENV


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (KServe v2 / Triton protocol)",
        description="Serve every model of a repository over the KServe v2 / Triton gRPC protocol, "
        "with Prometheus metrics on a separate port. Ctrl-C or SIGTERM drains and stops.",
    )
    p.add_argument("--model-repository", type=Path, default=Path("model_repo"), help="repository folder (default: model_repo)")
    p.add_argument("--host", default="127.0.0.1", help="address for the gRPC port (default: 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: 8001)")
    p.add_argument("--metrics-host", default=None, help="address for the metrics port (default: --host)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port (default: 8002; -1 disables)")
    p.add_argument(
        "--model-control-mode", choices=[m.value for m in ControlMode], default="none",
        help="none: load all at start; explicit: load/unload over gRPC; poll: follow the repository on disk",
    )
    p.add_argument("--load-model", action="append", default=[], metavar="NAME", help="model to load at start in explicit mode (repeatable)")
    p.add_argument("--repository-poll-secs", type=float, default=15.0, help="poll interval in poll mode (default: 15)")
    p.add_argument("--strict-readiness", type=_bool, default=True, help="ServerReady only when every start-up model is ready (default: true)")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS", help="how long shutdown waits for accepted requests (default: 30)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="largest gRPC message accepted (default: 64 MiB)")
    p.add_argument("--max-pending-calls", type=int, default=0, metavar="N",
                   help="calls gRPC may hold before kiln takes them; beyond N it starts refusing, beyond 2N it refuses all "
                   "(default: 0 = gRPC's own 1000 / 3000)")
    p.add_argument("--log-format", choices=["plain", "json"], default="plain", help="log line format (default: plain)")
    p.add_argument("--log-level", default="INFO", help="log level (default: INFO)")
    p.add_argument("--allow-metrics", type=_bool, default=True, help="Prometheus metrics endpoint and histograms (default: true)")
    p.add_argument(
        "--latency-buckets", default=None, metavar="SECONDS,...",
        help="latency histogram bucket bounds in seconds, comma-separated (default: $KILN_LATENCY_BUCKETS or 50us..10s)",
    )
    p.add_argument("--access-log", action="store_true", help="log one line per inference request (model, version, outcome, duration)")
    p.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="serving processes sharing the gRPC port (SO_REUSEPORT; one client connection lands on one of "
        "them); each batches on its own; statistics, metrics and load/unload span all (default: 1)",
    )
    p.add_argument("--runtime-nice", type=int, default=None, metavar="N",
                   help="run the model instances' threads (and the compute threads their runtime starts) N nice "
                   "steps below the server's, so the event loop goes first on a busy CPU host; 0-19 "
                   f"(default: ${RUNTIME_NICE_ENV} or 0)")
    p.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto",
                   help="asyncio event loop: uvloop takes less CPU per call (default: auto = uvloop when installed)")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="certificate chain: serve gRPC over TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, default=None, metavar="PEM",
                   help="CA bundle: mutual TLS, every client must present a certificate signed by it")
    p.add_argument("--auth-token-file", type=Path, default=None, metavar="FILE",
                   help="bearer tokens, one per line: every inference RPC needs 'authorization: Bearer <token>' "
                   "(health, reflection and /metrics stay open)")
    p.add_argument("--admin-token-file", type=Path, default=None, metavar="FILE",
                   help="bearer tokens, one per line, allowed to load/unload models (with auth on and no admin "
                   "file, nobody may)")
    p.set_defaults(handler=_serve)


def _serve(args) -> int:
    configure_logging(args.log_format, args.log_level.upper())
    if not args.model_repository.is_dir():
        print(f"kiln serve: model repository '{args.model_repository}' is not a directory", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"kiln serve: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.runtime_nice is not None:
        if not 0 <= args.runtime_nice <= MAX_NICE:
            print(f"kiln serve: --runtime-nice must be 0-{MAX_NICE}, got {args.runtime_nice}", file=sys.stderr)
            return 2
        os.environ[RUNTIME_NICE_ENV] = str(args.runtime_nice)  # read by this process and its --workers
    try:
        buckets = latency_buckets(args.latency_buckets)
    except ValueError as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        model_repository=args.model_repository,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        control_mode=ControlMode(args.model_control_mode),
        load_models=tuple(args.load_model),
        poll_secs=args.repository_poll_secs,
        strict_readiness=args.strict_readiness,
        grace_period_s=args.grace_period,
        max_message_bytes=args.max_message_bytes,
        max_pending_calls=args.max_pending_calls,
        allow_metrics=args.allow_metrics,
        latency_buckets=buckets,
        access_log=args.access_log,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        admin_token_file=args.admin_token_file,
        event_loop=args.event_loop,
    )
    try:  # unreadable TLS or token files, or no uvloop: a clear message now, not a traceback at start
        server_credentials(settings)
        auth_interceptors(settings)
        eventloop.resolve(settings.event_loop)
    except (OSError, ValueError) as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        from server.supervisor import run_supervisor

        return run_supervisor(settings, args.workers, args.log_format, args.log_level.upper())
    eventloop.run(serve(settings), settings.event_loop)
    return 0


def _add_connection_flags(p) -> None:
    """How a client command reaches the server: address, TLS and bearer token."""
    p.add_argument("--url", default="127.0.0.1:8001",
                   help="server address HOST:PORT, or several replicas as ipv4:HOST:PORT,HOST:PORT (default: 127.0.0.1:8001)")
    p.add_argument("--round-robin", action="store_true", help="spread calls over every address of --url (client-side balancing)")
    p.add_argument("--retries", type=int, default=0, choices=range(5), metavar="N",
                   help="retry a call answered UNAVAILABLE (or CANCELLED by a closing server) up to N times, with back-off (0-4, default: 0)")
    add_security_flags(p)


def _add_client_commands(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="send one inference request to a running server and print the outputs",
        description="Send one ModelInfer request. Inputs come from .npy files (--input NAME=FILE.npy) "
        "or, when omitted, are random values of the model's declared shape (batch 1).",
    )
    p.add_argument("model", help="model name")
    _add_connection_flags(p)
    p.add_argument("--model-version", default="", help="version (default: latest ready)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="input tensor from a .npy file (repeatable)")
    p.add_argument("--batch-size", type=int, default=1, help="rows of random input when no file is given (default: 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default: 30)")
    p.set_defaults(handler=_infer)

    p = sub.add_parser(
        "models",
        help="list the repository index of a running server",
        description="Print every model of a running server's repository with its version, state and failure reason.",
    )
    _add_connection_flags(p)
    p.set_defaults(handler=_models)


def _infer(args) -> int:
    from server.client import infer_command

    return infer_command(args)


def _models(args) -> int:
    from server.client import models_command

    return models_command(args)


def _add_export_commands(sub) -> None:
    """`kiln export` / `kiln compile`; their code (and torch) is imported only when they run."""
    p = sub.add_parser(
        "export",
        help="export a PyTorch module to ONNX into a model repository, with parity checks",
        description="Build a torch.nn.Module from MODULE:FACTORY, export it to ONNX (dynamic axes where dims "
        "are -1), check it, compare it with PyTorch under onnxruntime at several batch sizes and lengths, "
        "and write <repo>/<name>/<version>/model.onnx + config.pbtxt atomically. Needs the export extra.",
    )
    p.add_argument("factory", metavar="MODULE:FACTORY", help="callable returning the module, e.g. export.zoo.mlp:build_mlp")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--input", action="append", default=[], required=True, metavar="NAME:DTYPE:DIMS",
                   help="input in forward() order, e.g. x:FP32:-1,256 (full shape; -1 dynamic; leading -1 = batch)")
    p.add_argument("--output", action="append", default=[], metavar="NAME", help="output names in order (default: output, output_1, ...)")
    p.add_argument("--model-repository", type=Path, default=Path("model_repo"), help="repository folder (default: model_repo)")
    p.add_argument("--version", type=int, default=1, help="version directory to write (default: 1)")
    p.add_argument("--max-batch-size", type=int, default=64, help="max_batch_size of the config; 0: no batch dim (default: 64)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--fp16", action="store_true", help="convert the ONNX model to float16 (float IO becomes FP16)")
    p.add_argument("--state-dict", metavar="PATH", help="weights to load (torch.load weights_only=True)")
    p.add_argument("--atol", type=float, default=None, help="parity absolute tolerance (default per dtype: FP32 1e-4, FP16 2e-2)")
    p.add_argument("--rtol", type=float, default=None, help="parity relative tolerance (default per dtype: FP32 1e-3, FP16 2e-2)")
    p.add_argument("--dynamic-axis-names", nargs="+", default=[], metavar="[INPUT:]AXIS=NAME",
                   help="names of dynamic axes, e.g. 1=sequence; equal names share a size (default: batch, dim1, ...)")
    p.add_argument("--value-range", action="append", default=[], metavar="NAME:LO:HI",
                   help="parity inputs for NAME drawn from [LO, HI) (default: ints in [0,2), floats standard normal)")
    p.add_argument("--parity-batch-sizes", type=int, nargs="+", metavar="N", help="batch sizes for parity (default: 1 7 max)")
    p.add_argument("--parity-lengths", type=int, nargs="+", metavar="N", help="sizes of other dynamic axes for parity (default: 1 7 32)")
    p.add_argument("--no-simplify", action="store_true", help="skip graph simplification")
    p.set_defaults(handler=_export)

    p = sub.add_parser(
        "compile",
        help="compile an exported model to a TensorRT engine or an AOTInductor package",
        description="Compile model NAME of the repository (exported by `kiln export`) into a new model beside it "
        "(default NAME_trt / NAME_aoti) with its own config: --target tensorrt builds model.plan from the ONNX "
        "file (GPU + tensorrt extra); --target aoti rebuilds the PyTorch module from export.json and packages "
        "it with AOTInductor (model.pt2; torch extra).",
    )
    p.add_argument("name", help="model name in the repository")
    p.add_argument("--target", required=True, choices=["aoti", "tensorrt"], help="what to build")
    p.add_argument("--model-repository", type=Path, default=Path("model_repo"), help="repository folder (default: model_repo)")
    p.add_argument("--version", type=int, default=None, help="version to compile (default: the latest)")
    p.add_argument("--output-name", default=None, help="name of the new model (default: NAME_trt / NAME_aoti)")
    p.add_argument("--fp16", action="store_true", help="FP16 engine (tensorrt) / half-precision module (aoti)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="aoti: device to compile for (default: cuda if available)")
    p.add_argument("--dynamic-dim", action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                   help="tensorrt: profile range of a non-batch dynamic axis (default 1:32:128)")
    p.add_argument("--workspace-mb", type=int, default=2048, help="tensorrt: builder workspace (default: 2048)")
    p.add_argument("--atol", type=float, default=None, help="parity absolute tolerance")
    p.add_argument("--rtol", type=float, default=None, help="parity relative tolerance")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check of the compiled model")
    p.set_defaults(handler=_compile)


def _export(args) -> int:
    from export.cli import export_command

    return export_command(args)


def _compile(args) -> int:
    from export.cli import compile_command

    return compile_command(args)


def _add_bench(sub) -> None:
    # every argument goes through untouched ('+' prefix: '--x' is not an option here); --help included
    p = sub.add_parser(
        "bench",
        help="load-test a model of a running server (closed/open loop), or the runtime alone (--in-process)",
        add_help=False,
        prefix_chars="+",
    )
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_bench)


def _bench(args) -> int:
    from loadtests.bench.cli import main as bench_main

    return bench_main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: an inference server for ONNX, TensorRT and AOTInductor models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_client_commands(sub)
    _add_export_commands(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader went away (`kiln infer mlp | head -1`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
