"""Distributed runs on CPU through the standalone entry point (`python main.py --config ...`).

- invariance: 1 worker with batch 8 and 2 workers with batch 4 see the same samples in every
  optimizer step, draw the same masks (noise seeded per sample) and normalise by the same global
  token count, so the logged loss (and gradient norm) must agree at every step to float32
  precision. Dropout is switched off (a model copy with dropout 0), full fine-tuning, no length
  grouping, constant learning rate so every step changes the weights.
- multi-node: the same 2 x 4 run as two "machines" on loopback (two launches, machine_rank 0
  and 1, 127.0.0.1) must pass and match too.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle_tl import REPO, clean_env

ASSETS = REPO / "src" / "dllm_trainer" / "assets"
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nodrop_bert(minilm, tmp_path_factory) -> Path:
    """MiniLM as a complete BertForMaskedLM (head initialised once, with a fixed seed) with dropout 0."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path_factory.mktemp("nodrop_bert")
    conf = AutoConfig.from_pretrained(str(minilm), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(str(minilm), config=conf)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(out)
    return out


def job(tmp: Path, model: Path, name: str, **kw) -> dict:
    cfg = dict(model_name=str(model), dataset_name=str(ASSETS / "chat_small.jsonl"), output_dir=str(tmp / name),
               training_method="bert", train_device="cpu", lora=False, max_length=64, num_train_epochs=0,
               train_steps=STEPS, logging_steps=1, save_steps=STEPS, eval_strategy="no", group_by_length=False,
               learning_rate=1e-3, learning_rate_schedule="constant", warmup_ratio=0.0, seed=11, adaptor_name=name)
    cfg.update(kw)
    return cfg


def start(tmp: Path, cfg: dict, tag: str | None = None) -> subprocess.Popen:
    f = tmp / f"{tag or Path(cfg['output_dir']).name}.json"
    f.write_text(json.dumps(cfg))
    cwd = tmp / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(f)], cwd=cwd,
                            env=clean_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400, check: bool = True) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"run timed out:\n{out[-4000:]}")
    if check:
        assert proc.returncode == 0, out[-4000:]
    return out


def logged(output_dir: str) -> list[tuple[int, float, float]]:
    """(step, loss, grad_norm) from the final checkpoint's trainer_state (full precision)."""
    state = json.loads((Path(output_dir) / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def one_worker(nodrop_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_worker")
    cfg = job(tmp, nodrop_bert, "w1", num_processes=1, batch_size=8)
    finish(start(tmp, cfg))
    return logged(cfg["output_dir"])


def assert_same_steps(a, b):
    assert [s for s, _, _ in a] == list(range(1, STEPS + 1)) == [s for s, _, _ in b]
    for (step, loss_a, gn_a), (_, loss_b, gn_b) in zip(a, b):
        assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-5), f"loss differs at step {step}: {a} vs {b}"
        assert gn_b == pytest.approx(gn_a, rel=1e-3, abs=1e-4), f"grad norm differs at step {step}: {a} vs {b}"


@pytest.mark.slow
def test_two_cpu_workers_match_one_worker_at_every_step(one_worker, nodrop_bert, tmp_path):
    cfg = job(tmp_path, nodrop_bert, "w2", num_processes=2, batch_size=4, main_process_port=free_port())
    out = finish(start(tmp_path, cfg))
    assert "2 CPU processes" in out
    two = logged(cfg["output_dir"])
    assert_same_steps(one_worker, two)
    assert len({round(loss, 6) for _, loss, _ in two}) == STEPS  # different batches: the comparison means something
    assert (Path(cfg["output_dir"]) / "models" / "w2" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_machines_on_loopback(one_worker, nodrop_bert, tmp_path):
    """Two launches, machine ranks 0 and 1 on 127.0.0.1, sharing the output folder as machines
    on a shared filesystem do (checkpoints hold every rank's RNG state)."""
    port = free_port()
    common = dict(num_processes=1, batch_size=4, num_machines=2, main_process_ip="127.0.0.1", main_process_port=port,
                  adaptor_name="multi")
    rank0 = job(tmp_path, nodrop_bert, "shared", machine_rank=0, **common)
    rank1 = dict(rank0, machine_rank=1)
    p0 = start(tmp_path, rank0, "rank0")
    p1 = start(tmp_path, rank1, "rank1")
    out1 = finish(p1, check=False)
    out0 = finish(p0, check=False)
    assert (p0.returncode, p1.returncode) == (0, 0), f"rank 0:\n{out0[-3000:]}\n\nrank 1:\n{out1[-3000:]}"
    assert "machine 0 of 2" in out0 and "machine 1 of 2" in out1
    assert "machine rank 1 finished" in out1 and "final model 'multi'" in out0
    assert_same_steps(one_worker, logged(rank0["output_dir"]))
    assert (Path(rank0["output_dir"]) / "models" / "multi" / "model.safetensors").is_file()
    assert (Path(rank0["output_dir"]) / "dllm_config.machine1.json").is_file()


_LEAVE = """
import torch.distributed as dist
from accelerate import PartialState
from dllm_trainer.training.distributed import leave_process_group
state = PartialState(cpu=True)
before = dist.is_initialized()
leave_process_group()
print(f"rank {state.process_index}: group before {before}, after {dist.is_initialized()}", flush=True)
"""


def test_workers_leave_the_process_group_before_exiting(tmp_path):
    """A worker destroys its process group when its run is done (after every rank got there), so
    the interpreter's teardown does not meet gloo's threads still running."""
    script = tmp_path / "leave.py"
    script.write_text(_LEAVE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script)], env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: group before True, after False" in proc.stdout
