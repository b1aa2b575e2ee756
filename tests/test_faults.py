"""Faults during training: a non-finite loss, a full disk while saving, a worker that dies.

- nonfinite_loss stop: the run ends with a NonFiniteLossError naming the step; the checkpoints
  saved before stay valid; in (emulated) Transformer Lab the job is FAILED (one line, no traceback).
- nonfinite_loss skip: bad micro-batches are skipped and counted (metrics), at most 10 in a row.
- a checkpoint whose weights are not finite is never written.
- ENOSPC while writing a checkpoint (or the final model): CheckpointWriteError naming the folder
  and the last complete checkpoint, which is kept; no half-written checkpoint-N is left.
- a rank of a 2-process CPU job SIGKILLed mid-training: main.py exits non-zero within 10 s,
  names the dead rank, and no worker process survives.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from dllm_trainer.training import checkpoints as ck
from dllm_trainer.training.checkpoints import CheckpointWriteError, NonFiniteWeightsError
from dllm_trainer.config import TrainConfig
from dllm_trainer.training.trainer import NonFiniteLossError
from rel_helpers import CHAT, REPO, llada_job, make_llada_dir, pids_alive, subprocess_env


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory) -> Path:
    return make_llada_dir(tmp_path_factory.mktemp("model") / "llada")


class StepProbe(TrainerCallback):
    """Records the optimizer step being computed (global_step + 1) for patched loss functions."""

    def __init__(self):
        self.step = 0

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step + 1


def nan_weights_at(monkeypatch, probe: StepProbe, bad_steps):
    """Make the loss NaN in the optimizer steps `bad_steps` (the data/weights stay untouched)."""
    import dllm_trainer.training.trainer as tr

    real = tr.token_weights

    def patched(*a, **kw):
        w = real(*a, **kw)
        return w * float("nan") if probe.step in bad_steps else w

    monkeypatch.setattr(tr, "token_weights", patched)


def train(cfg: dict, **kw):
    from dllm_trainer.training.train import run_training

    return run_training(TrainConfig.from_dict(cfg), log=lambda *_: None, **kw)


# ---------------------------------------------------------------------------------------------
# Non-finite loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_loss_stop_names_the_step_and_keeps_the_checkpoint(tmp_path, llada_dir, monkeypatch, one_thread):
    probe = StepProbe()
    nan_weights_at(monkeypatch, probe, bad_steps=range(5, 100))
    cfg = llada_job(llada_dir, tmp_path / "out", train_steps=7, save_steps=3)
    with pytest.raises(NonFiniteLossError) as exc:
        train(cfg, extra_callbacks=[probe])
    msg = str(exc.value)
    assert "non-finite (nan) at step 5" in msg and "nonfinite_loss: skip" in msg
    out = tmp_path / "out"
    assert ck.is_valid_checkpoint(str(out / "checkpoint-3"))
    assert ck.latest_valid_checkpoint(str(out)) == str(out / "checkpoint-3")
    assert not (out / "final_model").exists() and not list(out.glob(".tmp-checkpoint-*"))


@pytest.mark.slow
def test_nonfinite_loss_skip_counts_the_skipped_micro_batches(tmp_path, llada_dir, monkeypatch, one_thread, capsys):
    probe = StepProbe()
    nan_weights_at(monkeypatch, probe, bad_steps={2, 4})
    cfg = llada_job(llada_dir, tmp_path / "out", train_steps=5, save_steps=5, nonfinite_loss="skip")
    result = train(cfg, extra_callbacks=[probe])
    assert result.metrics["skipped_nonfinite_steps"] == 4  # 2 steps x 2 micro-batches
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["skipped_nonfinite_steps"] == 4
    assert "non-finite loss at step 4; skipping this micro-batch (4 skipped so far)" in capsys.readouterr().out
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "final_model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_skipped_count_carries_across_a_resume(tmp_path, llada_dir, monkeypatch, one_thread):
    probe = StepProbe()
    nan_weights_at(monkeypatch, probe, bad_steps={2, 4})
    out = tmp_path / "out"
    first = train(llada_job(llada_dir, out, train_steps=3, save_steps=3, nonfinite_loss="skip"), extra_callbacks=[probe])
    assert first.metrics["skipped_nonfinite_steps"] == 2
    assert ck.skipped_steps_in(str(out / "checkpoint-3")) == 2
    resumed = train(llada_job(llada_dir, out, train_steps=5, save_steps=3, nonfinite_loss="skip",
                              resume_from_checkpoint="latest"), extra_callbacks=[probe])
    assert resumed.global_step == 5
    assert resumed.metrics["skipped_nonfinite_steps"] == 4  # 2 before the resume + 2 in step 4


def test_skipped_count_of_a_checkpoint_without_record_is_zero(tmp_path):
    assert ck.skipped_steps_in(str(tmp_path)) == 0
    (tmp_path / ck.MANIFEST_NAME).write_text("{not json")
    assert ck.skipped_steps_in(str(tmp_path)) == 0


def test_skip_policy_gives_up_after_ten_in_a_row():
    from types import SimpleNamespace

    from dllm_trainer.training.trainer import MDLMTrainer

    model = torch.nn.Linear(2, 2)
    fake = SimpleNamespace(diffusion=SimpleNamespace(nonfinite_loss="skip", max_consecutive_skips=10),
                           _consecutive_skips=0, skipped_steps=0, state=SimpleNamespace(global_step=6))
    nan = torch.tensor(float("nan"))
    for _ in range(10):
        assert MDLMTrainer._check_finite(fake, nan, model).item() == 0.0
    assert fake.skipped_steps == 10
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        MDLMTrainer._check_finite(fake, nan, model)
    fake._consecutive_skips = 3
    MDLMTrainer._check_finite(fake, torch.tensor(1.0), model)  # a good loss resets the run of skips
    assert fake._consecutive_skips == 0 and fake.skipped_steps == 10


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=8), model=model,
                              args=SimpleNamespace(should_save=True), accelerator=None)
    (tmp_path / "checkpoint-4").mkdir()
    called = []
    with pytest.raises(NonFiniteWeightsError, match="non-finite .* by step 8; checkpoint checkpoint-8 was not written"):
        ck.AtomicCheckpointWriter(trainer, str(tmp_path)).save(model, lambda: called.append(1))
    assert not called and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


@pytest.mark.slow
def test_nonfinite_loss_fails_the_transformer_lab_job(tmp_path):
    """End to end: a model whose weights hold an inf makes the very first loss NaN; the job is FAILED
    with the step named, one error line, no traceback, no model registered."""
    from safetensors.torch import load_file, save_file

    from lifecycle_tl import Workspace

    bad = make_llada_dir(tmp_path / "inf-model")
    w = load_file(str(bad / "model.safetensors"))
    name = next(k for k in w if k.endswith("ff_out.weight"))
    w[name][0, 0] = float("inf")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    ws = Workspace.create(tmp_path)
    form = {k: v for k, v in llada_job(bad, tmp_path, train_steps=3).items()
            if k not in ("model_name", "dataset_name", "output_dir")}
    job = ws.create_job("exp", form, model_name=str(bad), dataset_name=str(CHAT), adaptor_name="never")
    proc = ws.run_plugin(job, cwd=tmp_path, timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [l for l in console.splitlines() if l.startswith("[dllm-error]")]
    assert len(errors) == 1 and "the training loss became non-finite (nan) at step 1" in errors[0], console[-3000:]
    assert "Traceback" not in console
    assert ws.process_exited(job.job_id) == "FAILED"
    details = ws.job_json(job.job_id)["job_data"]["completion_details"]
    assert "non-finite (nan) at step 1" in details
    assert not (ws.workspace / "models" / "never").exists()


# ---------------------------------------------------------------------------------------------
# Out of disk space
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_last_complete_checkpoint(tmp_path, llada_dir, monkeypatch, one_thread):
    real_save = torch.save

    def full_disk_save(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt") and "checkpoint-6" in str(f):
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 partial")  # what a full disk leaves behind
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed") from OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk_save)
    out = tmp_path / "out"
    cfg = llada_job(llada_dir, out, train_steps=8, save_steps=3)
    with pytest.raises(CheckpointWriteError) as exc:
        train(cfg)
    msg = str(exc.value)
    assert f"out of disk space while writing checkpoint checkpoint-6 to {out}" in msg
    assert f"the last complete checkpoint {out / 'checkpoint-3'} is kept" in msg
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert ck.is_valid_checkpoint(str(out / "checkpoint-3"))


@pytest.mark.slow
def test_disk_full_while_saving_the_final_model_is_one_clear_error(tmp_path, llada_dir, monkeypatch, one_thread):
    import transformers.modeling_utils as mu

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    cfg = llada_job(llada_dir, out, train_steps=3, save_steps=3)

    class BreakAfterTraining(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            monkeypatch.setattr(mu, "safe_save_file", no_space)

    with pytest.raises(CheckpointWriteError, match=r"out of disk space while writing the final model to .*final_model; "
                                                    r"the last complete checkpoint .*checkpoint-3 is kept"):
        train(cfg, extra_callbacks=[BreakAfterTraining()])
    assert ck.is_valid_checkpoint(str(out / "checkpoint-3"))


# ---------------------------------------------------------------------------------------------
# A worker dies
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_rank_fails_the_whole_job_fast_and_leaves_no_process(tmp_path, llada_dir):
    import psutil

    cfg = llada_job(llada_dir, tmp_path / "out", num_processes=2, train_steps=100000, save_steps=100000,
                    logging_steps=1000)
    cfg_path = tmp_path / "job.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
                            cwd=tmp_path)
    lines, workers, family = [], [], set()
    try:
        for line in proc.stdout:
            lines.append(line)
            if "[dllm] training started" in line:
                break
        kids = psutil.Process(proc.pid).children(recursive=True)
        family = {k.pid for k in kids}
        workers = [k for k in kids if "dllm_trainer.training.train" in " ".join(k.cmdline())
                   and "accelerate" not in " ".join(k.cmdline())]
        assert len(workers) >= 2, "".join(lines)[-3000:]
        time.sleep(1.0)  # mid-training
        victim = workers[-1]
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
        lines.append(proc.stdout.read())
    finally:
        if proc.poll() is None:
            proc.kill()
    console = "".join(lines)
    assert rc != 0
    assert elapsed < 10, f"main.py took {elapsed:.1f} s to fail after a worker was killed"
    assert "Traceback" not in console
    errors = [l for l in console.splitlines() if l.startswith("[dllm-error]")]
    assert len(errors) == 1 and "was killed by SIGKILL" in errors[0], console[-3000:]
    assert not pids_alive(family | {w.pid for w in workers}), "worker processes survived the job"
