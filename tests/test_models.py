"""Our LLaDA / LLaDA-MoE / Dream implementations: parity with the published code, and the Model API contract.

Parity uses the fixtures (tiny checkpoints in the published on-disk format plus logits computed
by the published modeling code). Everything else runs on small randomly initialised configs with
other shapes (GQA, tied weights, embedding_size > vocab_size, qkv bias; for LLaDA-MoE a dense
layer next to an MoE layer with a shared expert, partial rotary) so nothing is tuned to the fixtures.
"""
from __future__ import annotations

import builtins
import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from dllm_trainer.models import (
    BlockKVCache,
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    LLaDAModelLM,
    LLaDAMoEConfig,
    LLaDAMoEModelLM,
)
from dllm_trainer.models.output_head import chunked_head_cross_entropy

FAMILIES = ["llada", "llada_moe", "dream"]


pytestmark = pytest.mark.usefixtures("single_thread_module")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def llada_config(**overrides) -> LLaDAConfig:
    kw = dict(
        d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=100,
        embedding_size=128, weight_tying=True, include_qkv_bias=True, rope_theta=10000.0,
        max_sequence_length=64, mask_token_id=99, pad_token_id=0, eos_token_id=0, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    return LLaDAConfig(**kw)


def dream_config(**overrides) -> DreamConfig:
    kw = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True, mask_token_id=99,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, max_position_embeddings=64, rope_theta=1e4,
    )
    kw.update(overrides)
    return DreamConfig(**kw)


def llada_moe_config(**overrides) -> LLaDAMoEConfig:
    kw = dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, moe_layer_freq=[1, 0],
        num_experts=4, num_experts_per_tok=2, expert_intermediate_size=16, shared_expert_intermediate_size=24,
        dense_intermediate_size=40, partial_rotary_factor=0.5, vocab_size=100, tie_word_embeddings=True,
        mask_token_id=99, pad_token_id=0, eos_token_id=0, max_position_embeddings=64, rope_theta=1e4,
    )
    kw.update(overrides)
    return LLaDAMoEConfig(**kw)


def build(family: str, seed: int = 0, **overrides):
    """A random model with non-trivial weights (norm weights too), so mistakes show up in outputs."""
    torch.manual_seed(seed)
    if family == "llada":
        model = LLaDAModelLM(llada_config(**overrides))
    elif family == "llada_moe":
        model = LLaDAMoEModelLM(llada_moe_config(**overrides))
    else:
        model = DreamModel(dream_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_f." in name or name.endswith("_norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def vocab_out(model) -> int:
    return model.get_input_embeddings().weight.shape[0] if isinstance(model, LLaDAModelLM) else model.config.vocab_size


def padding_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3 :] = 0  # row 1 right-padded
    return mask


# ------------------------------------------------------------------------------------------
# parity with the published modeling code (fixtures)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fixture, auto_cls, cls",
    [
        ("llada_tiny", AutoModel, LLaDAModelLM),
        ("llada_tiny", AutoModelForCausalLM, LLaDAModelLM),
        ("llada_moe_tiny", AutoModel, LLaDAMoEModelLM),
        ("llada_moe_tiny", AutoModelForCausalLM, LLaDAMoEModelLM),
        ("dream_tiny", AutoModel, DreamModel),
    ],
)
def test_parity_with_reference_logits(request, fixture, auto_cls, cls):
    path = request.getfixturevalue(fixture)
    model = auto_cls.from_pretrained(path).eval()
    assert type(model) is cls and model.dtype == torch.float32
    ref = load_file(str(path / "reference.safetensors"))
    keep = ref["attention_mask"].bool()
    assert not keep.all(), "the fixture is expected to contain padding"
    for ids, key in (("input_ids", "logits_no_mask"), ("masked_input_ids", "logits_with_mask")):
        with torch.no_grad():
            logits = model(ref[ids], attention_mask=ref["attention_mask"]).logits
        assert logits.shape == ref[key].shape
        torch.testing.assert_close(logits[keep], ref[key][keep], atol=1e-4, rtol=0)
        # without a mask, the rows that have no padding are unchanged
        full = keep.all(dim=1)
        with torch.no_grad():
            unmasked = model(ref[ids]).logits
        torch.testing.assert_close(unmasked[full], ref[key][full], atol=1e-4, rtol=0)


def test_fixture_config_values(llada_tiny, llada_moe_tiny, dream_tiny):
    llada = AutoConfig.from_pretrained(llada_tiny)
    assert isinstance(llada, LLaDAConfig)
    assert (llada.d_model, llada.n_heads, llada.effective_n_kv_heads, llada.mask_token_id) == (64, 4, 4, 500)
    assert llada.hidden_size == 64 and llada.tie_word_embeddings is False
    moe = AutoConfig.from_pretrained(llada_moe_tiny)
    assert isinstance(moe, LLaDAMoEConfig)
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_layer_freq, moe.mask_token_id) == (4, 2, [1, 1], 500)
    assert moe.head_dim == moe.rotary_dim == 16 and moe.norm_topk_prob is False
    dream = AutoConfig.from_pretrained(dream_tiny)
    assert isinstance(dream, DreamConfig)
    assert (dream.num_key_value_heads, dream.rope_theta, dream.mask_token_id) == (2, 1e6, 500)


# ------------------------------------------------------------------------------------------
# random configs: shapes, output_positions / target_ids / chunked CE
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_random_config_head_and_loss_self_consistent(family):
    model = build(family)
    V = vocab_out(model)
    if family == "llada":
        assert V == 128 > model.config.vocab_size  # logits span embedding_size
        assert "model.transformer.ff_out.weight" not in dict(model.named_parameters())  # tied
    B, L = 2, 9
    x = torch.randint(1, 99, (B, L))
    mask = padding_mask(B, L)
    full = model(x, attention_mask=mask).logits
    assert full.shape == (B, L, V) and torch.isfinite(full).all()

    positions = torch.tensor([0, 3, 4, 8, 9, 12, 14])
    targets = torch.randint(0, 99, (positions.numel(),))
    flat = full.reshape(B * L, V)[positions]
    sel = model(x, attention_mask=mask, output_positions=positions).logits
    torch.testing.assert_close(sel, flat, atol=1e-5, rtol=1e-5)

    out = model(x, attention_mask=mask, output_positions=positions, target_ids=targets)
    assert out.logits is None
    assert out.token_loss.dtype == torch.float32 and out.token_correct.dtype == torch.bool
    torch.testing.assert_close(out.token_loss, F.cross_entropy(flat, targets, reduction="none"), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.token_correct, flat.argmax(-1) == targets)

    # chunked (3 rows at a time, checkpointed) == one chunk, values and gradients
    grads = []
    for chunk in (3, 10_000):
        model.zero_grad()
        o = model(x, attention_mask=mask, output_positions=positions, target_ids=targets, ce_chunk_size=chunk)
        o.token_loss.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if chunk == 3:
            loss3 = o.token_loss.detach()
        else:
            torch.testing.assert_close(o.token_loss.detach(), loss3, atol=1e-6, rtol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_ce_keeps_no_full_logits_for_backward():
    """With checkpointed chunks, autograd saves only the chunk inputs, never [N x V] logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 1000)
    hidden = torch.randn(64, 8, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_head_cross_entropy(head, hidden, targets, chunk_size=16)
    assert max(saved) < 64 * 1000 / 2
    loss.sum().backward()
    ref = F.cross_entropy(head(hidden.detach()), targets, reduction="none")
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_untied_gqa_variants_run(family):
    if family == "llada":
        model = build(family, weight_tying=False, embedding_size=None, n_kv_heads=1, include_qkv_bias=False,
                      include_bias=True, scale_logits=True)
        assert model.get_output_embeddings() is model.model.transformer.ff_out
        assert model.get_output_embeddings().bias is not None
    else:
        model = build(family, tie_word_embeddings=False, num_key_value_heads=4)
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    x = torch.randint(1, 99, (2, 7))
    logits = model(x).logits
    assert logits.shape == (2, 7, 100) and torch.isfinite(logits).all()
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], logits)
    hidden = model(x, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and hidden[0].shape == (2, 7, 32)


# ------------------------------------------------------------------------------------------
# masks: padding, packing (4-D block diagonal + per-row position ids)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_never_produces_nan(family):
    model = build(family)
    x = torch.randint(1, 99, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 2:] = 0
    mask[2] = 0  # a fully padded row
    out = model(x, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    # padding only affects the padded keys: the real prefix of row 1 equals running it alone
    alone = model(x[1:2, :2]).logits
    torch.testing.assert_close(out[1, :2], alone[0], atol=1e-5, rtol=1e-5)
    # a 4-D pairwise mask (padded queries attend to nothing) is also NaN-free, including grads
    pair = (mask[:, None, :, None] * mask[:, None, None, :]).bool()
    model.train()
    out4 = model(x, attention_mask=pair)
    assert torch.isfinite(out4.logits).all()
    out4.logits[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_block_diagonal_equals_separate(family):
    model = build(family)
    a, b = torch.randint(1, 99, (1, 5)), torch.randint(1, 99, (1, 7))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([0] * 5 + [1] * 7)
    mask4 = (seg[:, None] == seg[None, :])[None, None]  # [1, 1, 12, 12], True = attend
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(packed, attention_mask=mask4, position_ids=pos).logits
        sep_a, sep_b = model(a).logits, model(b).logits
    torch.testing.assert_close(out[:, :5], sep_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], sep_b, atol=1e-5, rtol=1e-5)
    # rope is relative, so a constant shift per segment is harmless; other position ids are honoured
    with torch.no_grad():
        spread = model(a, position_ids=2 * torch.arange(5)[None]).logits
    assert not torch.allclose(spread, sep_a, atol=1e-3)


# ------------------------------------------------------------------------------------------
# KV cache (Fast-dLLM prefix / dual)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_block_kv_cache_prefix_and_dual(family):
    model = build(family)
    x = torch.randint(1, 99, (2, 16))
    mask = padding_mask(2, 16)
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        filled = model(x, attention_mask=mask, use_cache=True)
        cache = filled.past_key_values
        assert isinstance(cache, BlockKVCache) and len(cache) == 2 and cache.seq_len == 16
        torch.testing.assert_close(filled.logits, ref, atol=1e-6, rtol=0)
        snapshot = [k.clone() for k in cache.keys] + [v.clone() for v in cache.values]

        s, e = 4, 8
        dual = model(x[:, s:e], past_key_values=cache, cache_start=s)  # mask taken from the cache
        prefix = model(x[:, s:], past_key_values=cache, cache_start=s, attention_mask=mask)
        torch.testing.assert_close(dual.logits, ref[:, s:e], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prefix.logits, ref[:, s:], atol=1e-5, rtol=1e-5)
        # head at selected positions of the cached block works too
        sel = model(x[:, s:e], past_key_values=cache, cache_start=s, output_positions=torch.tensor([1, 6])).logits
        torch.testing.assert_close(sel, ref[:, s:e].reshape(-1, ref.shape[-1])[[1, 6]], atol=1e-5, rtol=1e-5)
    # the cache is read, never written
    for before, after in zip(snapshot, cache.keys + cache.values):
        assert torch.equal(before, after)

    # refresh = a new full forward into the same cache object
    with torch.no_grad():
        y = x.clone()
        y[:, 0] = 98
        refreshed = model(y, attention_mask=mask, past_key_values=cache, use_cache=True).past_key_values
    assert refreshed is cache and not torch.equal(cache.keys[0], snapshot[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_block_kv_cache_uses_fresh_block_kv(family):
    """With one layer, cached K/V of the other positions are exact, so a dual-cache forward over a
    changed block must equal a full forward of the changed sequence: proves the slice is fresh."""
    layers = {"n_layers": 1} if family == "llada" else {"num_hidden_layers": 1}
    model = build(family, **layers)
    x = torch.randint(1, 99, (2, 12))
    with torch.no_grad():
        cache = model(x, use_cache=True).past_key_values
        y = x.clone()
        y[:, 4:8] = 99  # the block is remasked
        want = model(y).logits[:, 4:8]
        got = model(y[:, 4:8], past_key_values=cache, cache_start=4).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kv_cache_errors():
    model = build("llada")
    x = torch.randint(1, 99, (1, 8))
    with pytest.raises(ValueError, match="cache_start requires past_key_values"):
        model(x, cache_start=0)
    with pytest.raises(ValueError, match="empty"):
        model(x, past_key_values=BlockKVCache(), cache_start=0)
    with torch.no_grad():
        cache = model(x, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="does not fit"):
        model(x[:, :4], past_key_values=cache, cache_start=6)


# ------------------------------------------------------------------------------------------
# save / load, Auto registration, no remote-code prompt, MoE refusal
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    model = build(family)
    x = torch.randint(1, 99, (2, 6))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model.config.model_type
    assert saved["architectures"] == [type(model).__name__]
    assert "AutoConfig" in saved["auto_map"] and "AutoModel" in saved["auto_map"]
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    if family == "dream":
        assert (tmp_path / "generation_config.json").is_file()  # the published loader requires it


@pytest.mark.parametrize("fixture", ["llada_tiny", "llada_moe_tiny", "dream_tiny"])
def test_saved_checkpoint_keeps_published_format(request, fixture, tmp_path):
    src = request.getfixturevalue(fixture)
    model = AutoModel.from_pretrained(src)
    model.save_pretrained(tmp_path)
    original = json.loads((src / "config.json").read_text())
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():
        if key == "torch_dtype":
            assert saved.get("torch_dtype") == value or saved.get("dtype") == value
        else:
            assert saved.get(key) == value, key
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_loading_never_prompts_for_remote_code(llada_tiny, llada_moe_tiny, dream_tiny, tmp_path, monkeypatch):
    """The fixtures carry auto_map (remote code); with stdin closed nothing may prompt or fail."""

    def no_input(*args, **kwargs):
        raise AssertionError("transformers asked for input (remote-code prompt)")

    monkeypatch.setattr(builtins, "input", no_input)
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))
    sys.stdin.close()
    for src, cfg_cls, model_cls in ((llada_tiny, LLaDAConfig, LLaDAModelLM), (dream_tiny, DreamConfig, DreamModel),
                                    (llada_moe_tiny, LLaDAMoEConfig, LLaDAMoEModelLM)):
        local = tmp_path / src.name
        shutil.copytree(src, local)
        assert "auto_map" in json.loads((local / "config.json").read_text())
        assert type(AutoConfig.from_pretrained(local)) is cfg_cls
        assert type(AutoModel.from_pretrained(local)) is model_cls
        # even when remote code is allowed, the registered local classes win (no code is fetched)
        assert type(AutoModel.from_pretrained(local, trust_remote_code=True)) is model_cls
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / llada_tiny.name)) is LLaDAModelLM


def test_llada2_moe_is_refused_clearly(tmp_path):
    cfg = {"model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"], "hidden_size": 64, "num_experts": 8,
           "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LLaDA 2.x MoE .* is not supported yet"):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LLaDA 2.x MoE .* is not supported yet"):
        AutoModel.from_pretrained(tmp_path)


def test_moe_keys_through_llada_config_point_to_llada_moe():
    with pytest.raises(ValueError, match="use LLaDAMoEConfig"):
        LLaDAConfig(num_experts=64, hidden_size=2048)
    with pytest.raises(ValueError, match="use LLaDAMoEConfig"):
        LLaDAConfig(architectures=["LLaDAMoEModelLM"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"alibi": True, "rope": False}, "alibi"),
        ({"block_type": "sequential"}, "block_type"),
        ({"activation_type": "swiglu"}, "activation_type"),
        ({"attention_layer_norm": True}, "attention_layer_norm"),
    ],
)
def test_unsupported_llada_variants_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        LLaDAModelLM(llada_config(**overrides))


def test_unsupported_dream_variants_raise():
    with pytest.raises(ValueError, match="rope_scaling"):
        DreamModel(dream_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


# ------------------------------------------------------------------------------------------
# training features: peft LoRA, gradient checkpointing, resize, dtypes
# ------------------------------------------------------------------------------------------
LORA_TARGETS = {
    "llada": ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj"],
    "dream": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llada_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "targets, task_type, checkpointing",
    [("all-linear", None, False), ("explicit", "CAUSAL_LM", True)],
)
def test_peft_lora_wraps_and_trains(family, targets, task_type, checkpointing):
    from peft import LoraConfig, get_peft_model

    untied = {"weight_tying": False} if family == "llada" else {"tie_word_embeddings": False}
    model = build(family, **untied)
    if checkpointing:
        model.gradient_checkpointing_enable()
    target_modules = "all-linear" if targets == "all-linear" else LORA_TARGETS[family]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type=task_type)
    peft_model = get_peft_model(model, lora)
    wrapped = {n.rsplit(".", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    leaf = {w.rsplit(".", 1)[-1] for w in wrapped}
    extra = {"llada": {"ff_out"}, "llada_moe": {"gate"}}.get(family, set())  # all-linear: LLaDA's ff_out, the router
    expected = set(LORA_TARGETS[family]) | (extra if targets == "all-linear" else set())
    assert leaf == expected
    if family == "llada_moe":  # layer 0: 4 experts + shared expert (+ router); layer 1: dense MLP
        assert len(wrapped) == 4 + 4 * 3 + 3 + (targets == "all-linear") + 4 + 3
    else:
        assert len(wrapped) == len(expected) * 2  # every layer
    assert not any(w.endswith("transformer.ff_out") or w.endswith("lm_head") for w in wrapped)  # output head untouched

    peft_model.train()
    x = torch.randint(1, 99, (2, 8))
    positions = torch.tensor([1, 2, 9, 15])
    out = peft_model(input_ids=x, output_positions=positions, target_ids=torch.randint(0, 99, (4,)))
    out.token_loss.mean().backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads) and any(g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_same_gradients(family):
    model = build(family).train()
    x = torch.randint(1, 99, (2, 8))
    mask = padding_mask(2, 8)
    positions, targets = torch.tensor([0, 5, 9, 12]), torch.randint(0, 99, (4,))

    def grads():
        model.zero_grad()
        model(x, attention_mask=mask, output_positions=positions, target_ids=targets).token_loss.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    blocks = model.model.transformer.blocks if family == "llada" else model.model.layers
    assert all(b.gradient_checkpointing for b in blocks)
    calls = []
    for b in blocks:
        fn = b._gradient_checkpointing_func
        b._gradient_checkpointing_func = lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k)
    ckpt = grads()
    assert len(calls) == len(blocks)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    model.gradient_checkpointing_disable()


@pytest.mark.parametrize("family, overrides", [
    ("llada", {}), ("llada", {"weight_tying": False}), ("dream", {}), ("dream", {"tie_word_embeddings": False}),
    ("llada_moe", {}), ("llada_moe", {"tie_word_embeddings": False}),
])
def test_resize_token_embeddings_for_added_mask_token(family, overrides):
    model = build(family, **overrides)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + 1)
    assert model.get_input_embeddings().weight.shape[0] == old + 1
    assert model.get_output_embeddings().weight.shape[0] == old + 1
    if family == "llada":
        assert model.config.embedding_size == old + 1
    logits = model(torch.tensor([[1, 2, old]])).logits
    assert logits.shape[-1] == old + 1 and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(family, dtype):
    model = build(family)
    x = torch.randint(1, 99, (2, 8))
    mask = padding_mask(2, 8)
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        model.to(dtype)
        out = model(x, attention_mask=mask)
        loss = model(x, attention_mask=mask, output_positions=torch.tensor([0, 9]), target_ids=torch.tensor([3, 4]))
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert loss.token_loss.dtype == torch.float32
    keep = mask.bool()
    scale = ref[keep].abs().max()
    assert (out.logits.float()[keep] - ref[keep]).abs().max() < 0.05 * scale
