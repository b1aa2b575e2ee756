"""The training speed/memory paths are correct (each one checked against the plain computation).

- the trainer's loss (head + chunked CE only at masked positions, families.masked_token_loss)
  equals the naive full-logits MDLM loss for the same noise, gradients included, and keeps no
  [tokens x vocab] tensor for backward (models' own tests cover the head itself);
- length-grouped batching (group_by_length) is what the Trainer samples with, and it cuts padding;
- gradient checkpointing gives the same loss and gradients while saving fewer activations;
- bf16 autocast on CUDA (skipped on CPU);
- torch.compile: the config flag reaches TrainingArguments, and our loss path compiles (aot_eager
  on CPU; inductor only on request, its CPU compile takes minutes).
Packing has its own file (test_packing.py).
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, TrainingArguments

from dllm_trainer.training.collator import DiffusionCollator
from dllm_trainer.config import TrainConfig
from dllm_trainer.families import get_family
from dllm_trainer.training.loss_weights import token_weights
from dllm_trainer.training.noise import TRAIN_STREAM, NoiseSchedule, draw_masks
from dllm_trainer.training.trainer import DiffusionSettings, MDLMTrainer

PAD = EOS = 2
MASK = 500
VOCAB = 512
WEIGHTS = [("scheduler", None), ("uniform", None), ("cart", 0.3)]


pytestmark = pytest.mark.usefixtures("single_thread_module")


def settings(family, kind="scheduler", geo_p=None, chunk=16):
    return DiffusionSettings(family=get_family(family), mask_token_id=MASK, weight_kind=kind, geo_p=geo_p, seed=11,
                             ce_chunk_size=chunk, schedule=NoiseSchedule(min_ratio=0.3, max_ratio=0.9))


def make_trainer(path, family, tmp_path, **kw):
    model = AutoModel.from_pretrained(path, dtype=torch.float32).train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=not torch.cuda.is_available(), report_to=[], **kw)
    return MDLMTrainer(model=model, args=args, diffusion=settings(family))


@pytest.fixture
def trainers(tmp_path_factory, llada_tiny, dream_tiny):
    # Function scope: building TrainingArguments elsewhere resets accelerate's shared state, which
    # would leave an older trainer's accelerator unusable.
    return {
        "llada": make_trainer(llada_tiny, "llada", tmp_path_factory.mktemp("llada")),
        "dream": make_trainer(dream_tiny, "dream", tmp_path_factory.mktemp("dream")),
    }


def make_rows(n=4, seed=0, lengths=(9, 24, 15, 20, 6)):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        L = lengths[i % len(lengths)]
        ids = [rng.randrange(3, MASK) for _ in range(L)]
        p = rng.randrange(0, L // 2)
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:], "prompt_len": p, "sample_index": 50 + i})
    return rows


def padded_batch(family, rows):
    return DiffusionCollator(family=get_family(family), pad_token_id=PAD, eos_token_id=EOS, perbatch_cutoff=False)(rows)


def naive_loss(model, family, batch, d: DiffusionSettings):
    """The textbook MDLM step: full [B, L, V] float32 logits, CE with ignore_index, weights, / trainable."""
    fam = get_family(family)
    labels, am = batch["labels"], batch["attention_mask"]
    masked, t = draw_masks(labels, batch["sample_index"], schedule=d.schedule, seed=d.seed, epoch=0, stream=TRAIN_STREAM)
    noisy = torch.where(masked, torch.full_like(labels, MASK), batch["input_ids"])
    padding = d.family.padding  # Dream's trained padding: isolated in attention, clean CART context
    logits = fam.align_logits(model(input_ids=noisy, attention_mask=padding.model_attention_mask(am)).logits.float())
    target = torch.where(masked, labels, torch.full_like(labels, -100))
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none", ignore_index=-100)
    w = token_weights(d.weight_kind, masked, t, geo_p=d.geo_p, attention_mask=padding.context_mask(am))
    return (ce * w.flatten()).sum() / (labels != -100).sum()


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


# ---- head + CE at masked positions only -------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind,geo_p", WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_trainer_loss_equals_naive_full_logits(trainers, family, kind, geo_p):
    trainer = trainers[family]
    trainer.diffusion = settings(family, kind, geo_p, chunk=16)  # several chunks
    model = trainer.model
    batch = padded_batch(family, make_rows())
    model.zero_grad()
    ours = trainer.compute_loss(model, batch)
    ours.backward()
    g_ours = grads(model)
    model.zero_grad()
    ref = naive_loss(model, family, batch, trainer.diffusion)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def saved_for_backward(fn):
    """Shapes/dtypes of every non-parameter tensor autograd saves while ``fn`` runs (outside checkpoints)."""
    saved = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_no_tokens_by_vocab_tensor_kept_for_backward(trainers, family):
    trainer = trainers[family]
    trainer.diffusion = settings(family, chunk=8)
    model = trainer.model
    batch = padded_batch(family, make_rows())
    loss, saved = saved_for_backward(lambda: trainer.compute_loss(model, batch))
    assert trainer._train_stats.masked > 8  # more masked tokens than one chunk
    # The fused head keeps its precomputed output-weight gradient ([V, D], a parameter's shape);
    # nothing per token may have a vocabulary dimension.
    head_shape = tuple(model.get_output_embeddings().weight.shape)
    with_vocab = [s for s in saved if VOCAB in s[0] and s[0] != head_shape]
    assert not with_vocab, f"[tokens x vocab] tensors kept for backward: {with_vocab}"
    # the naive path, for contrast, keeps [B*L, V] float32 tensors: the check is sharp
    _, naive_saved = saved_for_backward(lambda: naive_loss(model, family, batch, trainer.diffusion))
    assert any(VOCAB in s[0] and s[1] == torch.float32 for s in naive_saved)
    loss.backward()


# ---- length-grouped batching --------------------------------------------------------------------
def cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", "output_dir": str(tmp_path),
                                  "train_device": "cpu", **kw})


def padding_fraction(trainer) -> float:
    real = total = 0
    for batch in trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        total += batch["input_ids"].numel()
    return 1 - real / total


def test_group_by_length_is_used_and_cuts_padding(tmp_path, llada_tiny):
    import datasets

    from dllm_trainer.training.train import build_training_args

    rng = random.Random(0)
    lengths = [int(min(200, max(4, rng.lognormvariate(3.3, 0.9)))) for _ in range(256)]
    rows = [{"input_ids": [5] * L, "labels": [5] * L, "prompt_len": 0, "sample_index": i} for i, L in enumerate(lengths)]
    ds = datasets.Dataset.from_list(rows)
    model = AutoModel.from_pretrained(llada_tiny)
    # dream collator: padding is not attended, so attention_mask tells real tokens from padding
    coll = DiffusionCollator(family=get_family("dream"), pad_token_id=PAD, perbatch_cutoff=False)

    def trainer_for(**kw):
        args = build_training_args(cfg(tmp_path, batch_size=8, training_method="llada", **kw), torch.float32,
                                   has_eval=False)
        args.report_to = []
        return MDLMTrainer(model=model, args=args, train_dataset=ds, data_collator=coll, diffusion=settings("llada"))

    grouped = trainer_for(group_by_length=True)
    assert grouped.args.train_sampling_strategy == "group_by_length"
    plain = trainer_for(group_by_length=False)
    assert plain.args.train_sampling_strategy == "random"
    # whatever sampler the trainer builds from that (HF's or an epoch-seeded one), it must group
    pg, pr = padding_fraction(grouped), padding_fraction(plain)
    assert pg < 0.5 * pr, (pg, pr)


# ---- gradient checkpointing ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_gradient_checkpointing_same_loss_and_grads(trainers, family):
    trainer = trainers[family]
    trainer.diffusion = settings(family, "cart", 0.3)
    model = trainer.model
    batch = padded_batch(family, make_rows(seed=3))

    def run():
        model.zero_grad()
        loss, saved = saved_for_backward(lambda: trainer.compute_loss(model, batch))
        loss.backward()
        return loss.detach(), grads(model), sum(s[2] for s in saved)

    plain_loss, plain_grads, plain_bytes = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        gc_loss, gc_grads, gc_bytes = run()
    finally:
        model.gradient_checkpointing_disable()
    torch.testing.assert_close(gc_loss, plain_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(gc_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert gc_bytes < 0.5 * plain_bytes  # the blocks' activations really are recomputed


# ---- bf16 autocast (CUDA) ----------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is a CUDA path; no GPU is visible here")
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_autocast_on_cuda(tmp_path, family, llada_tiny, dream_tiny):
    trainer = make_trainer(llada_tiny if family == "llada" else dream_tiny, family, tmp_path, bf16=True)
    model = trainer.model.cuda()
    batch = {k: v.cuda() for k, v in padded_batch(family, make_rows()).items()}
    ref = trainer.compute_loss(model, batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = trainer.compute_loss(model, batch)
    assert loss.dtype == torch.float32  # the CE runs in float32 even under autocast
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=1e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_flag_reaches_training_args(tmp_path):
    from dllm_trainer.training.train import build_training_args

    assert build_training_args(cfg(tmp_path), torch.bfloat16, has_eval=False).bf16
    assert not build_training_args(cfg(tmp_path), torch.float32, has_eval=False).bf16


# ---- torch.compile -------------------------------------------------------------------------------------
def test_torch_compile_flag_reaches_training_args(tmp_path):
    from dllm_trainer.training.train import build_training_args

    assert build_training_args(cfg(tmp_path, torch_compile=True), torch.float32, has_eval=False).torch_compile
    assert not build_training_args(cfg(tmp_path), torch.float32, has_eval=False).torch_compile


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # dynamo capture + AOT autograd of our loss path, no code generation (~10 s)
        pytest.param("inductor", marks=pytest.mark.skipif(
            os.environ.get("DLLM_TEST_INDUCTOR") != "1",
            reason="inductor's CPU code generation takes ~2 min on a 2-core box; set DLLM_TEST_INDUCTOR=1")),
    ],
)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compiled_model_same_loss(trainers, backend, packed):
    torch._dynamo.reset()
    trainer = trainers["dream"]  # the shifted family: output positions are data-dependent
    trainer.diffusion = settings("dream", "cart", 0.3)
    model = trainer.model
    rows = make_rows(seed=5)
    coll = DiffusionCollator(family=get_family("dream"), pad_token_id=PAD, perbatch_cutoff=False,
                             pack_length=48 if packed else None)
    batch = coll(rows)
    model.zero_grad()
    ref = trainer.compute_loss(model, batch)
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad()
    loss = trainer.compute_loss(torch.compile(model, backend=backend), batch)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(model), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_loss_does_not_recompile_per_masked_count(trainers):
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    trainer = trainers["dream"]
    trainer.diffusion = settings("dream", "scheduler", chunk=4096)  # one chunk, as in real runs
    model = trainer.model
    compiled = torch.compile(model, backend=counting_backend, dynamic=True)
    coll = DiffusionCollator(family=get_family("dream"), pad_token_id=PAD, perbatch_cutoff=False, pack_length=32)
    counts, masked = [], []
    for seed in range(4):
        batch = coll(make_rows(n=5, seed=seed))
        assert batch["input_ids"].shape[0] >= 2  # no size-1 specialisation of the batch dimension
        before = trainer._train_stats.masked
        trainer.compute_loss(compiled, batch).backward()
        masked.append(trainer._train_stats.masked - before)
        counts.append(len(graphs))
    assert len(set(masked[1:])) > 1  # the masked-token count really changes between batches
    assert counts[-1] == counts[1], f"graphs compiled after each batch: {counts} (masked tokens {masked})"


# ---- per-step metrics stay on the device ----------------------------------------------------------
def test_compute_loss_reads_no_metric_back_to_the_host(trainers, monkeypatch):
    """The logged counters (masked accuracy, mask ratio, token counts) are summed on the device and
    read once per log line; compute_loss itself converts no tensor to a Python number (the noise
    generators still read the sample indices, and the finiteness check one boolean)."""
    trainer = trainers["llada"]
    model = trainer.model
    batches = [padded_batch("llada", make_rows(seed=s)) for s in range(3)]
    reads = []
    for name in ("__float__", "item"):
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    trainer._train_stats.reset()
    for batch in batches:
        trainer.compute_loss(model, batch)
    assert reads == []
    monkeypatch.undo()
    # the sums are exact: recompute them from the same noise
    masked = correct_max = trainable = 0
    for batch in batches:
        m, _ = draw_masks(batch["labels"], batch["sample_index"], schedule=trainer.diffusion.schedule,
                          seed=trainer.diffusion.seed, epoch=0, stream=TRAIN_STREAM)
        masked += int(m.sum())
        trainable += int((batch["labels"] != -100).sum())
    s = trainer._train_stats
    assert s.masked == masked and s.trainable == trainable and s.samples == 3 * len(make_rows())
    assert 0 <= s.correct <= masked
    logs = trainer._reduce_stats(s, prefix="")
    assert logs["masked_tokens"] == masked and 0 <= logs["masked_accuracy"] <= 1
    assert trainer._train_stats.masked == 0  # reset after the log line
