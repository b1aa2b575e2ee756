#!/usr/bin/env bash
# Issue 18's GPU side by side, run ON a lent H200 machine after bench/gpu/prepare.sh here:
#   run(command="bash bench/gpu/run.sh", carry=[".gpu"], timeout_s=600)
# Installs the carried wheels into /tmp (the image stays as it is), writes a ~1.3B LLaDA workload
# (d_model 2048, 16 layers, 16 heads, LLaDA's vocabulary 126464), then runs
# bench/bench_train.py --baseline dllm-recipe --device cuda: ours, the recipe and (when carried)
# the real dllm trainer, each in its GPU defaults (bf16), with MFU against --peak-tflops.
# Everything it prints and the bench's JSON land in $OUT. Settings: STEPS (default 30,15),
# PEAK_TFLOPS (989), WORKLOAD_ARGS, DEVICE (cuda; cpu for a dry run of this script here:
#   PY_VERSION=3.11 bash bench/gpu/prepare.sh /tmp/dllm
#   PYTHON=.venv/bin/python DEVICE=cpu STEPS=4,2 WORKLOAD_ARGS="--vocab 4096" bash bench/gpu/run.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_run.log") 2>&1
PY=${PYTHON:-python3}
STEPS=${STEPS:-30,15}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
DEVICE=${DEVICE:-cuda}
WORKLOAD_ARGS=${WORKLOAD_ARGS:---d-model 2048 --layers 16 --heads 16 --vocab 126464}
[ -d .gpu/whl-ours ] || { echo "no .gpu/: run bash bench/gpu/prepare.sh first and carry .gpu"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

install() {  # wheel folder -> target folder (no index, no dependencies: the image provides the rest)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl
}
install .gpu/whl-ours /tmp/site-ours || { echo "installing our wheels failed"; exit 3; }
export PYTHONPATH=/tmp/site-ours:$ROOT/src
"$PY" - <<'PYEOF' || { echo "our side cannot import what it needs (above)"; exit 3; }
import torch, transformers, datasets, peft, accelerate, dllm_trainer
print("ours:", "torch", torch.__version__, "transformers", transformers.__version__, "datasets", datasets.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PYEOF

DLLM_ARGS=(--no-dllm)
if [ -d .gpu/dllm ] && [ -d .gpu/whl-dllm ]; then
  if install .gpu/whl-dllm /tmp/site-dllm; then
    # DLLM_PYTHON: the image's python with dllm's pinned packages first (the bench adds DLLM_SRC)
    py_path=$(command -v "$PY"); case $py_path in /*) ;; *) py_path=$ROOT/$py_path ;; esac  # runs start elsewhere
    printf '#!/bin/sh\nPYTHONPATH=/tmp/site-dllm:${PYTHONPATH:-} exec %s "$@"\n' "$py_path" > /tmp/dllm-python
    chmod +x /tmp/dllm-python
    if PYTHONPATH=$ROOT/.gpu/dllm /tmp/dllm-python -c \
        "import dllm, transformers; print('dllm side: transformers', transformers.__version__)"; then
      export DLLM_SRC=$ROOT/.gpu/dllm DLLM_PYTHON=/tmp/dllm-python
      DLLM_ARGS=()
    else
      echo "the real dllm does not import here (above): comparing with the recipe only"
    fi
  else
    echo "installing dllm's wheels failed (above): comparing with the recipe only"
  fi
fi

WL=${WORKLOAD_DIR:-/tmp/wl-gpu}
if [ ! -f $WL/model/config.json ]; then
  t0=$SECONDS
  # with dllm's transformers 4.57 when it is there, so the tokenizer files name a class both sides load
  # shellcheck disable=SC2086
  "${DLLM_PYTHON:-$PY}" .gpu/make_workload.py $WL $WORKLOAD_ARGS --fixture .gpu/fixture > "$OUT/make_workload.log" 2>&1 \
    || { tail -20 "$OUT/make_workload.log"; echo "make_workload.py failed"; exit 4; }
  echo "workload written in $((SECONDS - t0)) s: $(du -sh $WL | cut -f1)"
fi

"$PY" bench/bench_train.py $WL --baseline dllm-recipe --device "$DEVICE" --steps "$STEPS" \
  $([ "$DEVICE" = cuda ] && echo --peak-tflops "$PEAK_TFLOPS") --out "$OUT/gpu_side_by_side.json" "${DLLM_ARGS[@]}"
status=$?
nvidia-smi --query-gpu=memory.used,clocks.sm --format=csv,noheader || true
exit $status
