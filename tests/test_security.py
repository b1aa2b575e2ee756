"""Security: remote code, secrets, templates, shells.

- trust_remote_code is off unless the config says so; a model's own Python code (auto_map) never
  runs by default; turning it on prints a warning.
- W&B / Hub tokens in the environment never reach the console, the logs, TensorBoard events, W&B's
  offline files, metrics.json, the saved config copy, the model card or the metadata (one full job
  with unique planted tokens, every output file grepped).
- Jinja templates from the config render in the sandbox, end to end: an escape attempt fails the
  job with one clear message and runs nothing.
- No shell anywhere: the launcher builds argument lists, and a job whose paths are full of shell
  syntax (`; touch`, `$(...)`, backticks) trains normally and runs none of it.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from dllm_trainer.training import launcher
from dllm_trainer.config import TrainConfig
from rel_helpers import CHAT, REPO, SRC, make_llada_dir, run_main_in_process, subprocess_env


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory) -> Path:
    return make_llada_dir(tmp_path_factory.mktemp("model") / "llada")


# ---------------------------------------------------------------------------------------------
# trust_remote_code
# ---------------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_the_config_turns_it_on():
    base = {"model_name": "m", "dataset_name": "d"}
    assert TrainConfig.trust_remote_code is False or TrainConfig().trust_remote_code is False
    assert TrainConfig.from_dict(base).trust_remote_code is False
    assert TrainConfig.from_dict({**base, "trust_remote_code": "false"}).trust_remote_code is False
    assert TrainConfig.from_dict({**base, "trust_remote_code": ""}).trust_remote_code is False
    assert TrainConfig.from_dict({**base, "trust_remote_code": "true"}).trust_remote_code is True
    # nothing in the package turns it on by itself
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), \
                    f"{path.relative_to(REPO)}:{node.value.lineno} passes trust_remote_code=True"


def _evil_model(dst: Path, model_type: str, base: Path) -> Path:
    """A model folder whose auto_map points at Python files that leave a marker when imported."""
    import shutil

    shutil.copytree(base, dst)
    marker = dst / "REMOTE_CODE_RAN"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (dst / "configuration_evil.py").write_text(code + "from transformers import PretrainedConfig\n"
                                               "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (dst / "modeling_evil.py").write_text(code)
    conf = json.loads((dst / "config.json").read_text())
    conf["model_type"] = model_type
    conf["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(conf))
    return marker


def test_a_models_own_code_never_runs_by_default(tmp_path, llada_dir, capfd, no_workers):
    from dllm_trainer.training.loading import load_for_training

    # a known architecture with an auto_map: our built-in LLaDA is used, the shipped code is not imported
    marker = _evil_model(tmp_path / "llada-with-code", "llada", llada_dir)
    cfg = TrainConfig.from_dict({"model_name": str(tmp_path / "llada-with-code"), "dataset_name": str(CHAT),
                                 "output_dir": str(tmp_path / "o"), "training_method": "llada", "max_length": 64,
                                 "train_device": "cpu", "lora": False})
    loaded = load_for_training(cfg, log=lambda *_: None)
    assert type(loaded.model).__module__.startswith("dllm_trainer.models")
    assert not marker.exists()

    # an unknown architecture that only its own code could load: a clear error, nothing runs
    marker = _evil_model(tmp_path / "unknown-with-code", "evil", llada_dir)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model_name": str(tmp_path / "unknown-with-code"), "dataset_name": str(CHAT),
                               "output_dir": str(tmp_path / "out"), "training_method": "llada", "train_device": "cpu", "max_length": 64}))
    code, console = run_main_in_process(["--config", str(job)], capfd)
    assert code == 2 and "Traceback" not in console
    errors = [l for l in console.splitlines() if l.startswith("[dllm-error]")]
    assert len(errors) == 1 and "unknown-with-code" in errors[0] and "trust_remote_code is off" in errors[0], console
    assert not marker.exists()


def test_turning_trust_remote_code_on_warns(tmp_path, llada_dir, capfd, no_workers):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model_name": str(llada_dir), "dataset_name": str(tmp_path / "missing.jsonl"),
                               "output_dir": str(tmp_path / "out"), "training_method": "llada", "train_device": "cpu",
                               "trust_remote_code": True, "max_length": 64}))
    code, console = run_main_in_process(["--config", str(job)], capfd)
    assert code == 2  # (the dataset is missing: the job stops before training)
    assert "[dllm] warning: trust_remote_code is on: Python code shipped with the model" in console

    job.write_text(json.dumps({**json.loads(job.read_text()), "trust_remote_code": False}))
    code, console = run_main_in_process(["--config", str(job)], capfd)
    assert "warning: trust_remote_code" not in console


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED_TEMPLATE') }}",
    "{{ instruction.__class__.__base__.__subclasses__() }}",
    "{% set x = [] %}{{ x.append(1) }}{{ instruction }}",
    "{{ self.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('touch PWNED_TEMPLATE').read() }}",
]


@pytest.mark.parametrize("template", ESCAPES, ids=range(len(ESCAPES)))
def test_templates_from_the_config_render_in_the_sandbox(tmp_path, llada_dir, capfd, no_workers, monkeypatch, template):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(12)))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model_name": str(llada_dir), "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
                               "training_method": "llada", "train_device": "cpu", "max_length": 64, "input_template": template,
                               "output_template": "{{ output }}"}))
    code, console = run_main_in_process(["--config", str(job)], capfd)
    assert code == 2 and "Traceback" not in console
    errors = [l for l in console.splitlines() if l.startswith("[dllm-error]")]
    assert len(errors) == 1 and "input_template" in errors[0], console
    assert not list(tmp_path.rglob("PWNED_TEMPLATE"))


def test_a_safe_template_renders_the_row(tmp_path):
    from dllm_trainer.data import render_template

    assert render_template("Q: {{ instruction | upper }}{% if input %} ({{ input }}){% endif %}",
                           {"instruction": "hi", "input": None}) == "Q: HI"


# ---------------------------------------------------------------------------------------------
# Shells
# ---------------------------------------------------------------------------------------------


def test_no_shell_anywhere_in_the_package():
    for path in list(SRC.rglob("*.py")) + [REPO / "main.py"]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "shell" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is False):
                raise AssertionError(f"{path.relative_to(REPO)}:{node.value.lineno}: subprocess with shell=...")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                    and node.attr in ("system", "popen", "execl", "execlp", "spawnl", "spawnlp"):
                raise AssertionError(f"{path.relative_to(REPO)}: os.{node.attr}")


def test_the_launch_command_is_an_argument_list_that_carries_no_user_text(tmp_path):
    nasty = "x; touch /tmp/pwned_dllm $(touch /tmp/pwned_dllm2) `id`"
    cfg = TrainConfig.from_dict({"model_name": f"/models/{nasty}", "dataset_name": f"/data/{nasty}.jsonl",
                                 "output_dir": str(tmp_path / nasty), "train_device": "cpu", "num_processes": 2,
                                 "system_prompt": nasty, "instruction_template": nasty, "sample_prompts": nasty})
    config_json = str(tmp_path / nasty / "dllm_config.json")
    plan = launcher.build_launch(cfg, config_json, gpu_count=0)
    assert isinstance(plan.argv, list) and all(isinstance(a, str) for a in plan.argv)
    # the user's strings travel in the JSON config file, never on the command line
    assert [a for a in plan.argv if nasty in a] == [config_json]
    assert plan.argv[-2:] == ["--config-json", config_json]


@pytest.mark.slow
def test_a_job_full_of_shell_syntax_and_secrets_runs_none_of_it_and_leaks_nothing(tmp_path, llada_dir):
    tokens = {"WANDB_API_KEY": "wandbsecretAAA" + "1" * 26, "HF_TOKEN": "hf_secretBBBB" + "2" * 24,
              "HUGGING_FACE_HUB_TOKEN": "hf_secretCCCC" + "3" * 24}
    weird = "run; touch pwned_a $(touch pwned_b) `touch pwned_c` & touch pwned_d |"
    data_dir = tmp_path / weird
    data_dir.mkdir()
    data = data_dir / f"{weird}.jsonl"
    data.write_text(CHAT.read_text())
    out = tmp_path / f"out {weird}"
    cfg = {"model_name": str(llada_dir), "dataset_name": str(data), "output_dir": str(out), "training_method": "llada",
           "train_device": "cpu", "lora": True, "lora_r": 4, "lora_alpha": 8, "batch_size": 4, "max_length": 64,
           "num_train_epochs": 0, "train_steps": 3, "save_steps": 2, "logging_steps": 1, "eval_steps": 2,
           "log_to_wandb": True, "adaptor_name": "sec-test", "system_prompt": "$(id);`id`",
           }
    job = tmp_path / "job.json"
    job.write_text(json.dumps(cfg))
    env = subprocess_env(WANDB_BASE_URL="http://127.0.0.1:9", HOME=str(tmp_path / "home"), **tokens)
    (tmp_path / "home").mkdir()
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(job)], capture_output=True, text=True,
                          env=env, timeout=400, cwd=tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert (out / "models" / "sec-test" / "README.md").is_file()
    assert (out / "models" / "sec-test" / "dllm_training.json").is_file()
    assert (out / "metrics.json").is_file() and (out / "dllm_config.json").is_file()
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard events written"
    assert (out / "wandb").is_dir(), "W&B offline run expected"

    # no shell ran anything
    for name in ("pwned_a", "pwned_b", "pwned_c", "pwned_d"):
        hits = [p for p in tmp_path.rglob(name) if p.name == name]
        assert not hits and not (Path(os.getcwd()) / name).exists(), f"{name} was created: a shell ran user text"

    # no token anywhere
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20
    for key, token in tokens.items():
        assert token not in console, f"{key} printed on the console"
        leaked = [str(p.relative_to(tmp_path)) for p in files if token.encode() in p.read_bytes()
                  and p != job]
        assert not leaked, f"{key} written to {leaked}"
