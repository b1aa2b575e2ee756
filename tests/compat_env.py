"""A second, small virtual environment with transformers 4.57 and the pinned CPU torch, for tests
that load our outputs as a user of the older transformers would: without dllm_trainer.

Built at most once per requirements file (tests/assets/compat/), into
<repo>/.cache/compat-venvs/<name>-<hash of the file and the Python version>/ (ignored by git, kept
between runs), by pip with its usual wheel cache and the local torch wheel. A build that did not
finish (no completion stamp) is redone. A failed build raises CompatEnvError with pip's output:
tests fail on it, they never skip.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "tests" / "assets" / "compat" / "requirements-transformers-4.57.txt"
BUILD_TIMEOUT_S = 1800


class CompatEnvError(RuntimeError):
    pass


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child interpreter: nothing that points at our venv or our sources."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


def _run(cmd: list, what: str, timeout: float) -> None:
    try:
        proc = subprocess.run([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, env=clean_env(), cwd=str(REPO))
    except subprocess.TimeoutExpired as e:
        raise CompatEnvError(f"{what} took longer than {timeout:.0f} s:\n{(e.output or '')[-4000:]}") from None
    if proc.returncode != 0:
        raise CompatEnvError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")


def compat_python(requirements: Path = REQUIREMENTS) -> Path:
    """The interpreter of the environment ``requirements`` describes, built if needed."""
    text = requirements.read_bytes()
    key = hashlib.sha256(text + sys.version.encode()).hexdigest()[:16]
    root = REPO / ".cache" / "compat-venvs" / f"{requirements.stem}-{key}"
    python, stamp = root / "bin" / "python", root / ".complete"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test sessions build it once
        if stamp.is_file() and python.exists():
            return python
        shutil.rmtree(root, ignore_errors=True)
        _run([sys.executable, "-m", "venv", root], "creating the transformers 4.57 test venv", 300)
        _run([python, "-m", "pip", "install", "--disable-pip-version-check", "-r", requirements],
             f"installing {requirements.name} into {root}", BUILD_TIMEOUT_S)
        _run([python, "-c", "import torch, transformers, tokenizers, safetensors"],
             "importing the test venv's packages", 300)
        stamp.write_text(requirements.name + "\n")
    return python
