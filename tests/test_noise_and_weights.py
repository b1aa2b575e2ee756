"""The MDLM forward process (noise.py), the loss weights (loss_weights.py) and the loss normalisation
of MDLMTrainer (trainer.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core_helpers import tiny_bert
from dllm_trainer.training.collator import DiffusionCollator
from dllm_trainer.families import BERT
from dllm_trainer.training.loss_weights import cart_weights, token_weights
from dllm_trainer.training.noise import EVAL_STREAM, TRAIN_STREAM, NoiseSchedule, draw_masks
from dllm_trainer.training.trainer import DiffusionSettings, MDLMTrainer

IGN = -100


pytestmark = pytest.mark.usefixtures("single_thread_module")


def draw(labels, idx, schedule=NoiseSchedule(), seed=0, epoch=0, stream=TRAIN_STREAM):
    return draw_masks(labels, torch.as_tensor(idx), schedule=schedule, seed=seed, epoch=epoch, stream=stream)


# ------------------------------------------------------------------------------ noise statistics


def test_mask_ratio_follows_t_on_long_rows():
    B, L = 2000, 512
    labels = torch.ones(B, L, dtype=torch.long)
    masked, t = draw(labels, range(B), NoiseSchedule(eps=1e-3))
    assert masked.dtype == torch.bool and masked.shape == (B, L) and t.shape == (B,)
    ratio = masked.float().mean(1)
    dev = (ratio - t).abs()
    # binomial(512, t): std <= 0.022, mean |dev| ~ 0.8 * std
    assert dev.mean() < 0.02
    assert dev.max() < 0.12
    # per-t-bin agreement (no bias)
    for lo in (0.0, 0.25, 0.5, 0.75):
        sel = (t >= lo) & (t < lo + 0.25)
        assert sel.sum() > 300
        assert abs(ratio[sel].mean() - t[sel].mean()) < 0.005


@pytest.mark.parametrize("eps", [1e-3, 0.2, 0.5])
def test_t_is_uniform_on_eps_to_one(eps):
    B = 4000
    labels = torch.ones(B, 4, dtype=torch.long)
    _, t = draw(labels, range(B), NoiseSchedule(eps=eps), seed=3)
    assert t.min() >= eps - 1e-7 and t.max() <= 1.0
    assert abs(t.mean().item() - (1 + eps) / 2) < 0.015
    # uniform: a quarter of the mass in each quarter of [eps, 1]
    q = eps + (1 - eps) * torch.tensor([0.25, 0.5, 0.75])
    for i, frac in enumerate((0.25, 0.5, 0.75)):
        assert abs((t < q[i]).float().mean().item() - frac) < 0.03
    assert len(set(t.tolist())) > B * 0.99  # a fresh t per sample


def test_min_max_rescaling():
    s = NoiseSchedule(eps=0.1, min_ratio=0.2, max_ratio=0.6)
    # hand: t = 0.2 + 0.4 * (0.1 + 0.9 * u)
    assert s.ratio(0.0) == pytest.approx(0.24)
    assert s.ratio(0.5) == pytest.approx(0.42)
    assert s.ratio(1.0) == pytest.approx(0.6)
    B = 3000
    labels = torch.ones(B, 256, dtype=torch.long)
    masked, t = draw(labels, range(B), s)
    assert t.min() >= 0.24 - 1e-6 and t.max() <= 0.6 + 1e-6
    assert abs(t.mean().item() - 0.42) < 0.01
    ratio = masked.float().mean(1)
    assert ratio.min() > 0.1 and ratio.max() < 0.72
    assert abs(ratio.mean().item() - 0.42) < 0.01


def test_prompt_and_padding_tokens_are_never_masked():
    B, L = 500, 64
    g = torch.Generator().manual_seed(0)
    prompt_len = torch.randint(1, 40, (B,), generator=g)
    resp_len = torch.randint(1, 20, (B,), generator=g)
    labels = torch.full((B, L), IGN)
    for b in range(B):
        labels[b, prompt_len[b]: prompt_len[b] + resp_len[b]] = 7
    masked, t = draw(labels, range(B), NoiseSchedule(eps=0.5))
    assert not masked[labels == IGN].any()
    # the trainable tokens are masked at rate ~t
    trainable = labels != IGN
    per_row = masked.sum(1).float() / trainable.sum(1)
    assert abs(per_row.mean().item() - t.mean().item()) < 0.03
    assert masked[trainable].float().mean() > 0.5  # eps 0.5: t >= 0.5


def test_noise_is_a_function_of_seed_epoch_and_sample_index():
    labels = torch.ones(3, 200, dtype=torch.long)
    m1, t1 = draw(labels, [5, 6, 7], seed=1, epoch=2)
    m2, t2 = draw(labels, [5, 6, 7], seed=1, epoch=2)
    assert torch.equal(m1, m2) and torch.equal(t1, t2)
    for kw in ({"seed": 2, "epoch": 2}, {"seed": 1, "epoch": 3}, {"seed": 1, "epoch": 2, "stream": EVAL_STREAM}):
        m3, t3 = draw(labels, [5, 6, 7], **kw)
        assert not torch.equal(m1, m3) and not torch.equal(t1, t3), kw
    m4, t4 = draw(labels, [8, 6, 7], seed=1, epoch=2)
    assert not torch.equal(m4[0], m1[0]) and torch.equal(m4[1:], m1[1:]) and torch.equal(t4[1:], t1[1:])


def test_noise_independent_of_batch_composition_and_order():
    labels = torch.ones(5, 100, dtype=torch.long)
    m_a, t_a = draw(labels[:2], [11, 42])
    m_b, t_b = draw(labels, [3, 42, 99, 11, 0])
    assert torch.equal(m_a[0], m_b[3]) and torch.equal(m_a[1], m_b[1])
    assert t_a[0] == t_b[3] and t_a[1] == t_b[1]


def test_noise_independent_of_row_padding_length():
    row = torch.tensor([IGN, IGN, 5, 6, 7, 8, 9, 10, 11, 12])
    short = row[None]
    padded = torch.cat([row, torch.full((40,), IGN)])[None]
    m_s, t_s = draw(short, [4], NoiseSchedule(eps=0.3))
    m_p, t_p = draw(padded, [4], NoiseSchedule(eps=0.3))
    assert t_s == t_p
    assert torch.equal(m_s[0], m_p[0, :10]) and not m_p[0, 10:].any()
    # the same through the collator: a row gets the same mask whatever it is batched with
    coll = DiffusionCollator(family=BERT, pad_token_id=0)
    feats = [{"input_ids": [1, 2, 3, 4, 5], "labels": [IGN, 2, 3, 4, 5], "prompt_len": 1, "sample_index": 9},
             {"input_ids": list(range(1, 31)), "labels": list(range(1, 31)), "prompt_len": 0, "sample_index": 1}]
    alone = coll(feats[:1])
    together = coll(feats)
    assert together["input_ids"].shape[1] == 30
    ma, _ = draw(alone["labels"], alone["sample_index"], NoiseSchedule(eps=0.4))
    mt, _ = draw(together["labels"], together["sample_index"], NoiseSchedule(eps=0.4))
    assert torch.equal(ma[0], mt[0, :5]) and not mt[0, 5:].any()


# ------------------------------------------------------------------------------ loss weights


def test_scheduler_and_uniform_weights():
    masked = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    t = torch.tensor([0.5, 0.25])
    assert torch.allclose(token_weights("scheduler", masked, t), torch.tensor([[2.0, 0, 2.0], [0, 4.0, 4.0]]))
    assert torch.equal(token_weights("uniform", masked, t), torch.tensor([[1.0, 0, 1.0], [0, 1.0, 1.0]]))
    assert token_weights("scheduler", masked, t).dtype == torch.float32


def test_cart_hand_example():
    # p = 0.3, masked = [0, 1, 1, 0, 0]; w_i = sum_{clean j} 0.5 p (1-p)^(|i-j|-1)
    # i=1: clean 0,3,4 at d=1,2,3: 0.15 * (1 + 0.7 + 0.49) = 0.3285
    # i=2: clean 0,3,4 at d=2,1,2: 0.15 * (0.7 + 1 + 0.7) = 0.36
    masked = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.bool)
    w = token_weights("cart", masked, torch.tensor([0.4]), geo_p=0.3)
    assert torch.allclose(w, torch.tensor([[0.0, 0.3285, 0.36, 0.0, 0.0]]), atol=1e-6)


def test_cart_excludes_padding_from_context():
    # p = 0.5: kernel k(d) = 0.25 * 0.5^(d-1): k1 = 0.25, k2 = 0.125, k3 = 0.0625, k4 = 0.03125, k5 = 0.015625
    # masked = [1, 0, 1, 0, pad, pad]
    # i=0: clean 1 (d1), 3 (d3)           -> 0.25 + 0.0625 = 0.3125   (+ pads 4, 5: 0.03125 + 0.015625)
    # i=2: clean 1 (d1), 3 (d1)           -> 0.5                      (+ pads 4, 5: 0.125 + 0.0625)
    masked = torch.tensor([[1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    attn = torch.tensor([[1, 1, 1, 1, 0, 0]])
    w = token_weights("cart", masked, torch.tensor([0.5]), geo_p=0.5, attention_mask=attn)
    assert torch.allclose(w, torch.tensor([[0.3125, 0, 0.5, 0, 0, 0]]), atol=1e-7)
    w_nopad = cart_weights(masked, 0.5)
    assert torch.allclose(w_nopad, torch.tensor([[0.359375, 0, 0.6875, 0, 0, 0]]), atol=1e-7)


def test_cart_batch_rows_independent_and_edge_cases():
    # every token masked: no clean context -> all weights 0; nothing masked -> 0
    m = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    w = cart_weights(m, 0.3)
    assert torch.equal(w[0], torch.zeros(4)) and torch.equal(w[1], torch.zeros(4))
    # row 2: i=1 clean 0 (d1), 2 (d1), 3 (d2): 0.15 * (1 + 1 + 0.7) = 0.405
    assert torch.allclose(w[2], torch.tensor([0, 0.405, 0, 0]), atol=1e-6)
    # p = 1: only the immediate neighbours count, 0.5 each
    w1 = cart_weights(torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool), 1.0)
    assert torch.allclose(w1, torch.tensor([[0, 0.5, 0.5, 0, 0.5]]))


def test_cart_long_row_is_a_bounded_sum():
    # fully clean context on both sides of one masked token: sum_{d>=1} 2 * 0.5 p (1-p)^(d-1) -> 1
    L = 401
    m = torch.zeros(1, L, dtype=torch.bool)
    m[0, 200] = True
    w = cart_weights(m, 0.3)
    assert w[0, 200] == pytest.approx(1.0, abs=1e-6)


def test_weight_kind_errors():
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="geo_p"):
        token_weights("cart", m, torch.ones(1))
    with pytest.raises(ValueError, match="unknown"):
        token_weights("inverse", m, torch.ones(1))


# ------------------------------------------------------------------------------ loss normalisation

MASK_ID = 3
VOCAB = 40


def make_trainer(tmp_path, model, *, ga=1, weight_kind="scheduler", normalization="trainable_tokens",
                 schedule=NoiseSchedule(eps=0.3), seed=5, **args):
    from transformers import TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[],
                              per_device_train_batch_size=8, gradient_accumulation_steps=ga,
                              remove_unused_columns=False, disable_tqdm=True, **args)
    settings = DiffusionSettings(family=BERT, mask_token_id=MASK_ID, schedule=schedule, weight_kind=weight_kind,
                                 normalization=normalization, seed=seed)
    return MDLMTrainer(model=model, args=targs, diffusion=settings)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p = int(torch.randint(1, 5, (1,), generator=g))
        r = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (p + r,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGN] * p + ids[p:], "prompt_len": p, "sample_index": i})
    return rows


COLLATE = DiffusionCollator(family=BERT, pad_token_id=0)


def hand_loss(model, batch, *, schedule, seed, kind, denom):
    masked, t = draw_masks(batch["labels"], batch["sample_index"], schedule=schedule, seed=seed, epoch=0)
    assert masked.any()
    noisy = batch["input_ids"].clone()
    noisy[masked] = MASK_ID
    logits = model(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[masked].float(), batch["labels"][masked], reduction="none")
    if kind == "scheduler":
        w = (1.0 / t)[:, None].expand_as(masked)[masked]
    else:
        w = torch.ones_like(ce)
    return (w * ce).sum() / denom, masked


@pytest.mark.parametrize("kind", ["scheduler", "uniform"])
def test_loss_is_weighted_ce_over_trainable_tokens(tmp_path, kind):
    model = tiny_bert(VOCAB)
    model.train()
    trainer = make_trainer(tmp_path, model, weight_kind=kind)
    batch = COLLATE(make_rows(4))
    n_trainable = int((batch["labels"] != IGN).sum())
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        expected, masked = hand_loss(model, batch, schedule=trainer.diffusion.schedule, seed=5, kind=kind,
                                     denom=n_trainable)
        assert masked.sum() < n_trainable  # so the two normalisations differ
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        # a step-wide count (several micro-batches / workers) replaces the local one
        loss_g = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(3 * n_trainable))
        assert loss_g.item() == pytest.approx(expected.item() / 3, rel=1e-5)


def test_masked_tokens_normalisation(tmp_path):
    model = tiny_bert(VOCAB)
    trainer = make_trainer(tmp_path, model, normalization="masked_tokens", ga=2)
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop
    batch = COLLATE(make_rows(4, seed=1))
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(999))
        masked, _ = draw_masks(batch["labels"], batch["sample_index"], schedule=trainer.diffusion.schedule, seed=5, epoch=0)
        expected, _ = hand_loss(model, batch, schedule=trainer.diffusion.schedule, seed=5, kind="scheduler",
                                denom=int(masked.sum()) * 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_eval_uses_fixed_eval_noise(tmp_path):
    model = tiny_bert(VOCAB)
    model.eval()
    trainer = make_trainer(tmp_path, model)
    batch = COLLATE(make_rows(4, seed=2))
    n = int((batch["labels"] != IGN).sum())
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        masked, t = draw_masks(batch["labels"], batch["sample_index"], schedule=trainer.diffusion.schedule, seed=5,
                               epoch=0, stream=EVAL_STREAM)
        noisy = torch.where(masked, torch.full_like(batch["input_ids"], MASK_ID), batch["input_ids"])
        logits = model(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
        ce = F.cross_entropy(logits[masked], batch["labels"][masked], reduction="none")
        expected = ((1 / t)[:, None].expand_as(masked)[masked] * ce).sum() / n
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_gradient_independent_of_micro_batch_split(tmp_path):
    rows = make_rows(8, seed=3)
    full = COLLATE(rows)
    halves = [COLLATE(rows[:4]), COLLATE(rows[4:])]
    n_all = int((full["labels"] != IGN).sum())
    n_halves = [int((h["labels"] != IGN).sum()) for h in halves]
    assert n_halves[0] != n_halves[1]

    model = tiny_bert(VOCAB)
    t1 = make_trainer(tmp_path / "a", model, ga=1)
    t2 = make_trainer(tmp_path / "b", model, ga=2)
    # the count HF hands to compute_loss for a step: every trainable label of every micro-batch
    assert int(t2._get_num_items_in_batch(halves, torch.device("cpu"))) == n_all
    assert int(t1._get_num_items_in_batch([full], torch.device("cpu"))) == n_all

    model.zero_grad()
    loss_full = t1.training_step(model, full, num_items_in_batch=torch.tensor(n_all))
    g_full = _grads(model)

    model.zero_grad()
    loss_split = sum(t2.training_step(model, h, num_items_in_batch=torch.tensor(n_all)) for h in halves)
    g_split = _grads(model)

    assert loss_split.item() == pytest.approx(loss_full.item(), rel=1e-5)
    assert g_full.keys() == g_split.keys() and g_full
    for name in g_full:
        assert torch.allclose(g_full[name], g_split[name], rtol=1e-4, atol=1e-7), name

    # control: normalising each micro-batch by its own count would change the gradient
    model.zero_grad()
    for h in halves:
        t2.training_step(model, h, num_items_in_batch=None)
    g_local = _grads(model)
    assert any(not torch.allclose(g_full[n], g_local[n], rtol=1e-3, atol=1e-6) for n in g_full)


def test_one_optimizer_step_same_for_batch_8_and_2x4(tmp_path):
    """The whole HF loop: one SGD step with batch 8 equals one with batch 4 x GA 2."""
    import datasets

    rows = make_rows(8, seed=4)
    ds = datasets.Dataset.from_list(rows)

    def run(bs, ga, sub):
        from transformers import TrainingArguments

        model = tiny_bert(VOCAB, seed=1)
        targs = TrainingArguments(output_dir=str(tmp_path / sub), use_cpu=True, report_to=[], max_steps=1,
                                  per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                  remove_unused_columns=False, disable_tqdm=True, optim="sgd", learning_rate=1.0,
                                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                                  save_strategy="no", seed=0, data_seed=0, logging_steps=1)
        settings = DiffusionSettings(family=BERT, mask_token_id=MASK_ID, schedule=NoiseSchedule(eps=0.3), seed=5)
        tr = MDLMTrainer(model=model, args=targs, train_dataset=ds, data_collator=COLLATE, diffusion=settings)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = tr.train()
        return before, {n: p.detach().clone() for n, p in model.named_parameters()}, out.training_loss

    b1, a1, loss1 = run(8, 1, "a")
    b2, a2, loss2 = run(4, 2, "b")
    assert all(torch.equal(b1[n], b2[n]) for n in b1)
    moved = [n for n in a1 if not torch.equal(a1[n], b1[n])]
    assert moved
    for n in a1:
        assert torch.allclose(a1[n] - b1[n], a2[n] - b2[n], rtol=1e-4, atol=1e-6), n
    assert loss1 == pytest.approx(loss2, rel=1e-5)
