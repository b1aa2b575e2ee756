"""Helpers for the reliability/security tests (test_resume, test_faults, test_bad_inputs, test_security)."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
ASSETS = SRC / "dllm_trainer" / "assets"
CHAT = ASSETS / "chat_small.jsonl"
FIXTURES = Path(os.environ.get("DLLM_FIXTURES", REPO / "tests" / "fixtures"))
EVENT_PREFIX = "[dllm-event] "


def make_llada_dir(dst: Path, *, tokenizer_kwargs: dict | None = None, config_changes: dict | None = None) -> Path:
    """The llada-tiny fixture (writable copy) with the tiny test tokenizer saved beside it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_tokenizer import make_tiny_tokenizer

    src = FIXTURES / "llada-tiny"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(src / name, dst / name)
    make_tiny_tokenizer(**(tokenizer_kwargs or {})).save_pretrained(str(dst))
    if config_changes:
        conf = json.loads((dst / "config.json").read_text())
        for k, v in config_changes.items():
            if v is None:
                conf.pop(k, None)
            else:
                conf[k] = v
        (dst / "config.json").write_text(json.dumps(conf, indent=2))
    return dst


def subprocess_env(**extra: str) -> dict[str, str]:
    """A deterministic, offline environment for worker / main.py subprocesses."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TFL_", "_TFL_", "WANDB_", "ACCELERATE_", "CUDA_VISIBLE"))}
    env.update(
        PYTHONPATH=str(SRC),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        DISABLE_TQDM="1",
    )
    env.update(extra)
    return env


def llada_job(model_dir: Path, output_dir: Path, **kw) -> dict:
    cfg = dict(model_name=str(model_dir), dataset_name=str(CHAT), output_dir=str(output_dir),
               training_method="llada", train_device="cpu", lora=False, batch_size=4, gradient_accumulation_steps=2,
               num_train_epochs=0, train_steps=5, save_steps=3, max_length=64, eval_strategy="no", logging_steps=1,
               learning_rate=1e-3, save_total_limit=3, seed=7)
    cfg.update(kw)
    return cfg


class Worker:
    """`python -m dllm_trainer.training.train --config-json F` in a subprocess; stdout parsed for events.

    kill_at_checkpoint: SIGKILL the worker as soon as the checkpoint event of that step appears."""

    def __init__(self, cfg: dict, cfg_path: Path, *, kill_at_checkpoint: int | None = None, env=None):
        cfg_path.write_text(json.dumps(cfg))
        os.makedirs(cfg["output_dir"], exist_ok=True)
        self.err_path = cfg_path.with_suffix(".stderr")
        self.kill_at = kill_at_checkpoint
        self.lines: list[str] = []
        self.events: list[dict] = []
        self.killed_after: dict | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dllm_trainer.training.train", "--config-json", str(cfg_path)],
            stdout=subprocess.PIPE, stderr=open(self.err_path, "w"), text=True, env=env or subprocess_env(),
            cwd=cfg["output_dir"],
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            idx = line.find(EVENT_PREFIX)
            if idx < 0:
                continue
            try:
                ev = json.loads(line[idx + len(EVENT_PREFIX):])
            except json.JSONDecodeError:
                continue
            self.events.append(ev)
            if self.kill_at is not None and ev.get("event") == "checkpoint" and ev.get("step") == self.kill_at:
                self.proc.send_signal(signal.SIGKILL)
                self.killed_after = ev

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_bitwise_equal(a: Path, b: Path) -> None:
    import torch

    ta, tb = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} of {len(ta)} tensors differ, e.g. {different[:3]}"


def run_main(config: dict, cfg_path: Path, *, env=None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """`python main.py --config F.json` as a user would run it."""
    cfg_path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(cfg_path)], capture_output=True,
                          text=True, env=env or subprocess_env(), timeout=timeout, cwd=cwd or cfg_path.parent)


@functools.cache
def _plugin_main():
    """main.py (the Transformer Lab entry), loaded once as a module."""
    spec = importlib.util.spec_from_file_location("dllm_plugin_main", REPO / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main_in_process(argv, capfd) -> tuple[int, str]:
    """main.main(argv) in this process (monkeypatches apply): its exit code and console text."""
    try:
        code = _plugin_main().main(argv)
    except SystemExit as e:
        code = e.code
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def pids_alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_until(pred, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()
