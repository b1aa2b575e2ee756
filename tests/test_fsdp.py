"""FSDP, executed: `python main.py` with configs/accelerate/fsdp.yaml (FSDP2, sharded checkpoints,
rank-0 loading) and 2 CPU processes over gloo, for llada and dream, full fine-tune and LoRA.

- Loss per step equals the same optimizer steps without FSDP (<= 1e-4): one process with
  gradient accumulation 2 sees exactly the micro-batches the two ranks see (rank r gets batch r
  of each pair; llada's trained EOS padding depends on batch composition, so a single batch of 4
  would not be the same run). The noise is seeded per sample, so it is the same noise.
- Checkpoints are written as FSDP sharded state dicts (pytorch_model_fsdp_0/ and optimizer_0/, one
  shard per process); a run resumed from checkpoint-2 ends bitwise where the uninterrupted run did.
- The final model (full fine-tune) or the fused model (LoRA) is one full checkpoint, gathered from
  the shards, that loads in this single process and equals the unsharded run's.
- Activation checkpointing under FSDP: two of the cases train with gradient_checkpointing on (the
  reference does not: the numbers must not change).

On a machine with >= 2 CUDA GPUs the same cases also run on GPUs (not run on CPU-only machines).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifecycle_tl import REPO, clean_env
from test_distributed import free_port

CHAT = REPO / "src" / "dllm_trainer" / "assets" / "chat_small.jsonl"
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
STEPS, SAVE = 4, 2

# (family, lora, gradient_checkpointing, resume): every family x method; exact resume checked for
# one full and one LoRA case (each resume is one more launch of two workers).
CASES = [
    pytest.param("llada", False, True, True, id="llada-full-gc-resume"),
    pytest.param("llada", True, False, False, id="llada-lora"),
    pytest.param("dream", False, False, False, id="dream-full"),
    pytest.param("dream", True, True, True, id="dream-lora-gc-resume"),
]


def model_dir(dst: Path, family: str, fixtures_dir: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_tokenizer import make_tiny_tokenizer

    src = fixtures_dir / f"{family}-tiny"
    dst.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    make_tiny_tokenizer().save_pretrained(str(dst))
    return dst


def job(model: Path, out: Path, family: str, lora: bool, **kw) -> dict:
    cfg = dict(model_name=str(model), dataset_name=str(CHAT), output_dir=str(out), training_method=family,
               train_device="cpu", lora=lora, lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=2,
               num_train_epochs=0, train_steps=STEPS, save_steps=SAVE, save_total_limit=3, max_length=64,
               eval_strategy="no", logging_steps=1, learning_rate=1e-2 if lora else 1e-3,
               learning_rate_schedule="constant", warmup_ratio=0.0, group_by_length=False, seed=7,
               adaptor_name="m")
    cfg.update(kw)
    return cfg


def launch(cfg: dict, tmp: Path, tag: str) -> str:
    f = tmp / f"{tag}.json"
    f.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(f)], cwd=tmp,
                          env=clean_env(tmp, OMP_NUM_THREADS="1", DLLM_CPU_THREADS="1", DISABLE_TQDM="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def steps(out: Path, at: int = STEPS) -> list[tuple[int, float, float]]:
    state = json.loads((out / f"checkpoint-{at}" / "trainer_state.json").read_text())
    return [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def reference(tmp: Path, model: Path, family: str, lora: bool) -> tuple[list, dict]:
    """The unsharded run in this process: 1 process, batch 2, accumulation 2, no checkpointing."""
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.training import export
    from dllm_trainer.training.train import run_training

    cfg = job(model, tmp / "ref", family, lora, num_processes=1, gradient_accumulation_steps=2)
    res = run_training(TrainConfig.from_dict(cfg), log=lambda *_: None)
    if lora:
        fused = export.fuse_adaptor(str(model), res.adaptor_dir, str(tmp / "ref_fused"), family_name=family,
                                    log=lambda *_: None)
        weights = tensors(Path(fused) / "model.safetensors")
    else:
        weights = tensors(Path(res.final_model_dir) / "model.safetensors")
    return steps(tmp / "ref"), weights


def assert_same_steps(ref, got):
    assert [s for s, _, _ in got] == [s for s, _, _ in ref] == list(range(1, STEPS + 1))
    for (step, loss_a, gn_a), (_, loss_b, gn_b) in zip(ref, got):
        assert abs(loss_a - loss_b) <= 1e-4, f"loss differs at step {step}: {ref} vs {got}"
        assert gn_b == pytest.approx(gn_a, rel=1e-3, abs=1e-4), f"grad norm differs at step {step}: {ref} vs {got}"
    assert len({round(loss, 5) for _, loss, _ in got}) == STEPS  # the steps differ: the comparison means something


def run_case(tmp: Path, fixtures_dir: Path, family: str, lora: bool, gc: bool, resume: bool, **hw) -> None:
    model = model_dir(tmp / "model", family, fixtures_dir)
    ref_steps, ref_weights = reference(tmp, model, family, lora)

    out = tmp / "fsdp"
    cfg = job(model, out, family, lora, num_processes=2, accelerate_config_file=str(FSDP_CONFIG),
              gradient_checkpointing=gc, main_process_port=free_port(), **hw)
    log = launch(cfg, tmp, "fsdp")
    assert "2 CPU processes with FSDP2 (full-shard)" in log or "CUDA via accelerate config" in log
    assert_same_steps(ref_steps, steps(out))

    ckpt = out / f"checkpoint-{SAVE}"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):  # sharded state dicts, one file per process
        assert sorted(p.name for p in (ckpt / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()

    final = out / "models" / "m"
    weights = tensors(final / "model.safetensors")
    assert sorted(weights) == sorted(ref_weights)
    # Adam turns float32 rounding differences in tiny gradients into lr-sized steps, so the
    # weights are compared relative to how far training moved them
    init = tensors(model / "model.safetensors")
    moved = sum(((ref_weights[k] - init[k]).float() ** 2).sum() for k in init) ** 0.5
    diff = sum(((weights[k] - ref_weights[k]).float() ** 2).sum() for k in weights) ** 0.5
    assert moved > 0 and diff / moved <= 1e-3, f"the gathered final model differs from the unsharded run's: {diff / moved:.2e}"
    from transformers import AutoModel

    import dllm_trainer.models  # noqa: F401 - registers LLaDA / Dream

    loaded = AutoModel.from_pretrained(str(final))  # one full checkpoint, loaded by one process
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(loaded(ids).logits).all()

    if resume:
        out2 = tmp / "resumed"
        out2.mkdir()
        shutil.copytree(ckpt, out2 / ckpt.name)
        log2 = launch({**cfg, "output_dir": str(out2), "resume_from_checkpoint": "latest",
                       "main_process_port": free_port()}, tmp, "resume")
        assert f"resuming from {out2 / ckpt.name}" in log2
        assert steps(out2)[SAVE:] == steps(out)[SAVE:]  # bitwise: same losses and grad norms
        again = tensors(out2 / "models" / "m" / "model.safetensors")
        assert all(torch.equal(again[k], weights[k]) for k in weights), "the resumed run ended elsewhere"


@pytest.mark.slow
@pytest.mark.parametrize("family,lora,gc,resume", CASES)
def test_fsdp_on_two_cpu_processes(tmp_path, fixtures_dir, one_thread, family, lora, gc, resume):
    run_case(tmp_path, fixtures_dir, family, lora, gc, resume)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (the CPU cases above run the same FSDP code over gloo)")
@pytest.mark.parametrize("family,lora,gc,resume", CASES[:1] + CASES[3:])
def test_fsdp_on_two_gpus(tmp_path, fixtures_dir, family, lora, gc, resume):
    run_case(tmp_path, fixtures_dir, family, lora, gc, resume, train_device="cuda", gpu_ids="0,1", dtype="float32")
