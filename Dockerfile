# kiln images. Two targets:
#   docker build --target gpu -t kiln:gpu .   CUDA runtime + onnxruntime-gpu + TensorRT (the default, last stage)
#   docker build --target cpu -t kiln:cpu .   CPU only: onnxruntime
# Both serve /models (mount your repository there) on 8001 (gRPC) and 8002 (metrics).

FROM python:3.11-slim AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/kiln
COPY pyproject.toml README.md ./
COPY server ./server
COPY export ./export
COPY loadtests ./loadtests
RUN pip install .
COPY model_repo /models
RUN useradd --system --uid 1000 kiln
USER kiln
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; sys.exit(0 if g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')).Check(h.HealthCheckRequest(), timeout=2).status == 1 else 1)"
ENTRYPOINT ["kiln", "serve", "--model-repository", "/models", "--host", "0.0.0.0"]

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS gpu
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/kiln
COPY pyproject.toml README.md ./
COPY server ./server
COPY export ./export
COPY loadtests ./loadtests
# onnxruntime-gpu replaces the CPU wheel; tensorrt brings the native engine runtime.
RUN pip install '.[gpu,tensorrt]' && pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps 'onnxruntime-gpu>=1.20'
COPY model_repo /models
RUN useradd --system --uid 1000 kiln
USER kiln
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; sys.exit(0 if g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')).Check(h.HealthCheckRequest(), timeout=2).status == 1 else 1)"
ENTRYPOINT ["kiln", "serve", "--model-repository", "/models", "--host", "0.0.0.0"]
