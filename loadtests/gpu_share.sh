#!/usr/bin/env bash
# The GPU target of the load-test issue in one run on a lent GPU machine: the zoo's ResNet-50,
# compiled with AOTInductor for CUDA (the fastest runtime that machine's image can run: it has
# torch with CUDA, but neither onnxruntime-gpu nor TensorRT, which are too big to carry), served by
# kiln, and its served throughput as a share of the same package in-process at the batch size the
# server formed, with a py-spy profile of where the rest goes (loadtests/served_share.py).
#
#   bash loadtests/gpu_share.sh --fetch-wheels     # here, with the package index: fills .whl/
#   bash loadtests/gpu_share.sh OUT_DIR            # there, from the repository root (carry .whl)
#   DEVICE=cpu ZOO_MODEL=mlp bash loadtests/gpu_share.sh OUT_DIR   # the same steps on a CPU, to try it
#
# The image there lacks kiln's exact grpcio/protobuf, grpcio-health-checking, grpcio-reflection and
# py-spy: they travel as wheels in .whl/ (git-ignored: name it in the device call's carry) and are
# installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 py-spy==0.4.3)

if [ "${1:-}" = "--fetch-wheels" ]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
fi

OUT=${1:?usage: gpu_share.sh OUT_DIR | --fetch-wheels}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
MODEL=${ZOO_MODEL:-resnet50}
if [ "$DEVICE" = cuda ]; then
  nvidia-smi -L | tee "$OUT/card.txt"
  "$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/card.txt"
fi

REPO=${KILN_GPU_REPO:-/tmp/kiln-gpu-repo}
# ONNX export first (kiln compile rebuilds the module from the export's record), then AOTInductor
[ -d "$REPO/$MODEL" ] || "$PY" -m export.make_zoo --model-repository "$REPO" --only "$MODEL"
[ -d "$REPO/${MODEL}_aoti" ] || "$PY" -m server compile "$MODEL" --target aoti --device "$DEVICE" --model-repository "$REPO"
cat "$REPO/${MODEL}_aoti/config.pbtxt" > "$OUT/config.pbtxt"

# 16 cores there: kiln bench's client processes and kiln's workers share them (no h2load in the image);
# GENERATOR=bench-stream sends the same load over ModelStreamInfer streams
"$PY" -m loadtests.served_share --model-repository "$REPO" --model "${MODEL}_aoti" --generator "${GENERATOR:-bench}" \
  --processes "${CLIENT_PROCESSES:-6}" --concurrency "${CONCURRENCY:-64}" --connections 16 \
  --workers "${WORKERS:-4}" --rounds 3 --duration 5 --profile-duration 5 \
  --json "$OUT/served_share.json" --markdown | tee "$OUT/served_share.md"
