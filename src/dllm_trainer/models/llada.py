"""LLaDA (GSAI-ML/LLaDA-8B-Base, LLaDA-8B-Instruct, LLaDA-1.5) without remote code.

Loads the published checkpoints as they are: same ``config.json`` keys, same parameter names
(``model.transformer.wte``, ``model.transformer.blocks.{i}.{q,k,v}_proj`` ...). The math follows
the published ``modeling_llada.py`` for the LLaMA-style block (``block_type: "llama"``) that all
released dense LLaDA models use:

* pre-norm blocks, RMSNorm computed in float32 (``x * rsqrt(mean(x^2) + eps)``, eps inside the
  root), cast back to the input dtype, then scaled by the weight;
* SwiGLU MLP ``ff_out(act(ff_proj(x)) * up_proj(x))``: ``ff_proj`` is the gated branch;
* rotary embeddings with the rotate-half convention, always applied in float32;
* attention is bidirectional (no causal mask): it is a masked diffusion model, not an AR LM;
* untied output head ``transformer.ff_out`` (or the embedding matrix when ``weight_tying``),
  over ``embedding_size`` rows, which may exceed ``vocab_size``; optional ``scale_logits``.

Differences from the published code add features without changing the function (parity with
the reference logits is tested to 1e-4 in float32): attention goes through
``F.scaled_dot_product_attention`` with a boolean mask (2-D padding masks hide padded keys; 4-D
masks allow block-diagonal packing), explicit position ids are honoured (the published code
always uses ``arange``), the head can run at selected positions only with chunked cross-entropy
(``output_head.py``), and Fast-dLLM block caching goes through ``BlockKVCache`` (``kv_cache.py``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .kv_cache import BlockKVCache, plan_forward, splice
from .output_head import (
    DiffusionLMOutput,
    LinearHead,
    QueryRows,
    check_forward_kwargs,
    linear_head_of,
    output_head_fields,
    prunes_last_block,
)
from .serialization import full_diff_dict
from .swiglu import swiglu

LLADA2_MOE_ERROR = (
    "LLaDA 2.x MoE (model_type 'llada2_moe', LLaDA2MoeModelLM, e.g. inclusionAI/LLaDA2.0-mini) is not "
    "supported yet. Supported: dense LLaDA (model_type 'llada', LLaDAModelLM), LLaDA-MoE-7B-A1B "
    "(LLaDAMoEModelLM) and Dream."
)

# Published config.json carries these so the official remote code can be found; we keep writing them.
LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}

# Keys that only MoE configs carry (LLaDA-MoE, LLaDA 2.x); a dense config never has them.
_MOE_KEYS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_topk",
    "expert_intermediate_size",
    "moe_intermediate_size",
    "num_shared_experts",
)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
# The architecture keys of the published config.json, with LLaDA-8B's values as defaults.
LLADA_DEFAULTS = dict(
    d_model=4096,
    n_heads=32,
    n_kv_heads=None,
    n_layers=32,
    mlp_ratio=4,
    mlp_hidden_size=12288,
    activation_type="silu",
    block_type="llama",
    block_group_size=1,
    alibi=False,
    alibi_bias_max=8.0,
    rope=True,
    rope_full_precision=True,
    rope_theta=500000.0,
    flash_attention=False,
    attention_dropout=0.0,
    multi_query_attention=None,
    attention_layer_norm=False,
    attention_layer_norm_with_affine=True,
    residual_dropout=0.0,
    embedding_dropout=0.0,
    input_emb_norm=False,
    layer_norm_type="rms",
    layer_norm_with_affine=True,
    bias_for_layer_norm=False,
    rms_norm_eps=1e-5,
    max_sequence_length=4096,
    include_bias=False,
    include_qkv_bias=False,
    scale_logits=False,
    vocab_size=126464,
    embedding_size=126464,
    weight_tying=False,
    mask_token_id=126336,
    init_device="meta",
    init_fn="mitchell",
    init_std=0.02,
    init_cutoff_factor=None,
    precision="amp_bf16",
    use_cache=False,
)


class LLaDAConfig(PretrainedConfig):
    """Configuration of a dense LLaDA model; accepts every key of the published config.json.

    Defaults describe LLaDA-8B. Keys that only matter to the original OLMo-derived training code
    (``init_device``, ``init_fn``, ``precision``, ``flash_attention`` ...) are kept for round
    trips and otherwise ignored; variants we do not implement are rejected when a model is built.

    Written with a plain ``__init__`` (not transformers 5's dataclass fields) so that this file
    also serves as remote code under transformers 4.x (export.py copies it beside saved weights).
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Generic names used by transformers/peft/accelerate utilities.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
    }

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # The inclusionAI LLaDA-MoE release writes model_type "llada" too: hand it to its own class.
        if cls is LLaDAConfig:
            try:
                from .llada_moe import LLaDAMoEConfig, is_llada_moe_config
            except ImportError:  # shipped alone (remote code): __init__ refuses MoE keys clearly
                pass
            else:
                if is_llada_moe_config(config_dict):
                    return LLaDAMoEConfig.from_dict(dict(config_dict), **kwargs)
        return super().from_dict(config_dict, **kwargs)

    def __init__(self, eos_token_id=126081, pad_token_id=126081, **kwargs):
        architectures = kwargs.get("architectures") or []
        if any("moe" in str(name).lower() for name in architectures) or any(k in kwargs for k in _MOE_KEYS):
            raise ValueError(
                "LLaDAConfig is the dense LLaDA and this is an MoE configuration: use LLaDAMoEConfig for "
                "LLaDA-MoE (AutoConfig.from_pretrained picks it). " + LLADA2_MOE_ERROR
            )
        for name, default in LLADA_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        # Same attribute as weight_tying (attribute_map); transformers 4 would default it to True.
        tie = kwargs.pop("tie_word_embeddings", None)
        if tie is not None:
            self.weight_tying = tie
        kwargs["architectures"] = architectures or ["LLaDAModelLM"]
        kwargs.setdefault("auto_map", dict(LLADA_AUTO_MAP))
        super().__init__(
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=self.weight_tying, **kwargs
        )

    # Derived sizes, named as in the published code.
    @property
    def effective_n_kv_heads(self) -> int:
        if self.n_kv_heads is None:
            return 1 if self.multi_query_attention else self.n_heads
        if self.multi_query_attention is None:
            return self.n_kv_heads
        expected = 1 if self.multi_query_attention else self.n_heads
        if self.n_kv_heads != expected:
            raise ValueError("LLaDAConfig: multi_query_attention and n_kv_heads disagree; set only one of them.")
        return expected

    @property
    def effective_mlp_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def effective_embedding_size(self) -> int:
        return self.embedding_size or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_diff_dict(self) -> dict:
        # Every architecture key: the official LLaDAConfig has other defaults (GPT-2 sized,
        # sequential block, tied weights...).
        return full_diff_dict(self, super().to_diff_dict(), (*LLADA_DEFAULTS, "eos_token_id", "pad_token_id"))


class LLaDA2MoeConfig(PretrainedConfig):
    """Placeholder for ``model_type: llada2_moe`` (inclusionAI/LLaDA2.0, also MoE): refuses clearly."""

    model_type = "llada2_moe"

    def __init__(self, **kwargs):
        raise ValueError(LLADA2_MOE_ERROR)


def check_supported(config: LLaDAConfig) -> None:
    """Reject config variants this implementation does not build (rather than silently differ)."""
    problems = []
    if config.block_type != "llama":
        problems.append(f"block_type={config.block_type!r} (only 'llama', used by all released LLaDA models)")
    if config.alibi:
        problems.append("alibi=True (ALiBi is not used by LLaDA; rope is)")
    if not config.rope:
        problems.append("rope=False (learned absolute position embeddings are not implemented)")
    if getattr(config, "yarn", False):
        problems.append("yarn=True (YaRN rope scaling is not implemented)")
    if config.attention_layer_norm:
        problems.append("attention_layer_norm=True (QK-norm is not implemented)")
    if config.block_group_size != 1:
        problems.append(f"block_group_size={config.block_group_size} (changes parameter names; only 1)")
    if config.activation_type not in _ACTIVATIONS:
        problems.append(
            f"activation_type={config.activation_type!r} with block_type 'llama' (supported: {sorted(_ACTIVATIONS)})"
        )
    if config.layer_norm_type not in ("rms", "gemma_rms", "default", "low_precision"):
        problems.append(f"layer_norm_type={config.layer_norm_type!r}")
    if config.d_model % config.n_heads != 0:
        problems.append(f"d_model={config.d_model} is not divisible by n_heads={config.n_heads}")
    elif config.n_heads % config.effective_n_kv_heads != 0:
        problems.append(f"n_heads={config.n_heads} is not a multiple of n_kv_heads={config.effective_n_kv_heads}")
    if config.embedding_size is not None and config.embedding_size < config.vocab_size:
        problems.append(f"embedding_size={config.embedding_size} is smaller than vocab_size={config.vocab_size}")
    if problems:
        raise ValueError("Unsupported LLaDA configuration: " + "; ".join(problems) + ".")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
# The llama block multiplies act(ff_proj(x)) by up_proj(x) itself, so the activation must be a
# plain elementwise one ("swiglu" would gate twice and halve the width).
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "relu": F.relu,
}


class LLaDARMSNorm(nn.Module):
    """RMSNorm as published: normalise in float32, cast back, then apply the (optional) affine.

    ``gemma`` selects the ``x * (1 + weight)`` variant (``layer_norm_type: gemma_rms``).
    """

    def __init__(self, size: int, eps: float, affine: bool, bias: bool, gemma: bool = False):
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if self.weight is None:
            return h
        h = h * (1 + self.weight) if self.gemma else self.weight * h
        return h + self.bias if self.bias is not None else h


class LLaDALayerNorm(nn.Module):
    """``layer_norm_type: default`` (plain LayerNorm; the published code uses eps 1e-5 for it)."""

    def __init__(self, size: int, affine: bool, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.normalized_shape = (size,)
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def build_norm(config: LLaDAConfig) -> nn.Module:
    bias = config.bias_for_layer_norm if config.bias_for_layer_norm is not None else config.include_bias
    affine = config.layer_norm_with_affine
    if config.layer_norm_type in ("rms", "gemma_rms"):
        return LLaDARMSNorm(
            config.d_model, config.rms_norm_eps, affine, bias, gemma=config.layer_norm_type == "gemma_rms"
        )
    return LLaDALayerNorm(config.d_model, affine, bias)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos``/``sin`` of shape ``[B, 1, L, head_dim]`` for the given positions."""
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Published LLaDA rotates in float32 whatever the model dtype (sin/cos are float32 there too).
    tf = t.float()
    return (tf * cos + rotate_half(tf) * sin).to(t.dtype)


class LLaDALlamaBlock(nn.Module):
    """One pre-norm transformer block: ``x + attn(attn_norm(x))``, then ``x + mlp(ff_norm(x))``."""

    gradient_checkpointing = False  # toggled by PreTrainedModel.gradient_checkpointing_enable()

    def __init__(self, config: LLaDAConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        d, kv_dim, hidden = config.d_model, self.n_kv_heads * self.head_dim, config.effective_mlp_hidden_size
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)

        self.attn_norm = build_norm(config)
        self.ff_norm = build_norm(config)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)  # gated branch: act(ff_proj(x))
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)
        self.act = _ACTIVATIONS[config.activation_type]
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        past_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache_start: Optional[int] = None,
        query_rows: Optional[QueryRows] = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the new hidden states and this block's fresh (rotated) K/V for caching.

        With ``query_rows`` only those positions' new hidden states, ``[U, D]`` (keys and values
        still come from every position), and no K/V."""
        B, L, _ = x.shape
        h = self.attn_norm(x)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rotary(k, cos, sin)
        if query_rows is not None:
            hq, C = query_rows.per_row(h), query_rows.col.shape[1]
            q = self.q_proj(hq).view(B, C, self.n_heads, self.head_dim).transpose(1, 2)
            q = apply_rotary(q, query_rows.per_row_heads(cos), query_rows.per_row_heads(sin))
            attn_mask = query_rows.per_row_heads(attn_mask)
        else:
            q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
            q = apply_rotary(q, cos, sin)
        present = (k, v)
        if past_kv is not None:  # Fast-dLLM: attend over the cached sequence with our slice fresh
            k, v = splice(past_kv[0], k, cache_start), splice(past_kv[1], v, cache_start)
        if self.n_kv_heads != self.n_heads:  # GQA / MQA
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0, is_causal=False
        )
        if query_rows is not None:
            x, att, present = query_rows.take(x), query_rows.gather_output(att), None
        else:
            att = att.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
        x = x + self.dropout(self.attn_out(att))

        h = self.ff_norm(x)
        x = x + self.dropout(swiglu(h, self.ff_proj, self.up_proj, self.ff_out, self.act))
        return x, present


class LLaDAModel(nn.Module):
    """The published ``LLaDAModel``: ``transformer.{wte, blocks, ln_f, ff_out}``. Returns pre-norm hidden states."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.effective_embedding_size, config.d_model),
                emb_drop=nn.Dropout(config.embedding_dropout),
                ln_f=build_norm(config),
                blocks=nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
            )
        )
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(
                config.d_model, config.effective_embedding_size, bias=config.include_bias
            )

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[BlockKVCache] = None,
        use_cache: bool = False,
        cache_start: Optional[int] = None,
        output_hidden_states: bool = False,
        output_positions: Optional[torch.Tensor] = None,
    ):
        """Pre-norm hidden states ``[B, L, D]``; with ``output_positions`` (flat, no cache, no hidden
        states) only the rows there, ``[N, D]``: the last block computes no other row."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        plan = plan_forward(B, L, x.device, attention_mask, position_ids, past_key_values, use_cache, cache_start)
        if self.config.input_emb_norm:
            x = x * (self.config.d_model**0.5)
        x = self.transformer.emb_drop(x)
        cos, sin = rotary_cos_sin(plan.position_ids, self.config.head_dim, self.config.rope_theta)
        rows = QueryRows(output_positions, B, L) if output_positions is not None else None
        last = len(self.transformer.blocks) - 1

        all_hidden = []
        for i, block in enumerate(self.transformer.blocks):
            if output_hidden_states:
                all_hidden.append(x)
            args = (x, cos, sin, plan.attn_mask, plan.past_for_layer(i), plan.cache_start, rows if i == last else None)
            if block.gradient_checkpointing and block.training and torch.is_grad_enabled():
                x, present = block._gradient_checkpointing_func(block.__call__, *args)
            else:
                x, present = block(*args)
            if plan.fill:
                plan.cache.store(i, *present)
        if output_hidden_states:
            all_hidden.append(self.transformer.ln_f(x))
        if rows is not None:
            x = x.index_select(0, rows.output_index)
        return x, plan.cache, (tuple(all_hidden) if output_hidden_states else None)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + output projection (+ optional logit scaling); row-wise, so it works on gathered rows."""
        x = self.transformer.ln_f(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        if self.config.scale_logits:
            logits = logits * (1.0 / math.sqrt(self.config.d_model))
        return logits

    def linear_head(self) -> Optional[LinearHead]:
        """``head`` in parts for the fused loss (None when the projection is wrapped, e.g. by LoRA)."""
        proj = self.transformer.wte if self.config.weight_tying else self.transformer.ff_out
        scale = 1.0 / math.sqrt(self.config.d_model) if self.config.scale_logits else None
        return linear_head_of(self.transformer.ln_f, proj, scale)


# --------------------------------------------------------------------------------------------
# The transformers-facing model
# --------------------------------------------------------------------------------------------
class LLaDAModelLM(PreTrainedModel):
    """LLaDA masked diffusion LM. Forward contract: docs/ARCHITECTURE.md, "Model API"."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        check_supported(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[BlockKVCache] = None,
        use_cache: Optional[bool] = None,
        cache_start: Optional[int] = None,
        output_positions: Optional[torch.LongTensor] = None,
        target_ids: Optional[torch.LongTensor] = None,
        ce_chunk_size: int = 4096,
        target_weights: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        **kwargs,
    ):
        check_forward_kwargs(labels, output_attentions, kwargs)
        # Only the selected positions feed the head: the last block computes just those rows.
        prune = prunes_last_block(output_positions, past_key_values, use_cache, output_hidden_states)
        hidden, cache, all_hidden = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=bool(use_cache),
            cache_start=cache_start,
            output_hidden_states=bool(output_hidden_states),
            output_positions=output_positions if prune else None,
        )
        fields = output_head_fields(
            hidden, self.model.head, output_positions, target_ids, ce_chunk_size, preselected=prune,
            target_weights=target_weights, vocab_size=self.config.effective_embedding_size,
            linear_head=self.model.linear_head() if target_weights is not None else None,
        )
        out = DiffusionLMOutput(
            **fields,
            cache=cache,
            hidden_states=all_hidden,
        )
        return out if return_dict is None or return_dict else out.to_tuple()

    # -- no autoregressive generate(): diffusion sampling lives in dllm_trainer.sampling --------
    @classmethod
    def can_generate(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # Present only because peft's PeftModelForCausalLM (task_type="CAUSAL_LM") looks it up.
        raise NotImplementedError("masked diffusion models do not use generate(); see dllm_trainer.sampling")

    # -- embeddings (used by resize_token_embeddings, peft, ...) ------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        # As published: with weight tying the embedding matrix is the output projection.
        if self.config.weight_tying:
            return self.model.transformer.wte
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Module) -> None:
        if self.config.weight_tying:
            self.model.transformer.wte = value
        else:
            self.model.transformer.ff_out = value

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        # LLaDA sizes wte/ff_out by embedding_size (vocab_size may be smaller): keep both in step.
        self.config.embedding_size = embeddings.weight.shape[0]
        self.config.vocab_size = min(self.config.vocab_size, self.config.embedding_size)
        return embeddings
