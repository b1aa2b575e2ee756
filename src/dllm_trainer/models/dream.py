"""Dream (Dream-org/Dream-v0-Base-7B, Dream-v0-Instruct-7B) without remote code.

Dream is a Qwen2.5 network trained as a masked diffusion LM: the same weights layout
(``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` with q/k/v bias,
``model.layers.{i}.mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``,
``model.norm``, ``lm_head``) with full bidirectional attention. As in the published
``modeling_dream.py``:

* RMSNorm in float32, cast back to the input dtype, then scaled by the weight;
* rotary cos/sin computed in float32 from the position ids, cast to the activation dtype, and
  applied in that dtype (so bf16 Dream rotates in bf16, unlike LLaDA);
* SwiGLU MLP ``down(act(gate(x)) * up(x))``;
* the model returns RAW logits: position i's prediction of token i+1 is the Qwen convention it
  inherited, so callers shift by one (see docs/ARCHITECTURE.md and the dream FamilyStrategy).

Attention uses ``F.scaled_dot_product_attention`` with an explicit mask, position ids are
honoured (left padding / packing), the head can be restricted to selected positions with
chunked cross-entropy (``output_head.py``), and Fast-dLLM caching uses ``BlockKVCache``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from .kv_cache import BlockKVCache, plan_forward, splice
from .output_head import (
    DiffusionLMOutput,
    QueryRows,
    check_forward_kwargs,
    linear_head_of,
    output_head_fields,
    prunes_last_block,
)
from .serialization import full_diff_dict
from .swiglu import swiglu

DREAM_AUTO_MAP = {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
# The architecture keys of the published config.json (Qwen2's plus mask_token_id), with the
# published defaults.
DREAM_DEFAULTS = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    max_position_embeddings=32768,
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    use_cache=False,
    rope_theta=10000.0,
    rope_scaling=None,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
    attention_dropout=0.0,
    mask_token_id=151666,
)


class DreamConfig(PretrainedConfig):
    """Configuration of a Dream model (Qwen2 keys plus ``mask_token_id``); defaults as published.

    Written with a plain ``__init__`` (not transformers 5's dataclass fields) so that this file
    also serves as remote code under transformers 4.x (export.py copies it beside saved weights).
    """

    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]
    # A plain attribute here: transformers 5 makes rope_scaling a deprecated property of the base
    # class, and Dream's config.json carries the key.
    rope_scaling = None

    def __init__(self, pad_token_id=151643, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                 **kwargs):
        for name, default in DREAM_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None  # as the published config does
        kwargs["architectures"] = kwargs.get("architectures") or ["DreamModel"]
        kwargs.setdefault("auto_map", dict(DREAM_AUTO_MAP))
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_diff_dict(self) -> dict:
        # Write every architecture key, so the file reloads the same in the published code.
        keys = (*DREAM_DEFAULTS, "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")
        return full_diff_dict(self, super().to_diff_dict(), keys)


def check_supported(config: DreamConfig) -> None:
    problems = []
    scaling = config.rope_scaling or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        problems.append(f"rope_scaling={config.rope_scaling!r} (only plain rope is implemented)")
    if config.use_sliding_window:
        problems.append("use_sliding_window=True (sliding-window attention is not implemented)")
    if config.hidden_act not in ACT2FN:
        problems.append(f"hidden_act={config.hidden_act!r}")
    if config.hidden_size % config.num_attention_heads != 0:
        problems.append("hidden_size is not divisible by num_attention_heads")
    elif config.num_attention_heads % config.num_key_value_heads != 0:
        problems.append("num_attention_heads is not a multiple of num_key_value_heads")
    if problems:
        raise ValueError("Unsupported Dream configuration: " + "; ".join(problems) + ".")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class DreamRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``[B, 1, L, head_dim]``: computed in float32, returned in the activation dtype."""
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        hidden, kv_dim = config.hidden_size, self.num_key_value_heads * self.head_dim
        # Qwen2 layout: biased q/k/v, unbiased output projection.
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, past_kv=None, cache_start=None, query_rows=None):
        """With ``query_rows``: the output ``[U, hidden]`` at those positions only (see QueryRows)."""
        B, L, _ = x.shape
        k = self.k_proj(x).view(B, L, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        k = k * cos + rotate_half(k) * sin
        if query_rows is not None:
            C = query_rows.col.shape[1]
            q = self.q_proj(query_rows.per_row(x)).view(B, C, self.num_heads, self.head_dim).transpose(1, 2)
            cos, sin = query_rows.per_row_heads(cos), query_rows.per_row_heads(sin)
            attn_mask = query_rows.per_row_heads(attn_mask)
        else:
            q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        present = (k, v)
        if past_kv is not None:  # Fast-dLLM: attend over the cached sequence with our slice fresh
            k, v = splice(past_kv[0], k, cache_start), splice(past_kv[1], v, cache_start)
        if self.num_key_value_heads != self.num_heads:
            rep = self.num_heads // self.num_key_value_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0, is_causal=False
        )
        if query_rows is not None:
            return self.o_proj(query_rows.gather_output(att)), None
        att = att.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return self.o_proj(att), present


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj, self.act_fn)


class DreamDecoderLayer(nn.Module):
    gradient_checkpointing = False  # toggled by PreTrainedModel.gradient_checkpointing_enable()

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask=None, past_kv=None, cache_start=None, query_rows=None):
        att, present = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past_kv, cache_start, query_rows)
        x = (x if query_rows is None else query_rows.take(x)) + att
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class DreamBaseModel(nn.Module):
    """``model.{embed_tokens, layers, norm}``; returns the pre-norm hidden states."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        # padding_idx as published (the pad row receives no gradient).
        pad = config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, pad)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

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
        output_positions: Optional[torch.Tensor] = None,
    ):
        """Pre-norm hidden states ``[B, L, D]``; with ``output_positions`` (flat, no cache, no hidden
        states) only the rows there, ``[N, D]``: the last layer computes no other row."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        plan = plan_forward(B, L, x.device, attention_mask, position_ids, past_key_values, use_cache, cache_start)
        cos, sin = rotary_cos_sin(plan.position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        rows = QueryRows(output_positions, B, L) if output_positions is not None else None
        last = len(self.layers) - 1

        all_hidden = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(x)
            args = (x, cos, sin, plan.attn_mask, plan.past_for_layer(i), plan.cache_start, rows if i == last else None)
            if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
                x, present = layer._gradient_checkpointing_func(layer.__call__, *args)
            else:
                x, present = layer(*args)
            if plan.fill:
                plan.cache.store(i, *present)
        if output_hidden_states:
            all_hidden.append(self.norm(x))
        if rows is not None:
            x = x.index_select(0, rows.output_index)
        return x, plan.cache, (tuple(all_hidden) if output_hidden_states else None)


# --------------------------------------------------------------------------------------------
# The transformers-facing model
# --------------------------------------------------------------------------------------------
class DreamModel(PreTrainedModel):
    """Dream masked diffusion LM (raw, unshifted logits). Forward contract: docs/ARCHITECTURE.md."""

    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        check_supported(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
        return_dict: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        **kwargs,
    ):
        check_forward_kwargs(labels, output_attentions, kwargs)
        # Only the selected positions feed the head: the last layer computes just those rows.
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
            hidden, self._head, output_positions, target_ids, ce_chunk_size, preselected=prune,
            target_weights=target_weights, vocab_size=self.config.vocab_size,
            linear_head=linear_head_of(self.model.norm, self.lm_head) if target_weights is not None else None,
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

    # -- generation_config.json ---------------------------------------------------------------
    # The published DreamModel.from_pretrained unconditionally reads generation_config.json, so a
    # checkpoint we save must carry one. We keep the one we loaded (if any) and otherwise write the
    # token ids from the config, which is what the released files contain.
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # output_loading_info=True returns (model, info)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        hub_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs
        }
        try:
            gen = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
            model.dream_generation_config = gen
        except Exception:  # no generation_config.json (or not reachable): one is synthesised on save
            model.dream_generation_config = None
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            gen = getattr(self, "dream_generation_config", None)
            if gen is None:
                ids = {k: getattr(self.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
                gen = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
            gen.save_pretrained(save_directory)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value
