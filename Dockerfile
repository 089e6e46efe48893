# syntax=docker/dockerfile:1
# kiln images (BuildKit). Two final targets:
#   docker build --target cpu -t kiln:cpu .   python:3.11-slim + onnxruntime
#   docker build --target gpu -t kiln:gpu .   CUDA/cuDNN runtime + onnxruntime-gpu + TensorRT (the default, last stage)
# Add the AOTInductor runtime (torch) with --build-arg KILN_EXTRAS=torch.
#
# Both run as uid 10001, serve the model repository /models (the bundled model_repo is copied
# there; mount your own repository over it) on 8001 (gRPC) and 8002 (HTTP /metrics).
# Flags given to `docker run IMAGE ...` replace CMD and are appended to the ENTRYPOINT:
#   docker run -p 8001:8001 -p 8002:8002 -v "$PWD/my_repo:/models:ro" kiln:cpu --model-control-mode poll
# The images are never built in CI: tests/test_dockerfile.py lints this file with hadolint and
# checks it statically.

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# The source of the kiln distribution, shared by both builders.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY export /src/export
COPY loadtests /src/loadtests

# Builder for the CPU image: the kiln wheel and the wheels of its serving dependencies (Python 3.11).
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY --from=source /src /src
ARG KILN_EXTRAS=""
# ${KILN_EXTRAS:+[...]}: pip rejects an empty extras list "[]"
RUN pip wheel --wheel-dir /wheels "/src${KILN_EXTRAS:+[${KILN_EXTRAS}]}"

FROM python:3.11-slim AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# exactly the wheels the builder resolved; the wheel files themselves stay out of the image
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl \
 && groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent kiln
COPY model_repo /models
USER 10001:10001
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2, health_pb2_grpc; stub = health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:8001')); sys.exit(0 if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["kiln", "serve", "--model-repository", "/models", "--host", "0.0.0.0"]
CMD ["--log-format", "json"]

# CUDA + cuDNN runtime with Ubuntu's Python (3.12) in a virtual environment.
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Builder for the GPU image: the gpu and tensorrt extras, for the GPU base's Python, held to
# CUDA 12 builds like the base: TensorRT's `tensorrt` package pulls its CUDA 13 build from 10.13.2
# on (kiln is written against TensorRT 10), and cuda-python 13 is for CUDA 13.
FROM gpu-base AS gpu-builder
COPY --from=source /src /src
ARG KILN_EXTRAS=""
RUN pip wheel --wheel-dir /wheels "/src[gpu,tensorrt${KILN_EXTRAS:+,${KILN_EXTRAS}}]" \
    "tensorrt<10.13.2" "cuda-python<13"

FROM gpu-base AS gpu
# onnxruntime-gpu ships the same `onnxruntime` module as the CPU wheel the core dependencies
# name: install everything, then let the GPU build own the module.
RUN --mount=type=bind,from=gpu-builder,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl \
 && pip uninstall -y onnxruntime \
 && pip install --no-index --no-deps --force-reinstall /wheels/onnxruntime_gpu-*.whl \
 && groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent kiln
COPY model_repo /models
USER 10001:10001
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2, health_pb2_grpc; stub = health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:8001')); sys.exit(0 if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["kiln", "serve", "--model-repository", "/models", "--host", "0.0.0.0"]
CMD ["--log-format", "json"]
