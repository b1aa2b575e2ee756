"""Block KV cache (Fast-dLLM prefix / dual caching) and the attention-mask plumbing it implies.

A masked diffusion LM attends bidirectionally, so an ordinary append-only KV cache does not
apply: every position can change the keys of every other one. Fast-dLLM's approximation is to
run one full forward, keep each layer's K/V for the whole sequence, and then, while one block
is being denoised, recompute K/V only for a slice of the sequence and reuse the rest:

* prefix cache: the input is ``x[:, s:]`` (block start to the end), the prompt K/V are reused;
* dual cache:   the input is ``x[:, s:e]`` (the block only), prompt and suffix K/V are reused.

Semantics (see docs/ARCHITECTURE.md, "Model API"):

* ``model(x, use_cache=True)`` over the whole sequence fills a cache (a new one, or the one
  passed as ``past_key_values``) with every layer's K/V for all L positions;
* ``model(x[:, s:s+l], past_key_values=cache, cache_start=s)`` computes fresh K/V for positions
  ``[s, s+l)``, attends over the cached K/V with that slice replaced by the fresh one, and does
  NOT modify the cache (the sampler decides when to refresh, by another full forward).

Keys are stored after rotary embedding, so a cached slice never needs to be re-rotated. The fill
forward's key padding mask and position ids are kept too, so cached forwards default to them
(position ids default to the same ``arange`` offset the ARCHITECTURE.md contract describes
whenever the fill used the default ones).
"""
from __future__ import annotations

from typing import Optional

import torch


class BlockKVCache:
    """Per-layer keys/values of one full sequence. Shapes: ``[B, n_kv_heads, L, head_dim]``."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_mask: Optional[torch.Tensor] = None  # [B, L] bool (True = real token) or None
        self.position_ids: Optional[torch.Tensor] = None  # [B, L] long

    # -- introspection -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_filled(self) -> bool:
        return len(self.keys) > 0

    @property
    def seq_len(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:  # transformers-style name
        return self.keys[layer_idx].shape[-2] if len(self.keys) > layer_idx else 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def __repr__(self) -> str:
        return f"BlockKVCache(layers={len(self)}, batch={self.batch_size}, seq_len={self.seq_len})"

    # -- filling (full forward with use_cache=True) ----------------------------------------
    def reset(self) -> None:
        self.keys, self.values = [], []
        self.key_mask = None
        self.position_ids = None

    def begin_fill(self, key_mask: Optional[torch.Tensor], position_ids: torch.Tensor) -> None:
        """Start a refresh: drop the old contents and remember this forward's mask/positions."""
        self.reset()
        self.key_mask = None if key_mask is None else key_mask.detach().bool()
        self.position_ids = position_ids.detach()

    def store(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if layer_idx != len(self.keys):
            raise RuntimeError(f"BlockKVCache: layers must be stored in order (got {layer_idx}, have {len(self.keys)})")
        # Detached: the cache is an inference device; keeping the autograd graph alive would leak memory.
        self.keys.append(key.detach())
        self.values.append(value.detach())

    # -- reading (forward with cache_start) ------------------------------------------------
    def check_window(self, start: int, length: int, batch_size: int) -> None:
        if not self.is_filled:
            raise ValueError("BlockKVCache is empty: run a full forward with use_cache=True first.")
        if start < 0 or start + length > self.seq_len:
            raise ValueError(
                f"cache_start={start} with input length {length} does not fit the cached sequence "
                f"of length {self.seq_len}."
            )
        if batch_size != self.batch_size:
            raise ValueError(f"batch size {batch_size} does not match the cached batch size {self.batch_size}.")


def splice(cached: torch.Tensor, fresh: torch.Tensor, start: int) -> torch.Tensor:
    """``cached`` (``[..., L, d]``) with rows ``[start, start + fresh_len)`` replaced by ``fresh``."""
    length = fresh.shape[-2]
    if start == 0 and length == cached.shape[-2]:
        return fresh
    fresh = fresh.to(cached.dtype)
    return torch.cat([cached[..., :start, :], fresh, cached[..., start + length :, :]], dim=-2)


def build_attention_mask(
    attention_mask: Optional[torch.Tensor],
    batch_size: int,
    q_len: int,
    kv_len: int,
) -> Optional[torch.Tensor]:
    """Normalise the user's mask to what ``F.scaled_dot_product_attention`` takes, or ``None``.

    * ``None`` -> ``None`` (full bidirectional attention, lets SDPA pick its fastest kernel);
    * 2-D ``[B, kv_len]`` 0/1 padding mask over the keys (any dtype, nonzero = real token)
      -> bool ``[B, 1, 1, kv_len]``, or ``None`` when nothing is padded;
    * 4-D bool (or 0/1 integer) ``[B or 1, 1 or H, q_len, kv_len]`` (True = may attend), e.g.
      block-diagonal masks for packed sequences -> bool, as given (float 4-D masks are refused:
      a 0/1 keep-mask and an additive bias cannot be told apart).

    Query rows that may attend to nothing (a fully padded row, or padded queries in a pairwise
    mask) are allowed to attend everywhere instead: SDPA would return NaN for them, and NaN
    poisons gradients even where the loss never looks. Their outputs are meaningless either way.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch_size, kv_len):
            raise ValueError(
                f"2-D attention_mask must have shape [batch, key_length] = [{batch_size}, {kv_len}], "
                f"got {list(attention_mask.shape)} (with a KV cache the mask covers the whole cached sequence)."
            )
        keys = attention_mask.bool()
        if bool(keys.all()):
            return None  # nothing padded: keep the mask-free (faster) attention path
        mask = keys[:, None, None, :]
    elif attention_mask.dim() == 4:
        if attention_mask.is_floating_point():  # ambiguous: 0/1 keep-mask or additive 0/-inf bias?
            raise ValueError(
                "a 4-D attention_mask must be boolean (or 0/1 integer), True = may attend; "
                "additive float masks are not accepted."
            )
        if attention_mask.shape[-2] != q_len or attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"4-D attention_mask must end in [query_length, key_length] = [{q_len}, {kv_len}], "
                f"got {list(attention_mask.shape)}."
            )
        if attention_mask.shape[0] not in (1, batch_size):
            raise ValueError(f"4-D attention_mask batch dimension must be 1 or {batch_size}.")
        mask = attention_mask.bool()
    else:
        raise ValueError(f"attention_mask must be 2-D or 4-D, got {attention_mask.dim()}-D.")
    empty_rows = ~mask.any(dim=-1, keepdim=True)
    return mask | empty_rows


class ForwardPlan:
    """What one forward does with the cache, its mask and its positions (shared by both models)."""

    __slots__ = ("cache", "cache_start", "fill", "attn_mask", "position_ids")

    def __init__(self, cache, cache_start, fill, attn_mask, position_ids):
        self.cache: Optional[BlockKVCache] = cache
        self.cache_start: Optional[int] = cache_start  # not None: read the cache, replace this slice
        self.fill: bool = fill  # store this forward's K/V into `cache`
        self.attn_mask: Optional[torch.Tensor] = attn_mask  # bool, broadcastable to [B, H, Lq, Lk], or None
        self.position_ids: torch.Tensor = position_ids  # [B, Lq] long

    def past_for_layer(self, layer_idx: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache_start is None:
            return None
        return self.cache.keys[layer_idx], self.cache.values[layer_idx]


def plan_forward(
    batch_size: int,
    q_len: int,
    device: torch.device,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    past_key_values: Optional[BlockKVCache] = None,
    use_cache: Optional[bool] = False,
    cache_start: Optional[int] = None,
) -> ForwardPlan:
    """Resolve the cache mode, default position ids and the SDPA mask for one forward."""
    if past_key_values is not None and not isinstance(past_key_values, BlockKVCache):
        raise TypeError(
            f"past_key_values must be a dllm_trainer.models.kv_cache.BlockKVCache, got {type(past_key_values).__name__}"
        )
    if cache_start is not None:
        cache_start = int(cache_start)
        if past_key_values is None:
            raise ValueError(
                "cache_start requires past_key_values (a BlockKVCache filled by a use_cache=True forward)."
            )
        cache = past_key_values
        cache.check_window(cache_start, q_len, batch_size)
        kv_len = cache.seq_len
        if position_ids is None:
            position_ids = cache.position_ids[:, cache_start : cache_start + q_len]
        if attention_mask is None and cache.key_mask is not None:
            attention_mask = cache.key_mask
        fill = False  # a cached forward never modifies the cache (refresh = full forward with use_cache=True)
    else:
        if past_key_values is not None and not use_cache:
            raise ValueError(
                "past_key_values was given without cache_start: pass cache_start to read from the cache, "
                "or use_cache=True to (re)fill it with a full forward."
            )
        fill = bool(use_cache)
        cache = (past_key_values if past_key_values is not None else BlockKVCache()) if fill else None
        kv_len = q_len
        if position_ids is None:
            position_ids = torch.arange(q_len, device=device, dtype=torch.long)[None, :]
    position_ids = position_ids.to(device=device, dtype=torch.long)
    if position_ids.dim() == 1:
        position_ids = position_ids[None, :]
    if position_ids.shape[-1] != q_len or position_ids.shape[0] not in (1, batch_size):
        raise ValueError(f"position_ids must have shape [{batch_size}, {q_len}], got {list(position_ids.shape)}")
    position_ids = position_ids.expand(batch_size, q_len)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    attn_mask = build_attention_mask(attention_mask, batch_size, q_len, kv_len)
    if fill:
        key_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        cache.begin_fill(key_mask, position_ids)
    return ForwardPlan(cache, cache_start, fill, attn_mask, position_ids)
