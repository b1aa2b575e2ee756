"""Padding-free packing (pack_sequences): a packed batch trains exactly like its rows unpacked.

The reference for "unpacked" is each row collated ON ITS OWN (no padding at all), so the test
holds for LLaDA too, whose unpacked batches add trainable EOS padding that packing drops by design.
For Dream (padding is neither attended nor trained) the packed batch also equals the padded batch,
including the per-batch and random response cutoffs.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import AutoModel, TrainingArguments

from dllm_trainer.training.collator import DiffusionCollator
from dllm_trainer.config import TrainConfig
from dllm_trainer.families import get_family
from dllm_trainer.training.noise import NoiseSchedule
from dllm_trainer.training.packing import (
    block_diagonal_mask,
    pack_rows,
    packing_active,
    packing_note,
    plan_bins,
    segment_output_positions,
)
from dllm_trainer.training.trainer import DiffusionSettings, MDLMTrainer

PAD = EOS = 2
MASK = 500
WEIGHTS = [("scheduler", None), ("uniform", None), ("cart", 0.3)]


pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture
def trainers(tmp_path_factory, llada_tiny, dream_tiny):
    """One real MDLMTrainer per fixture model (float32, train mode); settings swapped per test.
    Function scope: building TrainingArguments elsewhere resets accelerate's shared state."""
    out = {}
    for name, path in (("llada", llada_tiny), ("dream", dream_tiny)):
        model = AutoModel.from_pretrained(path, dtype=torch.float32).train()
        args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp(name)), use_cpu=True, report_to=[],
                                 per_device_train_batch_size=4)
        out[name] = MDLMTrainer(model=model, args=args, diffusion=settings(name, "scheduler", None))
        out[name].current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    return out


def settings(family: str, kind: str, geo_p, normalization: str = "trainable_tokens") -> DiffusionSettings:
    # min_ratio keeps t away from 0 so every row has masked tokens (a sharper test).
    return DiffusionSettings(family=get_family(family), mask_token_id=MASK, weight_kind=kind, geo_p=geo_p,
                             normalization=normalization, seed=7, ce_chunk_size=16,
                             schedule=NoiseSchedule(min_ratio=0.3, max_ratio=0.9))


def make_rows(n=6, seed=0, lengths=(5, 23, 11, 17, 9, 30, 14, 3)):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        L = lengths[i % len(lengths)]
        ids = [rng.randrange(3, 499) for _ in range(L)]
        p = rng.randrange(0, max(1, L // 2))
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:], "prompt_len": p, "sample_index": 100 + i})
    return rows


def collator(family: str, pack: int | None, **kw) -> DiffusionCollator:
    kw.setdefault("perbatch_cutoff", False)
    return DiffusionCollator(family=get_family(family), pad_token_id=PAD, eos_token_id=EOS, seed=3,
                             pack_length=pack, **kw)


def weighted_sum_and_masked(trainer, batch, denom):
    """(loss * denom, masked tokens) of one compute_loss call with the step denominator ``denom``."""
    before = trainer._train_stats.masked
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=denom)
    return loss, trainer._train_stats.masked - before


def trainable(rows):
    return sum(sum(l != -100 for l in r["labels"]) for r in rows)


# ---- layout ----------------------------------------------------------------------------------
def test_plan_bins_first_fit_decreasing():
    bins = plan_bins([5, 23, 11, 17, 9, 30], 32)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 23, 11, 17, 9, 30][i] for i in b) <= 32 for b in bins)
    assert len(bins) == 4  # 95 tokens: at least 3 bins; FFD finds 4 here
    assert plan_bins([40, 3], 32) == [[0], [1]]  # too long for the capacity: a bin of its own


def test_pack_rows_layout_and_mask():
    rows = make_rows()
    b = pack_rows(rows, 32, pad_token_id=PAD)
    P, Lp = b["input_ids"].shape
    assert P < len(rows) and Lp <= 32
    # every row is recoverable from pack_index; position ids restart at 0 per segment
    for i, r in enumerate(rows):
        idx = b["pack_index"][i, : len(r["input_ids"])]
        assert b["input_ids"].flatten()[idx].tolist() == r["input_ids"]
        assert b["labels"].flatten()[idx].tolist() == r["labels"]
        assert b["position_ids"].flatten()[idx].tolist() == list(range(len(r["input_ids"])))
        assert (b["segment_ids"].flatten()[idx] == i).all()
        assert (b["pack_index"][i, len(r["input_ids"]):] == -1).all()
    pad = b["segment_ids"] < 0
    assert (b["labels"][pad] == -100).all()
    assert (b["labels"] != -100).sum() == trainable(rows)  # packing adds no trainable token
    m = block_diagonal_mask(b["segment_ids"])
    assert m.shape == (P, 1, Lp, Lp) and m.dtype == torch.bool
    seg = b["segment_ids"]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    assert torch.equal(m[:, 0], same)


def test_dream_shift_restarts_at_each_segment():
    b = pack_rows(make_rows(), 32, pad_token_id=PAD)
    pos = torch.arange(b["input_ids"].numel())
    real = (b["segment_ids"].flatten() >= 0).nonzero().squeeze(1)
    out = segment_output_positions(get_family("dream"), real, b["position_ids"])
    starts = b["position_ids"].flatten()[real] == 0
    assert torch.equal(out[starts], real[starts])  # a segment's first token: its own output
    assert torch.equal(out[~starts], real[~starts] - 1)
    # never reads another segment's output
    assert torch.equal(b["segment_ids"].flatten()[out], b["segment_ids"].flatten()[real])
    assert torch.equal(segment_output_positions(get_family("llada"), real, b["position_ids"]), real)
    assert pos.numel() > 0


# ---- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind,geo_p", WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_packed_loss_equals_unpacked_rows(trainers, family, kind, geo_p):
    trainer = trainers[family]
    trainer.diffusion = settings(family, kind, geo_p)
    rows = make_rows()
    packed = collator(family, 32)(rows)
    assert packed["input_ids"].shape[0] < len(rows)
    total = trainable(rows)

    model = trainer.model
    model.zero_grad()
    loss_packed = trainer.compute_loss(model, packed)  # denominator from the packed labels
    loss_packed.backward()
    grads_packed = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    loss_rows = 0.0
    for r in rows:  # each row alone: no padding at all
        single = collator(family, None)([r])
        loss_i = trainer.compute_loss(model, single, num_items_in_batch=total)
        loss_i.backward()
        loss_rows = loss_rows + loss_i.detach()
    grads_rows = [p.grad for p in model.parameters()]

    torch.testing.assert_close(loss_packed.detach(), loss_rows, rtol=1e-5, atol=1e-6)
    for gp, gr in zip(grads_packed, grads_rows):
        torch.testing.assert_close(gp, gr, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_packed_masked_tokens_normalisation(trainers, family):
    trainer = trainers[family]
    trainer.diffusion = settings(family, "cart", 0.3, normalization="masked_tokens")
    rows = make_rows(seed=1)
    with torch.no_grad():
        loss_p, masked_p = weighted_sum_and_masked(trainer, collator(family, 32)(rows), None)
        parts = [weighted_sum_and_masked(trainer, collator(family, None)([r]), None) for r in rows]
    assert masked_p == sum(m for _, m in parts)
    torch.testing.assert_close(loss_p * masked_p, sum(l * m for l, m in parts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cutoffs", [dict(perbatch_cutoff=True), dict(resp_cutoff_ratio=1.0)], ids=["perbatch", "resp_ratio"])
def test_dream_packed_equals_padded_batch_with_cutoffs(trainers, cutoffs):
    """With dream_padding: ignored, Dream padding is neither attended nor trained, so packed ==
    padded, cutoffs included (the default trains the padding, which packing drops like LLaDA's)."""
    trainer = trainers["dream"]
    dream = get_family("dream")
    ignored = dataclasses.replace(dream, padding=dream.padding_option("ignored"))
    trainer.diffusion = dataclasses.replace(settings("dream", "cart", 0.3), family=ignored)
    rows = make_rows(seed=2)
    padded = DiffusionCollator(family=ignored, pad_token_id=PAD, eos_token_id=EOS, seed=3,
                               **{"perbatch_cutoff": False, **cutoffs})([dict(r) for r in rows])
    packed = DiffusionCollator(family=ignored, pad_token_id=PAD, eos_token_id=EOS, seed=3, pack_length=48,
                               **{"perbatch_cutoff": False, **cutoffs})([dict(r) for r in rows])
    assert (padded["labels"] != -100).sum() == (packed["labels"] != -100).sum()
    assert (padded["labels"] != -100).sum() < trainable(rows)  # the cutoff did cut
    with torch.no_grad():
        a = trainer.compute_loss(trainer.model, padded)
        b = trainer.compute_loss(trainer.model, packed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rows_do_not_attend_across_segments(trainers):
    """Changing one row's tokens leaves the other rows' per-token losses untouched."""
    trainer = trainers["llada"]
    trainer.diffusion = settings("llada", "uniform", None)
    rows = make_rows()
    fam = get_family("llada")
    from dllm_trainer.training.packing import packed_masked_token_loss

    def per_token(batch):
        labels = batch["labels"]
        real = (labels != -100).flatten().nonzero().squeeze(1)
        with torch.no_grad():
            loss, _ = packed_masked_token_loss(fam, trainer.model, batch["input_ids"], batch["segment_ids"],
                                               batch["position_ids"], real, labels.flatten()[real])
        return real, loss

    a = collator("llada", 32)(rows)
    changed = [dict(r) for r in rows]
    changed[1] = {**rows[1], "input_ids": [7] * len(rows[1]["input_ids"])}
    b = collator("llada", 32)(changed)
    assert torch.equal(a["segment_ids"], b["segment_ids"])
    real, la = per_token(a)
    _, lb = per_token(b)
    other = a["segment_ids"].flatten()[real] != 1
    torch.testing.assert_close(la[other], lb[other], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(la[~other], lb[~other])


# ---- config ------------------------------------------------------------------------------------
def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", **kw})


def test_packing_only_for_native_families():
    assert packing_active(cfg(training_method="llada", pack_sequences=True))
    assert packing_active(cfg(training_method="dream", pack_sequences=True))
    assert not packing_active(cfg(training_method="llada"))
    # bert: ignored with a clear log line, length grouping applies instead
    bert = cfg(training_method="bert", pack_sequences=True)
    assert not packing_active(bert)
    assert "ignored" in packing_note(bert) and "grouped by length" in packing_note(bert)
    assert "EOS" in packing_note(cfg(training_method="llada", pack_sequences=True))
    assert packing_note(cfg(training_method="dream")) is None
    assert "dream" in packing_note(cfg(training_method="dream", pack_sequences=True))  # trained padding by default
    assert packing_note(cfg(training_method="dream", pack_sequences=True, dream_padding="ignored")) is None


def test_training_args_sampling_strategy(tmp_path):
    from dllm_trainer.training.train import build_training_args

    def strategy(**kw):
        return build_training_args(cfg(output_dir=str(tmp_path), train_device="cpu", **kw), torch.float32,
                                   has_eval=False).train_sampling_strategy

    assert strategy(training_method="llada") == "group_by_length"
    assert strategy(training_method="llada", pack_sequences=True) == "random"  # packing mixes lengths
    assert strategy(training_method="bert", pack_sequences=True) == "group_by_length"  # fallback
    assert strategy(training_method="dream", group_by_length=False) == "random"


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_run_training_with_packing(request, tmp_path, monkeypatch, family):
    """run_training with pack_sequences: packed batches reach the trainer (train and eval), the loss
    falls, and the packing log line is printed."""
    import math

    from core_helpers import LogRecorder, copy_with_tokenizer
    from dllm_trainer.data import asset_path
    from dllm_trainer.training.train import run_training
    from tiny_tokenizer import make_tiny_tokenizer

    monkeypatch.setenv("DLLM_CPU_THREADS", "1")
    model_dir = copy_with_tokenizer(request.getfixturevalue(f"{family}_tiny"), tmp_path / "model", make_tiny_tokenizer())
    cfg = TrainConfig.from_dict(dict(
        model_name=str(model_dir), dataset_name=str(asset_path("chat_small.jsonl")), output_dir=str(tmp_path / "out"),
        training_method=family, train_device="cpu", max_length=64, batch_size=8, num_train_epochs=0, train_steps=24,
        logging_steps=1, eval_strategy="steps", eval_steps=12, save_steps=1000, warmup_ratio=0,
        learning_rate_schedule="constant", seed=3, lora=False, learning_rate=3e-3, pack_sequences=True))

    seen = []
    from dllm_trainer.training import trainer as trainer_mod

    original = trainer_mod.MDLMTrainer.compute_loss

    def spy(self, model, inputs, *a, **kw):
        seen.append((tuple(inputs["input_ids"].shape), len(inputs["sample_index"]), "segment_ids" in inputs))
        return original(self, model, inputs, *a, **kw)

    monkeypatch.setattr(trainer_mod.MDLMTrainer, "compute_loss", spy)
    rec, lines = LogRecorder(), []
    result = run_training(cfg, log=lines.append, extra_callbacks=[rec])
    assert result.global_step == 24
    assert all(packed for _, _, packed in seen)
    assert any(shape[0] < rows for shape, rows, _ in seen)  # several rows per packed sequence
    assert all(shape[1] <= 64 for shape, _, _ in seen)
    losses = rec.train_losses()
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-6:]) / 6 < 0.85 * sum(losses[:6]) / 6, losses
    assert any("eval_loss" in e for e in rec.logs)
    assert any("pack_sequences" in ln for ln in lines), lines  # both pad with trainable EOS unpacked
