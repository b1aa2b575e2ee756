"""What only LLaDA-MoE has: routing, the router load-balancing loss, its config variants, and the
inclusionAI release's config (model_type "llada" with MoE keys).

Logit parity, greedy generation, the Model API contract and training are covered with the other
families (test_models.py, test_sampling.py, test_families_training.py).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

import dllm_trainer  # noqa: F401  (registers the model classes)
from dllm_trainer.families import get_family
from dllm_trainer.models import LLaDAMoEConfig, LLaDAMoEModelLM
from dllm_trainer.models.llada_moe import LLaDAMoESparseMoeBlock, load_balancing_loss

pytestmark = pytest.mark.usefixtures("single_thread_module")


def small_config(**overrides) -> LLaDAMoEConfig:
    kw = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, num_experts=6, num_experts_per_tok=3,
              expert_intermediate_size=16, vocab_size=64, mask_token_id=63, pad_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return LLaDAMoEConfig(**kw)


def naive_moe(block: LLaDAMoESparseMoeBlock, x: torch.Tensor, renormalise: bool = False) -> torch.Tensor:
    """The reference's routing, token by token: float32 softmax over all experts (+ expert bias),
    top-k of those values as weights, no renormalisation, weighted sum of the chosen experts."""
    out = torch.zeros_like(x)
    for i, h in enumerate(x):
        probs = F.softmax(block.gate(h).float(), dim=-1)
        if block.expert_bias is not None:
            probs = probs + block.expert_bias
        w, idx = probs.topk(block.top_k)
        if renormalise:
            w = w / w.sum()
        for weight, e in zip(w, idx.tolist()):
            out[i] += weight * block.experts[e](h)
    return out


@pytest.mark.parametrize("expert_bias", [False, True])
def test_moe_block_routes_like_the_reference(expert_bias):
    torch.manual_seed(0)
    block = LLaDAMoESparseMoeBlock(small_config(moe_router_enable_expert_bias=expert_bias)).eval()
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        if expert_bias:
            block.expert_bias.copy_(torch.tensor([0.3, 0.0, -0.2, 0.1, 0.0, 0.25]))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        out, router_logits = block(x)
        want = naive_moe(block, x.reshape(-1, 32)).reshape(2, 9, 32)
    assert router_logits.shape == (18, 6)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # the weights are NOT renormalised: scaling them to sum 1 would give other outputs
    with torch.no_grad():
        renormalised = naive_moe(block, x.reshape(-1, 32), renormalise=True).reshape(2, 9, 32)
    assert (out - renormalised).abs().max() > 1e-2


def test_every_expert_gets_a_gradient_even_unrouted():
    """Experts without tokens still run (on zero rows), so every parameter has a gradient (DDP)."""
    torch.manual_seed(0)
    block = LLaDAMoESparseMoeBlock(small_config())
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[0, 0] = 10.0  # feature 0 > 0 sends every token to experts 0 and 1..2 only
    x = torch.randn(1, 5, 32)
    x[..., 0] = 3.0
    out, logits = block(x)
    out.sum().backward()
    used = set(logits.topk(3).indices.flatten().tolist())
    assert len(used) < 6
    for e, expert in enumerate(block.experts):
        grads = [p.grad for p in expert.parameters()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads) == (e in used)


def test_layer_layout_uses_the_published_names():
    """Dense layers (moe_layer_freq 0) and the shared expert sit where the reference puts them."""
    cfg = small_config(num_hidden_layers=3, moe_layer_freq=[0, 1, 1], dense_intermediate_size=24,
                       shared_expert_intermediate_size=20, qk_layernorm=True, attention_bias=True)
    names = {n: tuple(p.shape) for n, p in LLaDAMoEModelLM(cfg).state_dict().items()}
    assert names["model.layers.0.mlp.gate_proj.weight"] == (24, 32)
    assert "model.layers.0.mlp.gate.weight" not in names and "model.layers.0.shared_expert.up_proj.weight" not in names
    assert names["model.layers.1.mlp.gate.weight"] == (6, 32)
    assert names["model.layers.2.mlp.experts.5.down_proj.weight"] == (32, 16)
    assert names["model.layers.2.shared_expert.down_proj.weight"] == (32, 20)
    assert names["model.layers.1.self_attn.q_norm.weight"] == (8,) and "model.layers.1.self_attn.o_proj.bias" in names
    assert names["lm_head.weight"] == (64, 32) and names["model.norm.weight"] == (32,)


# ------------------------------------------------------------------------------ router aux loss


def test_aux_loss_values():
    torch.manual_seed(0)
    cfg = small_config(num_hidden_layers=3, moe_layer_freq=[1, 0, 1], dense_intermediate_size=24)
    model = LLaDAMoEModelLM(cfg).eval()
    x = torch.randint(1, 60, (2, 7))
    with torch.no_grad():
        assert model(x).aux_loss is None and model(x).router_logits is None  # off by default (as published)
        out = model(x, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (14, 6)  # MoE layers only
    # independent count: fraction of tokens whose s-th choice is e, times the mean probability of e
    logits = torch.cat(out.router_logits)
    probs = logits.softmax(-1)
    top = probs.topk(3).indices
    frac = torch.stack([torch.stack([(top[:, s] == e).float().mean() for e in range(6)]) for s in range(3)])
    want = 6 * (frac * probs.mean(0)).sum()
    torch.testing.assert_close(out.aux_loss, want)
    # a uniform router: every expert equally likely, aux loss == top_k exactly
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.weight.zero_()
        uniform = model(x, output_router_logits=True).aux_loss
    torch.testing.assert_close(uniform, torch.tensor(3.0))


def test_aux_loss_ignores_padding_and_can_be_enabled_in_the_config():
    torch.manual_seed(1)
    model = LLaDAMoEModelLM(small_config(output_router_logits=True)).eval()
    x = torch.randint(1, 60, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = model(x, attention_mask=mask)  # config output_router_logits=True
    keep = mask.reshape(-1).bool()
    real_only = load_balancing_loss(tuple(r[keep] for r in out.router_logits), 6, 3, None)
    torch.testing.assert_close(out.aux_loss, real_only)
    assert not torch.allclose(out.aux_loss, load_balancing_loss(out.router_logits, 6, 3, None))


# ------------------------------------------------------------------------------ configs


def test_inclusionai_release_config_loads_and_saves_back(llada_moe_tiny, tmp_path):
    """The inclusionAI release says model_type "llada" (dllm's copy "lladamoe"): same model, and the
    saved folder keeps what it read."""
    src = tmp_path / "release"
    shutil.copytree(llada_moe_tiny, src)
    conf = json.loads((src / "config.json").read_text())
    conf["model_type"] = "llada"
    conf["auto_map"]["AutoConfig"] = "configuration_lladamoe.LLaDAConfig"
    (src / "config.json").write_text(json.dumps(conf))
    cfg = AutoConfig.from_pretrained(src)
    assert type(cfg) is LLaDAMoEConfig and cfg.model_type == "llada"
    model = AutoModel.from_pretrained(src).eval()
    assert type(model) is LLaDAMoEModelLM and get_family(model).name == "llada"
    ref = load_file(str(llada_moe_tiny / "reference.safetensors"))
    keep = ref["attention_mask"].bool()
    with torch.no_grad():
        logits = model(ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    torch.testing.assert_close(logits[keep], ref["logits_no_mask"][keep], atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "llada" and saved["auto_map"] == conf["auto_map"]
    assert type(AutoModel.from_pretrained(tmp_path / "saved")) is LLaDAMoEModelLM


@pytest.mark.parametrize("overrides, message", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"moe_layer_freq": [1]}, "moe_layer_freq has 1 entries for 2 layers"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok=7"),
    ({"moe_layer_freq": [0, 1], "dense_intermediate_size": None}, "dense_intermediate_size"),
    ({"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size=-1"),
    ({"partial_rotary_factor": -1}, "partial_rotary_factor"),
])
def test_unsupported_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        LLaDAMoEModelLM(small_config(**overrides))
