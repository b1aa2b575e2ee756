"""What importing the package does to a fresh process: model registration, and quiet logs."""
import subprocess
import sys

from conftest import REPO


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_import_registers_llada_and_dream_with_the_auto_classes():
    proc = run_python(
        "import dllm_trainer\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('llada')).__name__, type(AutoConfig.for_model('Dream')).__name__)"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LLaDAConfig", "DreamConfig"]


def test_bitsandbytes_cpu_kernel_warning_is_silenced():
    # The warning (an optional CPU 4-bit kernel from the Hub) is printed at import on CPUs with
    # AVX512-BF16; our 4-bit path is CUDA-only. Elsewhere bitsandbytes prints nothing either way.
    proc = run_python("import dllm_trainer, peft, bitsandbytes.backends.cpu.ops")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gemm_4bit_forward" not in proc.stderr + proc.stdout
