#!/usr/bin/env bash
# Install the peer servers for loadtests/peers/compare.py, each in its own venv under loadtests/peers/.venvs:
#   mlserver  MLServer 1.7 (uvloop<0.22) + onnxruntime   -> a custom runtime with adaptive batching
#   pytriton  nvidia-pytriton 0.7 + onnxruntime           -> Triton (bundled) + a Python binding with dynamic batching
# and what perf_analyzer (from the tritonclient wheel of the main .venv) needs: Debian's libb64-0d and the CUDA
# runtime library of the nvidia-cuda-runtime-cu12 wheel (installed into .venvs/cudart).
# Idempotent: a venv that imports already is left alone. Usage: bash loadtests/peers/setup.sh [mlserver|pytriton|perf]...
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3}"
mkdir -p "$VENVS"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(mlserver pytriton perf)

make_venv() {  # name, import check, packages...
    local name="$1" check="$2"; shift 2
    if [ -x "$VENVS/$name/bin/python" ] && "$VENVS/$name/bin/python" -c "$check" 2>/dev/null; then
        echo "[peers] $name: ready"; return
    fi
    echo "[peers] $name: installing $*"
    "$PYTHON" -m venv "$VENVS/$name"
    "$VENVS/$name/bin/python" -m pip install --quiet --upgrade pip
    "$VENVS/$name/bin/python" -m pip install --quiet "$@"
    "$VENVS/$name/bin/python" -c "$check"
}

for target in "${targets[@]}"; do
    case "$target" in
        mlserver) make_venv mlserver "import mlserver, onnxruntime" "mlserver==1.7.*" "uvloop<0.22" "onnxruntime>=1.20" numpy ;;
        pytriton) make_venv pytriton "import pytriton.triton, onnxruntime" "nvidia-pytriton==0.7.*" "onnxruntime>=1.20" numpy ;;
        perf)
            if ! ldconfig -p | grep -q libb64.so.0d; then
                if [ "$(id -u)" = 0 ]; then
                    apt-get install -y -qq libb64-0d >/dev/null || { apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; }
                else
                    echo "[peers] perf_analyzer needs libb64-0d: sudo apt-get install -y libb64-0d" >&2
                fi
            fi
            make_venv cudart "import nvidia.cuda_runtime" "nvidia-cuda-runtime-cu12" ;;
        *) echo "unknown target '$target' (mlserver, pytriton, perf)" >&2; exit 2 ;;
    esac
done
echo "[peers] python lib dir for PyTriton's stub: $("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
