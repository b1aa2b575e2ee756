"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct) without remote code.

Loads the published checkpoints as they are: the ``config.json`` keys of the release and of
dllm's copy (``model_type`` "lladamoe"; the inclusionAI release itself says "llada", which
``LLaDAConfig.from_dict`` hands over to this class) and the OLMoE-style parameter names
(``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``self_attn.{q,k}_norm``,
``input_layernorm``, ``post_attention_layernorm``, ``mlp.gate``, ``mlp.experts.{e}.{gate,up,down}_proj``,
``model.norm``, ``lm_head``). The math follows the reference modeling code (dllm's
``modeling_lladamoe.py``):

* pre-norm blocks; RMSNorm in float32, cast back to the input dtype, then scaled by the weight;
* q/k RMSNorm per head (weight of size head_dim) right after the projections, before RoPE;
  optional ``clip_qkv`` clamping after it;
* rotary cos/sin computed in float32 and cast to the activation dtype (rotation in that dtype),
  over the first ``head_dim * partial_rotary_factor`` channels;
* bidirectional attention; a 2-D ``attention_mask`` hides padded keys only;
* sparse MoE MLP: router logits ``gate(x)``, softmax over ALL experts in float32 (plus the
  optional ``expert_bias`` buffer), top-k kept WITHOUT renormalising (the reference ignores
  ``norm_topk_prob``, and ``routed_scaling_factor`` / router groups, and so do we), cast to the
  activation dtype, expert SwiGLU outputs summed with those weights; an optional shared expert
  (``layers.{i}.shared_expert``) is added; layers with ``moe_layer_freq[i] == 0`` are dense;
* untied ``lm_head`` after the final norm (tied when ``tie_word_embeddings``).

As in ``llada.py``, the differences from the reference add features without changing the
function: SDPA with boolean masks (2-D padding or 4-D packing masks), honoured position ids,
the head at selected positions with chunked cross-entropy (``output_head.py``) and Fast-dLLM
block caching (``kv_cache.py``). Experts run on their tokens gathered by one sort instead of
one ``where`` per expert (the same sums, one host sync per layer).

Router load-balancing loss: ``output_router_logits=True`` (argument or config) returns the
reference's Switch-Transformer auxiliary loss in ``out.aux_loss`` (and the per-layer router
logits). Training does not add it: dllm's trainer (the reference's training code) computes the
masked-diffusion loss from the logits only (``output_router_logits`` defaults to false there, and
the model's aux loss is never read); ``router_aux_loss_coef`` is kept for round trips.

Imports only torch, transformers and the sibling files, so it can ship as remote code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from .kv_cache import BlockKVCache, plan_forward, splice
from .output_head import DiffusionLMOutput, check_forward_kwargs, linear_head_of, output_head_fields
from .serialization import full_diff_dict

LLADA_MOE_AUTO_MAP = {
    "AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
    "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
    "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
}

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
# The architecture keys of the published config.json. Sizes default to the 7B-A1B shape (the
# reference's defaults are -1 placeholders); released config.json files set every size.
LLADA_MOE_DEFAULTS = dict(
    vocab_size=157184,
    hidden_size=2048,
    dense_intermediate_size=8192,
    expert_intermediate_size=1024,
    shared_expert_intermediate_size=None,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=None,
    hidden_act="silu",
    max_position_embeddings=8192,
    initializer_range=0.02,
    rms_norm_eps=1e-5,
    use_cache=False,
    mask_token_id=156895,
    rope_theta=50000.0,
    partial_rotary_factor=1.0,
    rope_scaling=None,
    attention_bias=False,
    attention_dropout=0.0,
    clip_qkv=None,
    num_experts_per_tok=8,
    num_experts=64,
    output_router_logits=False,
    router_aux_loss_coef=0.01,
    norm_topk_prob=False,
    qk_layernorm=True,
    moe_layer_freq=None,
    moe_router_enable_expert_bias=False,
    moe_router_score_function="softmax",
    routed_scaling_factor=1,
    router_num_group=None,
    router_topk_group=None,
)


def is_llada_moe_config(config_dict: dict) -> bool:
    """A LLaDA-MoE config.json, whatever its model_type says (the release writes "llada")."""
    archs = config_dict.get("architectures") or []
    return "LLaDAMoEModelLM" in archs or "expert_intermediate_size" in config_dict


class LLaDAMoEConfig(PretrainedConfig):
    """Configuration of a LLaDA-MoE model; accepts every key of the published config.json.

    Keys the reference ignores are kept for round trips. Written with a plain ``__init__`` (not
    transformers 5's dataclass fields) so that this file also serves as remote code under
    transformers 4.x (export.py copies it beside saved weights).
    """

    model_type = "lladamoe"
    keys_to_ignore_at_inference = ["past_key_values"]
    # A plain attribute here: transformers 5 makes rope_scaling a deprecated property of the base class.
    rope_scaling = None

    def __init__(self, pad_token_id=156892, bos_token_id=None, eos_token_id=156892, tie_word_embeddings=False,
                 **kwargs):
        for name, default in LLADA_MOE_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * self.num_hidden_layers
        if isinstance(self.rope_scaling, dict) and "type" in self.rope_scaling:
            self.rope_scaling = {**self.rope_scaling, "rope_type": self.rope_scaling["type"]}  # as the reference
        kwargs["architectures"] = kwargs.get("architectures") or ["LLaDAMoEModelLM"]
        kwargs.setdefault("auto_map", dict(LLADA_MOE_AUTO_MAP))
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layer_freq[layer_idx] != 0

    def to_dict(self) -> dict:
        out = super().to_dict()
        # The inclusionAI release says model_type "llada" (dllm's copy "lladamoe"): write back what was read.
        out["model_type"] = getattr(self, "model_type", type(self).model_type)
        return out

    def to_diff_dict(self) -> dict:
        # Write every architecture key: the reference config's defaults are -1 placeholders.
        keys = (*LLADA_MOE_DEFAULTS, "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                "model_type")
        return full_diff_dict(self, super().to_diff_dict(), keys)


def check_supported(config: LLaDAMoEConfig) -> None:
    """Reject configs the reference cannot build either, or variants not implemented here."""
    problems = []
    scaling = config.rope_scaling or {}
    if scaling and scaling.get("rope_type", "default") != "default":
        problems.append(f"rope_scaling={config.rope_scaling!r} (only plain rope is implemented)")
    if config.hidden_act not in ACT2FN:
        problems.append(f"hidden_act={config.hidden_act!r}")
    if config.hidden_size % config.num_attention_heads != 0:
        problems.append("hidden_size is not divisible by num_attention_heads")
    elif config.num_attention_heads % config.num_key_value_heads != 0:
        problems.append("num_attention_heads is not a multiple of num_key_value_heads")
    elif not (0 < config.partial_rotary_factor <= 1) or config.rotary_dim % 2:
        problems.append(f"partial_rotary_factor={config.partial_rotary_factor} (needs an even rotary size in (0, head_dim])")
    if len(config.moe_layer_freq) < config.num_hidden_layers:
        problems.append(f"moe_layer_freq has {len(config.moe_layer_freq)} entries for {config.num_hidden_layers} layers")
    else:
        moe = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
        if any(moe):
            if not (0 < config.num_experts_per_tok <= config.num_experts):
                problems.append(f"num_experts_per_tok={config.num_experts_per_tok} with num_experts={config.num_experts}")
            if config.expert_intermediate_size is None or config.expert_intermediate_size <= 0:
                problems.append(f"expert_intermediate_size={config.expert_intermediate_size}")
            shared = config.shared_expert_intermediate_size
            if shared is not None and shared <= 0:
                problems.append(f"shared_expert_intermediate_size={shared} (a positive size, or null for none)")
        if not all(moe) and (config.dense_intermediate_size is None or config.dense_intermediate_size <= 0):
            problems.append(f"dense_intermediate_size={config.dense_intermediate_size} with dense layers in moe_layer_freq")
    if problems:
        raise ValueError("Unsupported LLaDA-MoE configuration: " + "; ".join(problems) + ".")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class LLaDAMoERMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """``cos``/``sin`` ``[B, 1, L, rotary_dim]``: computed in float32, returned in the activation dtype."""
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.int64).float() / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    if rot == t.shape[-1]:
        return t * cos + rotate_half(t) * sin
    t_rot, t_pass = t[..., :rot], t[..., rot:]  # partial rotary: the tail passes through
    return torch.cat((t_rot * cos + rotate_half(t_rot) * sin, t_pass), dim=-1)


class LLaDAMoEAttention(nn.Module):
    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.clip_qkv = config.clip_qkv
        hidden, kv_dim, bias = config.hidden_size, self.num_key_value_heads * self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.o_proj = nn.Linear(hidden, hidden, bias=bias)
        if config.qk_layernorm:
            self.q_norm = LLaDAMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LLaDAMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask=None, past_kv=None, cache_start=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.num_key_value_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.num_key_value_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # per head, before rope
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        present = (k, v)
        if past_kv is not None:  # Fast-dLLM: attend over the cached sequence with our slice fresh
            k, v = splice(past_kv[0], k, cache_start), splice(past_kv[1], v, cache_start)
        if self.num_key_value_heads != self.num_heads:
            rep = self.num_heads // self.num_key_value_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0, is_causal=False
        )
        att = att.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return self.o_proj(att), present


class LLaDAMoEMLP(nn.Module):
    """SwiGLU ``down(act(gate(x)) * up(x))``: a dense layer's MLP, one expert, or the shared expert."""

    def __init__(self, config: LLaDAMoEConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDAMoESparseMoeBlock(nn.Module):
    """Router ``gate`` + ``experts``; returns the mixed output and the router logits ``[N, E]``."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            LLaDAMoEMLP(config, config.expert_intermediate_size) for _ in range(self.num_experts)
        )
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        router_logits = self.gate(h)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        if self.expert_bias is not None:  # as the reference: the bias shifts the kept weights too
            probs = probs + self.expert_bias
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # not renormalised (reference)
        weights = weights.to(h.dtype)

        # Group the (token, slot) pairs by expert with one sort; every expert runs (possibly on
        # zero rows) so all parameters take part in the graph (DDP without unused parameters).
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // self.top_k
        inputs = h.index_select(0, token).split(counts)
        outs = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, inputs)])
        outs = outs * weights.reshape(-1)[order, None]
        mixed = torch.zeros_like(h).index_add_(0, token, outs.to(h.dtype))
        return mixed.reshape(shape), router_logits


class LLaDAMoEDecoderLayer(nn.Module):
    gradient_checkpointing = False  # toggled by PreTrainedModel.gradient_checkpointing_enable()

    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.self_attn = LLaDAMoEAttention(config, layer_idx)
        self.mlp = LLaDAMoESparseMoeBlock(config) if self.is_moe else LLaDAMoEMLP(config, config.dense_intermediate_size)
        self.input_layernorm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.is_moe and config.shared_expert_intermediate_size is not None:
            self.shared_expert = LLaDAMoEMLP(config, config.shared_expert_intermediate_size)

    def forward(self, x, cos, sin, attn_mask=None, past_kv=None, cache_start=None):
        """Returns the new hidden states, this layer's fresh K/V and its router logits (or None)."""
        att, present = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past_kv, cache_start)
        x = x + att
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, router_logits = self.mlp(h)
        else:
            out, router_logits = self.mlp(h), None
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(h)
        return x + out, present, router_logits


class LLaDAMoEModel(nn.Module):
    """``model.{embed_tokens, layers, norm}``; returns the pre-norm hidden states."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < config.vocab_size else None  # padding_idx as published
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, pad)
        self.layers = nn.ModuleList(LLaDAMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: Optional[BlockKVCache] = None,
        use_cache: bool = False,
        cache_start: Optional[int] = None,
        output_hidden_states: bool = False,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        plan = plan_forward(B, L, x.device, attention_mask, position_ids, past_key_values, use_cache, cache_start)
        cos, sin = rotary_cos_sin(plan.position_ids, self.config.rotary_dim, self.config.rope_theta, x.dtype)

        all_hidden, router_logits = [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(x)
            args = (x, cos, sin, plan.attn_mask, plan.past_for_layer(i), plan.cache_start)
            if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
                x, present, logits = layer._gradient_checkpointing_func(layer.__call__, *args)
            else:
                x, present, logits = layer(*args)
            if plan.fill:
                plan.cache.store(i, *present)
            if logits is not None:
                router_logits.append(logits)
        if output_hidden_states:
            all_hidden.append(self.norm(x))
        return x, plan.cache, (tuple(all_hidden) if output_hidden_states else None), tuple(router_logits)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """The reference's auxiliary loss (Switch Transformer eq. 4-6, as Mixtral/OLMoE define it).

    ``router_logits``: one ``[B*L, E]`` tensor per MoE layer; ``attention_mask`` ``[B, L]`` (or
    None) restricts both averages to real tokens. ``num_experts * sum_{slot, e} f[slot, e] * P[e]``
    with ``f`` the fraction of tokens whose slot-th choice is e and ``P`` the mean router probability.
    """
    logits = torch.cat(list(router_logits), dim=0).float()
    probs = F.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    expert_mask = F.one_hot(chosen, num_experts).float()  # [T, top_k, E]
    if attention_mask is None:
        tokens_per_expert = expert_mask.mean(dim=0)
        prob_per_expert = probs.mean(dim=0)
    else:
        keep = attention_mask.reshape(-1).to(probs).repeat(len(router_logits))  # layers are concatenated
        tokens_per_expert = (expert_mask * keep[:, None, None]).sum(0) / keep.sum()
        prob_per_expert = (probs * keep[:, None]).sum(0) / keep.sum()
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts


@dataclass
class LLaDAMoEOutput(DiffusionLMOutput):
    """``DiffusionLMOutput`` plus, with ``output_router_logits``, the router load-balancing loss
    (``aux_loss``, unscaled: multiply by ``config.router_aux_loss_coef``) and the per-MoE-layer
    router logits ``[B*L, E]``."""

    aux_loss: Optional[torch.Tensor] = None
    router_logits: Optional[tuple[torch.Tensor, ...]] = None


# --------------------------------------------------------------------------------------------
# The transformers-facing model
# --------------------------------------------------------------------------------------------
class LLaDAMoEModelLM(PreTrainedModel):
    """LLaDA-MoE masked diffusion LM. Forward contract: docs/ARCHITECTURE.md, "Model API"."""

    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        check_supported(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LLaDAMoESparseMoeBlock) and module.expert_bias is not None:
            nn.init.zeros_(module.expert_bias)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))

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
        output_router_logits: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        **kwargs,
    ):
        check_forward_kwargs(labels, output_attentions, kwargs)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        hidden, cache, all_hidden, router_logits = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=bool(use_cache),
            cache_start=cache_start,
            output_hidden_states=bool(output_hidden_states),
        )
        fields = output_head_fields(
            hidden, self._head, output_positions, target_ids, ce_chunk_size,
            target_weights=target_weights, vocab_size=self.config.vocab_size,
            linear_head=linear_head_of(self.model.norm, self.lm_head) if target_weights is not None else None,
        )
        aux_loss = None
        if output_router_logits and router_logits:
            # Only a 2-D mask over this forward's own tokens says which tokens are real.
            keys = attention_mask if attention_mask is not None and tuple(attention_mask.shape) == hidden.shape[:2] else None
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts, self.config.num_experts_per_tok, keys)
        out = LLaDAMoEOutput(
            **fields,
            cache=cache,
            hidden_states=all_hidden,
            aux_loss=aux_loss,
            router_logits=router_logits if output_router_logits else None,
        )
        return out if return_dict is None or return_dict else out.to_tuple()

    # -- no autoregressive generate(): diffusion sampling lives in dllm_trainer.sampling --------
    @classmethod
    def can_generate(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # Present only because peft's PeftModelForCausalLM (task_type="CAUSAL_LM") looks it up.
        raise NotImplementedError("masked diffusion models do not use generate(); see dllm_trainer.sampling")

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value
