"""Exact resume and atomic, validated checkpoints (checkpoints.py, MDLMTrainer._save_checkpoint).

End-to-end (slow): a worker SIGKILLed right after a checkpoint and resumed with 'latest' reaches
bitwise the same final weights as the same run uninterrupted (full fine-tune and LoRA with
dropout; gradient accumulation 2; an odd number of steps; the checkpoint falls mid-way through the
second epoch and the resumed run crosses into the third); a newer, corrupt checkpoint beside the
good one stops 'latest' with what is wrong, and the good one named by path resumes; resuming a run whose checkpoint already holds the last step trains no
extra step. Fast: checkpoint validation, 'latest' selection, rotation, stale staging folders,
the epoch-seeded sampler.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dllm_trainer.training import checkpoints as ck
from dllm_trainer.errors import ConfigError
from dllm_trainer.hosts.standalone import StandaloneReporter
from rel_helpers import Worker, assert_bitwise_equal, llada_job, make_llada_dir


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory) -> Path:
    return make_llada_dir(tmp_path_factory.mktemp("model") / "llada")


# ---------------------------------------------------------------------------------------------
# Kill and resume, end to end
# ---------------------------------------------------------------------------------------------

# 57 training rows, batch 4, accumulation 2: 15 micro-batches = 8 optimizer steps per epoch (the
# last one a single micro-batch). Checkpoint 10 lies in epoch 1; the resumed run crosses into epoch 2.
STEPS, SAVE = 19, 10


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_after_checkpoint_then_resume_latest_is_bitwise_identical(tmp_path, llada_dir, lora):
    extra = dict(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.1) if lora else {}
    ref_cfg = llada_job(llada_dir, tmp_path / "ref", train_steps=STEPS, save_steps=SAVE, **extra)
    run_cfg = llada_job(llada_dir, tmp_path / "run", train_steps=STEPS, save_steps=SAVE, **extra)
    ref = Worker(ref_cfg, tmp_path / "ref.json")
    killed = Worker(run_cfg, tmp_path / "run.json", kill_at_checkpoint=SAVE)
    assert ref.wait() == 0, ref.stderr[-3000:]
    assert killed.wait() == -9, f"not killed after the checkpoint:\n{killed.stdout[-2000:]}{killed.stderr[-2000:]}"
    out = tmp_path / "run"
    ckpt = out / f"checkpoint-{SAVE}"
    assert killed.killed_after["path"] == str(ckpt)
    assert ck.checkpoint_problems(str(ckpt)) == []
    assert not (out / "final_model").exists() and not (out / "adaptors").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert 1 < state["epoch"] < 2  # mid-way through the second epoch

    spec = "latest"
    if not lora:
        # A newer checkpoint that is broken (truncated weights): 'latest' stops and says so, the
        # broken folder stays; the named older checkpoint resumes exactly.
        broken = out / "checkpoint-15"
        shutil.copytree(ckpt, broken)
        w = broken / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        refused = Worker({**run_cfg, "resume_from_checkpoint": "latest"}, tmp_path / "refused.json")
        assert refused.wait() == 2
        assert "checkpoint-15 (step 15) cannot be resumed: model.safetensors is truncated or padded" in refused.stderr
        assert f"set resume_from_checkpoint: {ckpt}" in refused.stderr and "Traceback" not in refused.stderr
        assert w.stat().st_size > 0 and not any(e["event"] == "progress" for e in refused.events)
        spec = str(ckpt)

    resumed = Worker({**run_cfg, "resume_from_checkpoint": spec}, tmp_path / "resume.json")
    assert resumed.wait() == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpt}" in resumed.stdout
    steps = [e["step"] for e in resumed.events if e["event"] == "progress"]
    assert steps == list(range(SAVE + 1, STEPS + 1))

    weights = "adaptors/dllm-adaptor/adapter_model.safetensors" if lora else "final_model/model.safetensors"
    assert_bitwise_equal(tmp_path / "ref" / weights, out / weights)
    final_ckpt = f"checkpoint-{STEPS}/{'adapter_model' if lora else 'model'}.safetensors"
    assert_bitwise_equal(tmp_path / "ref" / final_ckpt, out / final_ckpt)
    for name in ("optimizer.pt", "scheduler.pt"):
        a = torch.load(tmp_path / "ref" / f"checkpoint-{STEPS}" / name, weights_only=False)
        b = torch.load(out / f"checkpoint-{STEPS}" / name, weights_only=False)
        assert repr(a) == repr(b) if name == "scheduler.pt" else all(
            torch.equal(x, y) for sa, sb in zip(a["state"].values(), b["state"].values())
            for x, y in zip(sa.values(), sb.values()) if isinstance(x, torch.Tensor))



@pytest.mark.slow
def test_resuming_a_finished_run_trains_no_extra_step(tmp_path, llada_dir):
    """Hugging Face's loop would run one step more when the checkpoint already holds max_steps
    (e.g. a job that died while saving the final model, resumed with 'latest')."""
    import torch

    from dllm_trainer.config import TrainConfig
    from dllm_trainer.training.train import run_training
    from rel_helpers import load_tensors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = llada_job(llada_dir, tmp_path / "out", train_steps=3, save_steps=3)
        first = run_training(TrainConfig.from_dict(cfg), log=lambda *_: None)
        weights = load_tensors(Path(first.final_model_dir) / "model.safetensors")
        shutil.rmtree(first.final_model_dir)
        again = run_training(TrainConfig.from_dict({**cfg, "resume_from_checkpoint": "latest"}), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert again.global_step == 3 and not (tmp_path / "out" / "checkpoint-4").exists()
    # no step ran: no train_loss (HF would report 0), while the first run's metrics have one
    assert "train_loss" in first.metrics and "train_loss" not in again.metrics
    assert "train_loss" not in json.loads((tmp_path / "out" / "metrics.json").read_text())
    resumed = load_tensors(Path(again.final_model_dir) / "model.safetensors")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


# ---------------------------------------------------------------------------------------------
# Validation of checkpoints (fast, synthetic)
# ---------------------------------------------------------------------------------------------


def make_checkpoint(path: Path, step: int = 3, *, world_size: int = 1, manifest: bool = True) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)},
              str(path / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    for rank in range(world_size):
        name = "rng_state.pth" if world_size == 1 else f"rng_state_{rank}.pth"
        torch.save({"cpu": torch.random.get_rng_state()}, path / name)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 0.5}))
    if manifest:
        ck.write_manifest(str(path), step, world_size)
    return path


def test_valid_checkpoint_has_no_problems(tmp_path):
    assert ck.checkpoint_problems(str(make_checkpoint(tmp_path / "checkpoint-3"))) == []
    assert ck.checkpoint_problems(str(make_checkpoint(tmp_path / "checkpoint-4", manifest=False))) == []
    assert ck.checkpoint_problems(str(make_checkpoint(tmp_path / "checkpoint-5", world_size=2))) == []


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncate_weights", "model.safetensors is truncated"),
        ("truncate_weights_no_manifest", "model.safetensors is truncated"),
        ("zero_header", "model.safetensors has a corrupt header"),
        ("garbage_header", "model.safetensors has a corrupt header (not JSON)"),
        ("tiny_weights", "model.safetensors is truncated (3 bytes"),
        ("no_weights", "no model weights"),
        ("no_trainer_state", "no trainer_state.json"),
        ("garbage_trainer_state", "trainer_state.json is not valid JSON"),
        ("trainer_state_without_step", "trainer_state.json has no global_step"),
        ("truncated_optimizer", "optimizer.pt is truncated or corrupt"),
        ("no_optimizer", "no optimizer.pt"),
        ("no_scheduler", "no scheduler.pt"),
        ("missing_rng_of_rank_1", "rng_state_1.pth is missing"),
        ("garbage_manifest", "dllm_checkpoint.json is not valid"),
        ("file_grew", "rng_state.pth has"),
    ],
)
def test_corrupt_checkpoints_are_detected(tmp_path, damage, expected):
    world = 2 if damage == "missing_rng_of_rank_1" else 1
    p = make_checkpoint(tmp_path / "checkpoint-3", world_size=world, manifest=damage != "truncate_weights_no_manifest")
    w = p / "model.safetensors"
    if damage.startswith("truncate_weights"):
        w.write_bytes(w.read_bytes()[:-7])
    elif damage == "zero_header":
        w.write_bytes(b"\0" * w.stat().st_size)
    elif damage == "garbage_header":
        data = bytearray(w.read_bytes())
        data[8:20] = b"#" * 12
        w.write_bytes(bytes(data))
    elif damage == "tiny_weights":
        w.write_bytes(b"abc")
    elif damage == "no_weights":
        w.unlink()
    elif damage == "no_trainer_state":
        (p / "trainer_state.json").unlink()
    elif damage == "garbage_trainer_state":
        (p / "trainer_state.json").write_text('{"global_step": 3, "epo')
    elif damage == "trainer_state_without_step":
        (p / "trainer_state.json").write_text("[]")
    elif damage == "truncated_optimizer":
        o = p / "optimizer.pt"
        o.write_bytes(o.read_bytes()[:40])
    elif damage == "no_optimizer":
        (p / "optimizer.pt").unlink()
    elif damage == "no_scheduler":
        (p / "scheduler.pt").unlink()
    elif damage == "missing_rng_of_rank_1":
        (p / "rng_state_1.pth").unlink()
    elif damage == "garbage_manifest":
        (p / ck.MANIFEST_NAME).write_text("not json")
    elif damage == "file_grew":
        with open(p / "rng_state.pth", "ab") as fh:
            fh.write(b"x")
    problems = ck.checkpoint_problems(str(p))
    assert problems and any(expected in m for m in problems), problems
    assert not ck.is_valid_checkpoint(str(p))


def test_latest_is_the_newest_checkpoint_and_ignores_other_folders(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    make_checkpoint(tmp_path / "checkpoint-10", 10)
    (tmp_path / "checkpoint-99x").mkdir()  # not a checkpoint name: ignored
    make_checkpoint(tmp_path / ".tmp-checkpoint-16" / "checkpoint-16", 16)  # unfinished staging: ignored
    assert ck.resolve_resume("latest", str(tmp_path), log=print) == str(tmp_path / "checkpoint-10")

    # ... and the worker's own lookup (train.find_resume_checkpoint) agrees
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.training.train import find_resume_checkpoint

    cfg = TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", "output_dir": str(tmp_path),
                                 "resume_from_checkpoint": "latest"})
    assert find_resume_checkpoint(cfg, log=lambda *_: None) == str(tmp_path / "checkpoint-10")


def test_latest_with_a_corrupt_optimizer_says_what_is_wrong_and_stops(tmp_path):
    """Intact weights, a corrupt optimizer.pt in the newest checkpoint: never a silent fallback to an
    older checkpoint or to step 0; the message names the file, the intact weights and the choices."""
    older = make_checkpoint(tmp_path / "checkpoint-2", 2)
    newest = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (newest / "optimizer.pt").write_bytes(b"PK")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as e:
        ck.resolve_resume("latest", str(tmp_path))
    msg = str(e.value)
    assert f"the newest checkpoint {newest} (step 4) cannot be resumed: optimizer.pt is truncated or corrupt" in msg
    assert "Its model weights are intact" in msg
    assert f"set resume_from_checkpoint: {older}" in msg and "move checkpoint-4 out of" in msg
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing changed

    # the only checkpoint, weights damaged too: no older one to offer
    only = tmp_path / "alone"
    bad = make_checkpoint(only / "checkpoint-4", 4)
    (bad / "model.safetensors").write_bytes(b"")
    (bad / "optimizer.pt").write_bytes(b"PK")
    with pytest.raises(ConfigError, match="weights are damaged too.*no older valid checkpoint: start a new run"):
        ck.resolve_resume("latest", str(only))


def test_latest_without_any_checkpoint_starts_fresh(tmp_path):
    logged = []
    assert ck.resolve_resume("latest", str(tmp_path), log=logged.append) is None
    assert "starting fresh" in logged[-1]
    assert ck.resolve_resume("", str(tmp_path)) is None


def test_an_explicit_broken_checkpoint_is_a_config_error_naming_it(tmp_path):
    bad = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (bad / "trainer_state.json").unlink()
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint '.*checkpoint-4' is incomplete or corrupt: no trainer_state.json"):
        ck.resolve_resume(str(bad), str(tmp_path))
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        ck.resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    good = make_checkpoint(tmp_path / "checkpoint-6", 6)
    assert ck.resolve_resume(str(good), str(tmp_path)) == str(good)


def test_rotation_keeps_the_limit_and_never_the_one_just_written(tmp_path):
    for s in (2, 4, 6, 8):
        make_checkpoint(tmp_path / f"checkpoint-{s}", s)
    # a resumed run from checkpoint-2 just wrote checkpoint-3: it stays even though 8 is newer by step
    make_checkpoint(tmp_path / "checkpoint-3", 3)
    ck.rotate(str(tmp_path), 2, keep=str(tmp_path / "checkpoint-3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-8"]


def test_commit_replaces_an_old_folder_of_the_same_name(tmp_path):
    old = make_checkpoint(tmp_path / "checkpoint-3", 3)
    (old / "stale.txt").write_text("from an earlier run")
    staged = make_checkpoint(tmp_path / ".tmp-checkpoint-3" / "checkpoint-3", 3)
    ck.commit(str(staged), str(tmp_path / "checkpoint-3"))
    assert not (tmp_path / "checkpoint-3" / "stale.txt").exists()
    assert ck.is_valid_checkpoint(str(tmp_path / "checkpoint-3"))


def test_stale_staging_folders_are_removed(tmp_path):
    make_checkpoint(tmp_path / ".tmp-checkpoint-7" / "checkpoint-7", 7)
    keep = make_checkpoint(tmp_path / "checkpoint-5", 5)
    logged = []
    ck.remove_stale_staging(str(tmp_path), log=logged.append)
    assert not (tmp_path / ".tmp-checkpoint-7").exists() and keep.exists()
    assert "unfinished checkpoint" in logged[0]


def test_disk_full_is_recognised_through_wrapping_errors():
    import errno

    assert ck.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as wrapped:
        assert ck.is_disk_full(wrapped)
    assert ck.is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"))
    assert not ck.is_disk_full(OSError(errno.EACCES, "Permission denied"))


# ---------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------


def test_train_order_depends_on_seed_and_epoch_only():
    from dllm_trainer.training.trainer import EpochSeededSampler

    lengths = [(i * 7) % 23 + 1 for i in range(57)]
    a = EpochSeededSampler(57, 42, lengths=lengths, group_size=8)
    b = EpochSeededSampler(57, 42, lengths=lengths, group_size=8)
    a.set_epoch(1)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)
    torch.rand(100)  # whatever the global RNG did meanwhile
    b.set_epoch(1)
    assert list(b) == first and sorted(first) == list(range(57))
    b.set_epoch(2)
    assert list(b) != first
    c = EpochSeededSampler(57, 42, epoch_fn=lambda: 1)  # plain random order, epoch from the trainer state
    assert list(c) == list(c) and sorted(c) == list(range(57))
    assert list(EpochSeededSampler(57, 43, epoch_fn=lambda: 1)) != list(c)


def test_dream_cutoffs_do_not_depend_on_any_global_rng():
    """The Dream response cutoffs are drawn from the batch's sample indices, so a resumed run
    collates every batch exactly as the uninterrupted one (whatever the global RNGs hold)."""
    import random

    import numpy as np

    from dllm_trainer.training.collator import DiffusionCollator
    from dllm_trainer.families import DREAM

    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * 2 + list(range(5, 3 + n)), "prompt_len": 2,
             "sample_index": 10 + n} for n in (5, 9, 14, 7)]
    for kw in (dict(perbatch_cutoff=True), dict(perbatch_cutoff=False, resp_cutoff_ratio=1.0)):
        collate = DiffusionCollator(family=DREAM, pad_token_id=0, eos_token_id=1, seed=3, **kw)
        outs = []
        for seed in (0, 1):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            outs.append(collate([dict(r) for r in rows]))
        assert outs[0].keys() == outs[1].keys()
        assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_the_app_resolves_latest_before_launching(tmp_path):
    """'latest' -> the newest checkpoint of output_dir (a broken one stops the job); with none there,
    the checkpoint the app (Transformer Lab) asks to resume from; '' -> the app's; a path stays."""
    from dllm_trainer import app
    from dllm_trainer.config import TrainConfig

    class Rep(StandaloneReporter):
        def __init__(self, offer):
            super().__init__(log=lambda *_: None)
            self.offer = offer

        def checkpoint_to_resume(self):
            return self.offer

    out = tmp_path / "out"
    cfg = lambda spec: TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", "output_dir": str(out),  # noqa: E731
                                              "resume_from_checkpoint": spec})
    sdk_ckpt = str(make_checkpoint(tmp_path / "parent-job" / "checkpoint-9", 9))
    logged = []
    assert app._resume_request(cfg("latest"), Rep(None), logged.append).resume_from_checkpoint == "latest"
    assert app._resume_request(cfg("latest"), Rep(sdk_ckpt), logged.append).resume_from_checkpoint == sdk_ckpt
    assert app._resume_request(cfg(""), Rep(sdk_ckpt), logged.append).resume_from_checkpoint == sdk_ckpt
    assert app._resume_request(cfg(""), Rep(None), logged.append).resume_from_checkpoint == ""
    make_checkpoint(out / "checkpoint-2", 2)
    assert app._resume_request(cfg("latest"), Rep(sdk_ckpt), logged.append).resume_from_checkpoint == str(out / "checkpoint-2")
    broken = make_checkpoint(out / "checkpoint-4", 4)
    (broken / "optimizer.pt").write_bytes(b"PK")
    with pytest.raises(ConfigError, match="checkpoint-4 \\(step 4\\) cannot be resumed: optimizer.pt"):
        app._resume_request(cfg("latest"), Rep(sdk_ckpt), logged.append)
    assert app._resume_request(cfg(sdk_ckpt), Rep(None), logged.append).resume_from_checkpoint == sdk_ckpt
