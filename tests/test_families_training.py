"""LLaDA, LLaDA-MoE and Dream training on the tiny parity checkpoints, and what differs per family: EOS padding
(LLaDA), the one-position logits shift and response cutoffs (Dream), default loss weights, and how
the mask token is found."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import dllm_trainer  # noqa: F401  (registers LLaDA / Dream with the Auto classes)
from core_helpers import LogRecorder, copy_with_tokenizer, tiny_tokenizer_without_mask
from dllm_trainer.training.collator import DiffusionCollator
from dllm_trainer.config import TrainConfig
from dllm_trainer.data import asset_path
from dllm_trainer.training.export import fuse_adaptor, training_metadata
from dllm_trainer.families import BERT, DREAM, LLADA, get_family
from dllm_trainer.training.loading import MASK_TOKEN_ADDED, load_for_training, resolve_mask_token
from dllm_trainer.training.noise import NoiseSchedule, draw_masks
from dllm_trainer.training.train import run_training
from dllm_trainer.sampling import generate
from tiny_tokenizer import make_tiny_tokenizer

IGN = -100
EOS = PAD = 2
MASK = 500
HEADS = {"llada": "q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out",
         "dream": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
         "llada_moe": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"}
METHOD = {"llada": "llada", "llada_moe": "llada", "dream": "dream"}  # LLaDA-MoE trains with the llada method
MODEL_CLASS = {"llada": "LLaDAModelLM", "llada_moe": "LLaDAMoEModelLM", "dream": "DreamModel"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def fixture_dir(request, family: str) -> Path:
    return request.getfixturevalue(f"{family}_tiny")


def load(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path)).eval()


def probe_ids(tokenizer) -> dict:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 5?"}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt[0] == 1 and len(prompt) > 10
    ids = torch.tensor([prompt + [MASK] * 4, prompt[:6] + [MASK] * (len(prompt) - 2)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def safetensor_keys(folder: Path) -> set[str]:
    keys = set()
    for f in folder.glob("model*.safetensors"):  # not the fixtures' reference outputs
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


# ------------------------------------------------------------------------------ training runs


@pytest.mark.parametrize("family", ["llada", "llada_moe", "dream"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_save_reload(request, tmp_path, tokenizer, family, lora):
    src = fixture_dir(request, family)
    model_dir = copy_with_tokenizer(src, tmp_path / "model", tokenizer)
    out = tmp_path / "out"
    raw = dict(model_name=str(model_dir), dataset_name=str(asset_path("chat_small.jsonl")), output_dir=str(out),
               training_method=METHOD[family], train_device="cpu", max_length=64, batch_size=8, num_train_epochs=0,
               train_steps=40, logging_steps=1, eval_strategy="steps", eval_steps=10, save_steps=1000,
               warmup_ratio=0, learning_rate_schedule="constant", seed=3, lora=lora,
               learning_rate=1e-2 if lora else 3e-3, lora_r=8, lora_alpha=16, lora_target_modules=HEADS[family])
    cfg = TrainConfig.from_dict(raw)
    probe = probe_ids(tokenizer)
    seen = {}

    def grab(model):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(**probe).logits.detach().clone()

    rec = LogRecorder(on_end=grab)
    lines: list[str] = []
    result = run_training(cfg, log=lines.append, extra_callbacks=[rec])

    losses = rec.train_losses()
    assert len(losses) >= 40 and all(math.isfinite(x) for x in losses)
    early, late = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert late < 0.75 * early, (family, lora, losses)
    evals = [e["eval_loss"] for e in rec.logs if "eval_loss" in e]
    assert len(evals) >= 4 and evals[-1] < evals[0], evals
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 40

    original = load(src)
    with torch.no_grad():
        before = original(**probe).logits
    if lora:
        assert any(f"LoRA r=8 alpha=16 on {HEADS[family]}" in ln for ln in lines), lines
        assert result.final_model_dir is None
        saved = tmp_path / "fused"
        fuse_adaptor(str(model_dir), result.adaptor_dir, str(saved), family_name=METHOD[family], log=lambda *a: None)
        tol = 1e-4
    else:
        saved = Path(result.final_model_dir)
        tol = 1e-6
    # the published on-disk format: the same tensor names as the checkpoint we started from
    assert safetensor_keys(saved) == safetensor_keys(src)
    reloaded = load(saved)
    assert type(reloaded).__name__ == MODEL_CLASS[family]
    assert reloaded.config.mask_token_id == MASK
    with torch.no_grad():
        after = reloaded(**probe).logits
    assert after.shape == seen["logits"].shape
    assert torch.allclose(after, seen["logits"], atol=tol, rtol=0), (after - seen["logits"]).abs().max()
    assert not torch.allclose(after, before, atol=1e-3)  # training changed the model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(saved))
    assert tok.mask_token_id == MASK and tok.eos_token_id == EOS
    # the reloaded model samples with its family's sampler: prompt kept, every mask decoded
    prompt = probe["input_ids"][:1, :8]
    out = generate(reloaded, prompt, gen_length=8, steps=8, block_length=8)
    assert out.shape == (1, 16) and torch.equal(out[:, :8], prompt) and not (out == MASK).any()


# ------------------------------------------------------------------------------ LLaDA: EOS padding


def _rows(prompt_lens, resp_lens, start=10):
    rows, nxt = [], start
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        ids = list(range(nxt, nxt + p + r))
        nxt += p + r
        rows.append({"input_ids": ids, "labels": [IGN] * p + ids[p:], "prompt_len": p, "sample_index": i})
    return rows


def test_llada_pads_responses_with_trainable_eos():
    rows = _rows([3, 2, 4], [2, 6, 1])
    batch = DiffusionCollator(family=LLADA, pad_token_id=PAD, eos_token_id=EOS)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    L = max(lengths)
    assert batch["input_ids"].shape == (3, L)
    for b, r in enumerate(rows):
        n = lengths[b]
        assert batch["input_ids"][b, :n].tolist() == r["input_ids"]
        assert batch["labels"][b, :n].tolist() == r["labels"]
        assert (batch["input_ids"][b, n:] == EOS).all()
        assert (batch["labels"][b, n:] == EOS).all()  # trainable: LLaDA learns where the answer ends
    assert (batch["attention_mask"] == 1).all()  # EOS padding is attended
    # so the noise can mask the EOS padding, and it counts as a trainable token
    pad = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for b, n in enumerate(lengths):
        pad[b, n:] = True
    masked, _ = draw_masks(batch["labels"], batch["sample_index"], schedule=NoiseSchedule(min_ratio=0.9),
                           seed=0, epoch=0)
    assert masked[pad].any()
    assert int((batch["labels"] != IGN).sum()) == sum(r for r in (2, 6, 1)) + int(pad.sum())


def test_bert_and_ignored_dream_padding_is_not_trained():
    rows = _rows([3, 2], [2, 6])
    ignored = dataclasses.replace(DREAM, padding=DREAM.padding_option("ignored"))  # dream_padding: ignored
    for fam in (BERT, ignored):
        batch = DiffusionCollator(family=fam, pad_token_id=PAD, eos_token_id=EOS, perbatch_cutoff=False)(rows)
        assert batch["input_ids"].shape == (2, 8)
        assert batch["input_ids"][0, 5:].tolist() == [PAD] * 3
        assert batch["labels"][0, 5:].tolist() == [IGN] * 3
        assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 3


def test_dream_pads_with_trained_pad_token_out_of_attention_by_default():
    """dllm's Dream SFT: label of the padding = pad token (trained), attention_mask 0 there."""
    rows = _rows([3, 2], [2, 6])
    batch = DiffusionCollator(family=DREAM, pad_token_id=PAD + 5, eos_token_id=EOS, perbatch_cutoff=False)(rows)
    assert batch["input_ids"][0, 5:].tolist() == [PAD + 5] * 3  # the pad token, as the reference collator
    assert batch["labels"][0, 5:].tolist() == [PAD + 5] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert int((batch["labels"] != IGN).sum()) == 2 + 6 + 3


# ------------------------------------------------------------------------------ Dream: logits shift


def test_dream_align_logits_and_output_positions():
    B, L, V = 2, 5, 7
    logits = torch.arange(B * L * V, dtype=torch.float32).reshape(B, L, V)
    aligned = DREAM.align_logits(logits)
    for b in range(B):
        assert torch.equal(aligned[b, 0], logits[b, 0])  # position 0 from output 0
        for i in range(1, L):
            assert torch.equal(aligned[b, i], logits[b, i - 1])  # position i from output i-1
    assert torch.equal(LLADA.align_logits(logits), logits) and torch.equal(BERT.align_logits(logits), logits)
    flat = torch.tensor([0, 1, 4, 5, 6, 9])  # row 1 starts at flat index 5
    assert DREAM.output_positions(flat, L).tolist() == [0, 0, 3, 5, 5, 8]
    assert LLADA.output_positions(flat, L).tolist() == flat.tolist()


@pytest.mark.parametrize("family", ["llada", "llada_moe", "dream"])
def test_masked_token_loss_matches_full_logits(request, family):
    fam = get_family(METHOD[family])
    model = load(fixture_dir(request, family))
    assert get_family(model) is fam
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (2, 12), generator=g)
    attn = torch.ones_like(ids)
    positions = torch.tensor([0, 3, 7, 12, 13, 23])  # 12: first position of row 1
    ids.view(-1)[positions] = MASK
    targets = torch.randint(3, 400, (6,), generator=g)
    with torch.no_grad():
        loss, correct = fam.masked_token_loss(model, ids, attn, None, positions, targets)
        logits = model(input_ids=ids, attention_mask=attn).logits  # raw model output
    # which output predicts each token, written out by hand: (row, output index)
    src = {"llada": [(0, 0), (0, 3), (0, 7), (1, 0), (1, 1), (1, 11)],
           "dream": [(0, 0), (0, 2), (0, 6), (1, 0), (1, 0), (1, 10)]}[METHOD[family]]
    picked = torch.stack([logits[b, i] for b, i in src])
    expected = F.cross_entropy(picked, targets, reduction="none")
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.equal(correct, picked.argmax(-1) == targets)
    if family == "dream":  # the unshifted outputs give another loss: the shift matters
        unshifted = F.cross_entropy(logits.flatten(0, 1)[positions], targets, reduction="none")
        assert not torch.allclose(loss, unshifted, atol=1e-3)


# ------------------------------------------------------------------------------ Dream: cutoffs


def _resp_lens(batch, rows):
    return [int(batch["attention_mask"][b].sum()) - r["prompt_len"] for b, r in enumerate(rows)]


def test_perbatch_cutoff_trims_longer_responses_to_one_drawn_from_the_batch():
    rows = _rows([3, 2, 4, 1], [5, 2, 7, 3])
    orig = [5, 2, 7, 3]
    kept_seen = set()
    for seed in range(30):
        batch = DiffusionCollator(family=DREAM, pad_token_id=PAD, eos_token_id=EOS, perbatch_cutoff=True,
                                  seed=seed)(rows)
        resp = _resp_lens(batch, rows)
        kept = max(resp)
        assert kept in orig
        assert resp == [min(n, kept) for n in orig]
        assert batch["input_ids"].shape[1] == max(r["prompt_len"] + n for r, n in zip(rows, resp))
        for b, r in enumerate(rows):
            n = r["prompt_len"] + resp[b]
            assert batch["input_ids"][b, :n].tolist() == r["input_ids"][:n]
            assert batch["labels"][b, :n].tolist() == r["labels"][:n]
            # the padding after the cut is trained (dream_padding: eos_trained, the reference's)
            assert (batch["labels"][b, n:] == PAD).all() and (batch["input_ids"][b, n:] == PAD).all()
            assert (batch["attention_mask"][b, n:] == 0).all()
        kept_seen.add(kept)
        # reproducible: the same batch collates the same way (exact resume)
        again = DiffusionCollator(family=DREAM, pad_token_id=PAD, eos_token_id=EOS, seed=seed)(rows)
        assert torch.equal(again["input_ids"], batch["input_ids"])
    assert len(kept_seen) >= 3


def test_resp_cutoff_ratio_chops_less_than_the_shortest_response():
    rows = _rows([3, 2, 4, 1], [5, 4, 7, 6])
    full_len = max(len(r["input_ids"]) for r in rows)  # 11
    min_resp = 4
    uncut = DiffusionCollator(family=DREAM, pad_token_id=PAD, perbatch_cutoff=False, resp_cutoff_ratio=0.0)(rows)
    assert uncut["input_ids"].shape[1] == full_len
    widths = set()
    for seed in range(30):
        batch = DiffusionCollator(family=DREAM, pad_token_id=PAD, perbatch_cutoff=False, resp_cutoff_ratio=1.0,
                                  seed=seed)(rows)
        W = batch["input_ids"].shape[1]
        assert full_len - min_resp < W < full_len
        for k in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(batch[k], uncut[k][:, :W])
        assert ((batch["labels"] != IGN).sum(1) >= 1).all()  # every row keeps part of its response
        widths.add(W)
    assert len(widths) >= 2
    # perbatch_cutoff on: the random chop is not used (only the per-batch trim)
    b = DiffusionCollator(family=DREAM, pad_token_id=PAD, perbatch_cutoff=True, resp_cutoff_ratio=1.0, seed=1)(rows)
    assert b["input_ids"].shape[1] == max(r["prompt_len"] + n for r, n in zip(rows, _resp_lens(b, rows)))


def test_cutoffs_are_dream_only():
    rows = _rows([3, 2, 4, 1], [5, 4, 7, 6])
    for fam in (LLADA, BERT):
        for kw in ({"perbatch_cutoff": True}, {"perbatch_cutoff": False, "resp_cutoff_ratio": 1.0}):
            batch = DiffusionCollator(family=fam, pad_token_id=PAD, eos_token_id=EOS, seed=0, **kw)(rows)
            assert batch["input_ids"].shape[1] == 11
            for b, r in enumerate(rows):
                assert batch["input_ids"][b, :len(r["input_ids"])].tolist() == r["input_ids"]


# ------------------------------------------------------------------------------ loss weights


def test_default_loss_weights_per_method():
    base = {"model_name": "m", "dataset_name": "d"}
    expected = {"bert": ("scheduler", None), "llada": ("scheduler", None), "dream": ("cart", 0.3)}
    for method, want in expected.items():
        cfg = TrainConfig.from_dict({**base, "training_method": method})
        assert cfg.loss_weight == want
        fam_cfg = TrainConfig.from_dict({**base, "loss_weight_type": get_family(method).default_loss_weight})
        assert fam_cfg.loss_weight == want
        meta = training_metadata(cfg, {}, base_model="m", adaptor_dir=None)
        assert meta["loss_weight_resolved"] == {"bert": "scheduler", "llada": "scheduler",
                                               "dream": "cart[geo_p:0.3]"}[method]


# ------------------------------------------------------------------------------ mask token


def test_mask_token_from_config_wins(llada_tiny):
    model = load(llada_tiny)
    tok = make_tiny_tokenizer(mask_id=499)
    lines = []
    assert resolve_mask_token(model, tok, log=lines.append) == MASK
    assert model.config.mask_token_id == MASK and not lines


def test_mask_token_from_tokenizer(dream_tiny):
    model = load(dream_tiny)
    model.config.mask_token_id = None
    tok = make_tiny_tokenizer(mask_id=499)
    lines = []
    assert resolve_mask_token(model, tok, log=lines.append) == 499
    assert model.config.mask_token_id == 499 and not lines
    assert model.get_input_embeddings().weight.shape[0] == 512


@pytest.mark.parametrize("family", ["llada", "llada_moe", "dream"])
def test_mask_token_added_when_missing(request, tmp_path, family):
    src = fixture_dir(request, family)
    tok = tiny_tokenizer_without_mask()
    model_dir = copy_with_tokenizer(src, tmp_path / "model", tok)
    conf = json.loads((model_dir / "config.json").read_text())
    conf["mask_token_id"] = None
    (model_dir / "config.json").write_text(json.dumps(conf))
    cfg = TrainConfig.from_dict({"model_name": str(model_dir), "dataset_name": "d", "training_method": METHOD[family],
                                 "train_device": "cpu", "lora": "false", "max_length": 64})
    lines: list[str] = []
    loaded = load_for_training(cfg, log=lines.append)
    assert loaded.mask_token_id == 512  # the next id after the 512-token vocabulary
    assert loaded.tokenizer.mask_token_id == 512 and loaded.tokenizer.mask_token == MASK_TOKEN_ADDED
    assert loaded.model.config.mask_token_id == 512
    assert loaded.model.get_input_embeddings().weight.shape[0] >= 513
    assert loaded.model.get_output_embeddings().weight.shape[0] >= 513
    assert any(MASK_TOKEN_ADDED in ln and "512" in ln and "resized" in ln for ln in lines), lines
    ids = torch.tensor([[1, 5, 512, 512, 7]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert logits.shape[-1] >= 513 and torch.isfinite(logits).all()


def test_config_mask_id_outside_the_vocabulary_is_not_used(tmp_path, llada_tiny):
    """A config without mask_token_id gets the published model's default (126336 for LLaDA), which a
    small vocabulary does not have: the tokenizer's mask token must be used instead."""
    tok = make_tiny_tokenizer()
    model_dir = copy_with_tokenizer(llada_tiny, tmp_path / "model", tok)
    conf = json.loads((model_dir / "config.json").read_text())
    del conf["mask_token_id"]
    (model_dir / "config.json").write_text(json.dumps(conf))
    cfg = TrainConfig.from_dict({"model_name": str(model_dir), "dataset_name": "d", "training_method": "llada",
                                 "train_device": "cpu", "lora": "false", "max_length": 64})
    lines: list[str] = []
    loaded = load_for_training(cfg, log=lines.append)
    assert loaded.mask_token_id == MASK
    assert any("126336" in ln and "ignoring" in ln for ln in lines), lines
    assert loaded.model.config.mask_token_id == MASK
