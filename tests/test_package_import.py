"""What importing the package does to a fresh process: nothing heavy (no torch / transformers on
the command line, config and launcher side), model registration, and quiet logs."""
import subprocess
import sys

from conftest import REPO


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_the_command_line_config_and_launcher_import_neither_torch_nor_transformers(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_name": "m", "dataset_name": "d", "output_dir": "o", "learning_rate": -1}')
    proc = run_python(
        "import sys, contextlib, io\n"
        "import dllm_trainer, dllm_trainer.cli, dllm_trainer.app, dllm_trainer.config, dllm_trainer.preflight\n"
        "import dllm_trainer.training.launcher, dllm_trainer.training.events, dllm_trainer.hosts.standalone\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert dllm_trainer.cli.main(['--help']) == 0\n"
        f"assert dllm_trainer.cli.main(['train', '--config', {str(bad)!r}]) == 2\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'accelerate') if m in sys.modules))"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    assert "learning_rate must be > 0" in proc.stderr


def test_registration_with_the_auto_classes(llada_tiny):
    """After `import dllm_trainer`, transformers' Auto model classes find our LLaDA/Dream (the first
    import of transformers.models.auto.modeling_auto registers them: dllm_trainer.models), also when
    transformers was imported first."""
    code = (
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('llada')).__name__, type(AutoConfig.for_model('Dream')).__name__)\n"
    )
    proc = run_python("import dllm_trainer\nfrom transformers import AutoModel\n" + code +
                      f"m = AutoModel.from_pretrained({str(llada_tiny)!r})\nprint(type(m).__module__, type(m).__name__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LLaDAConfig", "DreamConfig", "dllm_trainer.models.llada", "LLaDAModelLM"]
    proc = run_python("from transformers import AutoModel\nimport dllm_trainer\n" + code)
    assert proc.stdout.split() == ["LLaDAConfig", "DreamConfig"], proc.stderr[-2000:]


def test_bitsandbytes_cpu_kernel_warning_is_silenced():
    # The warning (an optional CPU 4-bit kernel from the Hub) is printed at import on CPUs with
    # AVX512-BF16; our 4-bit path is CUDA-only. Elsewhere bitsandbytes prints nothing either way.
    proc = run_python("import dllm_trainer, peft, bitsandbytes.backends.cpu.ops")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gemm_4bit_forward" not in proc.stderr + proc.stdout


def test_checking_a_bert_job_does_not_import_model_code(tmp_path, minilm):
    """The launching process checks a local BERT model's config and tokenizer and the dataset
    (preflight) without transformers' model code or ours (the job then stops at the hardware check)."""
    import json

    from rel_helpers import CHAT

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model_name": str(minilm), "dataset_name": str(CHAT), "output_dir": str(tmp_path / "o"),
                               "training_method": "bert", "max_length": 64, "train_device": "cuda", "gpu_ids": "63"}))
    proc = run_python(
        "import sys\n"
        "import dllm_trainer.cli\n"
        f"assert dllm_trainer.cli.main(['train', '--config', {str(job)!r}]) == 2\n"
        "print(sorted(m for m in ('transformers.modeling_utils', 'dllm_trainer.models', 'peft') if m in sys.modules))"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpu_ids" in proc.stderr or "no CUDA GPU is visible" in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_worker_without_4bit_leaves_bitsandbytes_out():
    """peft (imported by transformers' Trainer) imports bitsandbytes when installed, and that imports
    torch's compiler stack; a worker that loads nothing in 4-bit keeps it out (less memory)."""
    code = (
        "import sys\n"
        "from dllm_trainer.config import TrainConfig\n"
        "from dllm_trainer.training.train import leave_out_bitsandbytes\n"
        "cfg = TrainConfig.from_dict({'model_name': 'm', 'dataset_name': 'd.jsonl', 'train_device': '%s', "
        "'load_in_4bit': %s})\n"
        "leave_out_bitsandbytes(cfg)\n"
        "import transformers.trainer, peft, dllm_trainer.training.trainer\n"
        "from peft.import_utils import is_bnb_available\n"
        "print(sys.modules.get('bitsandbytes') is not None, is_bnb_available())\n"
    )
    plain = run_python(code % ("cpu", "False"))
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.split() == ["False", "False"]
    quantised = run_python(code % ("cuda", "True"))
    assert quantised.returncode == 0, quantised.stderr[-2000:]
    assert quantised.stdout.split() == ["True", "True"]
