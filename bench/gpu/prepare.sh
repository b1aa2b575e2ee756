#!/usr/bin/env bash
# Prepares the GPU side by side of issue 18 on THIS machine (which has package registries) for a
# lent H200 machine (which has none): wheels for what its image lacks, the workload generator and
# the dllm checkout, all under .gpu/ (ignored by git; the device tool's `carry` takes it along).
#
#   bash bench/gpu/prepare.sh [DLLM_SRC]        # DLLM_SRC: a dllm checkout (default $DLLM_SRC)
#   then, with the device tool: run(command="bash bench/gpu/run.sh", carry=[".gpu"], timeout_s=600)
#
# The device image (KINDS.md of the device tool) has python 3.12, torch (CUDA), transformers 5.17,
# accelerate, tensorboard, pandas, pyarrow, but no datasets; its packages come first for anything
# we do not carry. Our side gets our pinned transformers/peft/datasets; the real dllm gets its own
# pins (transformers 4.57 etc.) in a second folder, so each side runs the versions it declares.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DLLM_SRC=${1:-${DLLM_SRC:-}}
SHARED_TOOL=${DLLM_WORKLOAD_TOOL:-$ROOT/../shared/bench/make_workload.py}
PY=${PYTHON:-$ROOT/.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}  # the device image's python (3.11: for a dry run here with DEVICE=cpu)
OUT=$ROOT/.gpu
if [ -n "$DLLM_SRC" ] && [ ! -f "$DLLM_SRC/examples/llada/sft.py" ]; then
  echo "DLLM_SRC=$DLLM_SRC is not a dllm checkout (no examples/llada/sft.py)" >&2; exit 2
fi
[ -f "$SHARED_TOOL" ] || { echo "no workload generator at $SHARED_TOOL (set DLLM_WORKLOAD_TOOL)" >&2; exit 2; }
# Ours: what the image lacks or has at another version, at the versions installed in our venv (setup.sh
# installs requirements.txt's pins there; dill/multiprocess/fsspec are what those pins pulled in).
mapfile -t OURS < <("$PY" -m pip freeze | grep -iE '^(transformers|peft|datasets|dill|multiprocess|fsspec)==')
[ ${#OURS[@]} -eq 6 ] || { echo "expected transformers, peft, datasets, dill, multiprocess, fsspec in $PY's environment (bash setup.sh)" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT/whl-ours" "$OUT/whl-dllm"

download() {  # folder, requirement...: wheels for CPython $PY_VERSION on x86-64 Linux, no dependencies
  local dest=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "$@"
}

# Ours, at the versions found above
download "$OUT/whl-ours" "${OURS[@]}"

if [ -n "$DLLM_SRC" ]; then
  # dllm's own pins (its pyproject.toml) and what `import dllm` imports that the image lacks
  # (read from sys.modules after `import dllm` in a venv made from its pyproject.toml)
  download "$OUT/whl-dllm" transformers==4.57.0 tokenizers==0.22.2 huggingface_hub==0.36.2 \
    accelerate==1.11.0 peft==0.17.1 datasets==4.2.0 dill==0.4.0 multiprocess==0.70.16 fsspec==2025.9.0 \
    trl==0.29.1 lm_eval==0.4.13 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 \
    torchmetrics==1.9.0 lightning-utilities==0.15.3
  mkdir -p "$OUT/dllm"
  (cd "$DLLM_SRC" && tar cf - --exclude=.git .) | (cd "$OUT/dllm" && tar xf -)
else
  echo "no DLLM_SRC: the device run will compare ours with the recipe only" >&2
fi

cp "$SHARED_TOOL" "$OUT/make_workload.py"
# its template checkpoint (make_workload.py --fixture): config keys and weight names of LLaDA's format
mkdir -p "$OUT/fixture" && cp "$(dirname "$SHARED_TOOL")/../fixtures/llada-tiny/"{config.json,model.safetensors} "$OUT/fixture/"
du -sh "$OUT" | awk '{print "prepared .gpu/ (" $1 "; the device tool carries up to 64 MiB with the tree)"}'
