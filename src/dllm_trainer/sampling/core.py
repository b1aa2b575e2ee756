"""The generation engine shared by all families and strategies.

Layout: ``x = prompt ++ [mask] * gen_length``; the generated part is split into blocks of
``block_length`` decoded left to right (semi-autoregressive, LLaDA); ``steps`` are split evenly
over the blocks. Mask tokens inside the prompt (infilling) are decoded together with the first
block (its schedule counts them), so every block ends fully decoded. With ``gen_length == 0``
the only "block" is the set of masks in the input.

Per step: one forward gives predictions for the masked columns of the current block; the family
proposes tokens and scores (``llada_style`` / ``dream_style``); the schedule (``schedule``) says
how many to reveal; the highest-scoring masked positions are revealed (top-k over the full row
with ``-inf`` outside the block, like the references, so ties resolve the same way).

Deliberate differences from the references (none affects unpadded, mask-free prompts, which
is what the parity fixtures cover):
- Dream computes one transfer count from the batch-average masked count; here each row uses
  its own count (identical when rows have equal counts; the reference can overwrite decoded
  tokens with the mask when they differ).
- left padding: positions are renumbered (``cumsum(attention_mask) - 1``) for every family,
  so a padded row reproduces its unpadded run (LLaDA's reference keeps arange positions).
- Gumbel / categorical noise is drawn only for the candidate columns (and from ``seed`` /
  ``generator`` when given), so sampled (temperature > 0) outputs are seed-deterministic but
  not bit-identical to the reference's global-RNG stream.
- steps whose schedule reveals nothing (e.g. Dream's first steps when few tokens are masked)
  skip the forward: the reference runs it and changes nothing.

Fast-dLLM threshold mode ignores the schedule: every masked position of the block whose
proposal probability exceeds ``threshold`` is revealed, and at least the best-scoring one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Callable

import torch

from ..families import get_family
from . import dream_style, llada_style
from .fast_dllm import CACHE_MODES, ModelCaller
from .schedule import dream_num_transfer_tokens, dream_timesteps, llada_num_transfer_tokens

STRATEGIES: dict[str, tuple[str, ...]] = {
    "bert": llada_style.STRATEGIES,
    "llada": llada_style.STRATEGIES,
    "dream": dream_style.STRATEGIES,
    "a2d": llada_style.STRATEGIES,  # LLaDA-style training (EOS padding): LLaDA-style sampling
}
DREAM_ONLY_OPTIONS = ("alg_temp", "top_p", "top_k", "eps")


@dataclass
class GenerateOptions:
    cfg_scale: float = 0.0  # classifier-free guidance (unconditional = prompt replaced by mask)
    threshold: float | None = None  # Fast-dLLM parallel decoding
    cache: str | None = None  # None | "prefix" | "dual"
    stop_at_eos: bool = False  # everything after the first generated EOS becomes EOS
    eos_token_id: int | list[int] | None = None  # default: model.config.eos_token_id
    seed: int | None = None  # seeds a private torch.Generator (random strategy, temperature > 0)
    generator: torch.Generator | None = None  # or pass one
    eps: float = 1e-3  # Dream: final timestep
    alg_temp: float | None = None  # Dream: sample the revealed positions from softmax(score / alg_temp)
    top_p: float | None = None  # Dream: nucleus filter
    top_k: int | None = None  # Dream: top-k filter
    stats: dict | None = None  # filled with {"nfe", "forward_tokens", ...} when given
    callback: Callable[["StepEvent"], None] | None = None  # called after every step that reveals tokens


@dataclass
class StepEvent:
    """What one denoising step did (``callback=`` option): for live views and traces.

    ``x`` is the sampler's own canvas after the step (do not modify it; copy it to keep it),
    ``revealed`` the positions this step decoded. Steps that reveal nothing run no forward and
    send no event; the final output can still differ from the last canvas by the EOS fill
    (``stop_at_eos``).
    """

    step: int  # 0-based count of events so far in this generate() call
    block: int  # which block (0 = the first; prompt masks are decoded with it)
    x: torch.Tensor  # [B, prompt_len + gen_length]
    revealed: torch.Tensor  # [B, prompt_len + gen_length] bool
    prompt_len: int


def _options(family, options: dict) -> GenerateOptions:
    known = {f.name for f in fields(GenerateOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown generate option(s): {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    opts = GenerateOptions(**options)
    if family.name != "dream":
        for name in DREAM_ONLY_OPTIONS:
            default = GenerateOptions.__dataclass_fields__[name].default
            if getattr(opts, name) != default:
                raise ValueError(f"option '{name}' applies to the dream family only (model family: {family.name})")
    if opts.cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode '{opts.cache}' (allowed: none, prefix, dual)")
    if opts.cache is not None and not family.native_masked_head:
        raise ValueError(f"cache='{opts.cache}' needs a LLaDA or Dream model (model family: {family.name})")
    if opts.threshold is not None and not (0 < opts.threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1]: a probability a proposal must exceed (got {opts.threshold})")
    if opts.cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (got {opts.cfg_scale})")
    if opts.top_p is not None and not (0 < opts.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (got {opts.top_p})")
    if opts.top_k is not None and opts.top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {opts.top_k})")
    if not (0 < opts.eps < 1):
        raise ValueError(f"eps must be in (0, 1) (got {opts.eps})")
    return opts


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _token_ids(prompt_ids, attention_mask):
    """(ids, attention_mask) from what a tokenizer returns: a tensor or list of ids, or the dict /
    BatchEncoding of `tokenizer(...)` and of `apply_chat_template(..., return_tensors="pt")` in
    transformers 5 (its attention_mask is used unless one is passed)."""
    if isinstance(prompt_ids, Mapping):
        if "input_ids" not in prompt_ids:
            raise ValueError(f"prompt_ids is a dict without 'input_ids' (keys: {', '.join(map(str, prompt_ids))}); pass "
                             "token ids, or what the tokenizer returns")
        if attention_mask is None:
            attention_mask = prompt_ids.get("attention_mask")
        prompt_ids = prompt_ids["input_ids"]
    if isinstance(prompt_ids, (str, bytes)) or (isinstance(prompt_ids, (list, tuple)) and prompt_ids
                                                 and isinstance(prompt_ids[0], str)):
        raise ValueError("prompt_ids must be token ids, not text: tokenize first, e.g. tokenizer.apply_chat_template("
                         "messages, add_generation_prompt=True, return_tensors='pt') or tokenizer(text)['input_ids']")
    return prompt_ids, attention_mask


def _eos_ids(model, opts: GenerateOptions) -> list[int]:
    eos = opts.eos_token_id
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.no_grad()
def generate(
    model,
    prompt_ids,
    *,
    gen_length: int,
    steps: int,
    block_length: int | None = None,
    temperature: float = 0.0,
    strategy: str | None = None,
    mask_token_id: int | None = None,
    attention_mask=None,
    **options,
) -> torch.LongTensor:
    """Diffusion sampling: ``prompt_ids`` [B, P] (or [P]) -> [B, P + gen_length] (same rank).

    See the package docstring (``dllm_trainer.sampling``) for the strategies and options.
    """
    family = get_family(model)
    opts = _options(family, options)
    strategy = strategy or family.default_sampler
    if strategy not in STRATEGIES[family.name]:
        raise ValueError(
            f"unknown strategy '{strategy}' for the {family.name} family "
            f"(allowed: {', '.join(STRATEGIES[family.name])})"
        )
    if mask_token_id is None:
        mask_token_id = getattr(model.config, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError("mask_token_id is not set on the model config: pass mask_token_id=")
    mask_token_id = int(mask_token_id)
    if temperature is None or temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0 (got {temperature})")

    device = _device(model)
    prompt_ids, attention_mask = _token_ids(prompt_ids, attention_mask)
    try:
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"prompt_ids must be a LongTensor [B, P] or [P], a list of token ids, or what the tokenizer "
                         f"returns (a dict / BatchEncoding with 'input_ids'); got {type(prompt_ids).__name__}") from None
    was_1d = prompt.dim() == 1
    if was_1d:
        prompt = prompt.unsqueeze(0)
    if prompt.dim() != 2:
        raise ValueError(f"prompt_ids must be [B, P] or [P] (got shape {tuple(prompt.shape)})")
    batch, prompt_len = prompt.shape
    gen_length = int(gen_length)
    if gen_length < 0:
        raise ValueError(f"gen_length must be >= 0 (got {gen_length})")
    if steps is None or int(steps) < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    steps = int(steps)
    if gen_length > 0:
        block_length = gen_length if block_length is None else int(block_length)
        if block_length < 1 or gen_length % block_length:
            raise ValueError(
                f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})"
            )
        num_blocks = gen_length // block_length
    else:
        block_length, num_blocks = 0, 1
    if steps % num_blocks:
        raise ValueError(
            f"steps ({steps}) must be divisible by the number of blocks "
            f"(gen_length {gen_length} / block_length {block_length} = {num_blocks})"
        )
    steps_per_block = steps // num_blocks
    total = prompt_len + gen_length
    max_pos = _max_positions(model.config)
    if max_pos is not None and total > max_pos:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + gen_length ({gen_length}) = {total} exceeds the model's {max_pos} "
            f"positions; generate at most {max(0, max_pos - prompt_len)} tokens after this prompt"
        )

    x = torch.full((batch, total), mask_token_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt
    attn = None
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device).long()
        if was_1d and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != prompt.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != prompt shape {tuple(prompt.shape)}"
            )
        attn = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=1)
        if bool(attn.all()):
            attn = None  # no padding: identical to the unpadded reference call
    valid = torch.ones_like(x, dtype=torch.bool) if attn is None else attn.bool()
    position_ids = None if attn is None else (attn.cumsum(-1) - 1).clamp(min=0)
    uncond_index = None
    if opts.cfg_scale > 0:
        uncond_index = torch.zeros_like(x, dtype=torch.bool)
        uncond_index[:, :prompt_len] = (prompt != mask_token_id) & valid[:, :prompt_len]
    generator = opts.generator
    if generator is None and opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(opts.seed))
    stats = opts.stats if opts.stats is not None else {}
    caller = ModelCaller(
        model,
        family,
        attention_mask=attn,
        position_ids=position_ids,
        mask_token_id=mask_token_id,
        cfg_scale=opts.cfg_scale,
        uncond_index=uncond_index,
        stats=stats,
    )
    eos_ids = _eos_ids(model, opts) if opts.stop_at_eos else []
    eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device)

    emit = None
    if opts.callback is not None:
        events = [0]

        def emit(revealed: torch.Tensor, block: int) -> None:
            opts.callback(StepEvent(events[0], block, x, revealed, prompt_len))
            events[0] += 1

    was_training = model.training
    model.eval()
    try:
        for b in range(num_blocks):
            block_start = prompt_len + b * block_length
            block_end = block_start + block_length
            lo = 0 if b == 0 else block_start  # the first block also decodes masks in the prompt
            _decode_block(
                x, valid, lo, block_end, steps_per_block, caller=caller, family=family,
                strategy=strategy, temperature=float(temperature), mask_token_id=mask_token_id,
                opts=opts, generator=generator, emit=emit, block=b,
            )
            if eos_ids and gen_length > 0 and b < num_blocks - 1:
                # every position before block_end is decoded: if each row already has an EOS in
                # its generation, the rest would be overwritten with EOS anyway.
                if bool(torch.isin(x[:, prompt_len:block_end], eos_t).any(dim=1).all()):
                    stats["early_stop_block"] = b
                    break
    finally:
        model.train(was_training)

    if eos_ids and gen_length > 0:
        _fill_after_eos(x, prompt_len, eos_t)
    return x[0] if was_1d else x


def _fill_after_eos(x: torch.Tensor, prompt_len: int, eos_t: torch.Tensor) -> None:
    gen = x[:, prompt_len:]
    is_eos = torch.isin(gen, eos_t)
    for row in range(x.shape[0]):
        hits = torch.nonzero(is_eos[row]).flatten()
        if hits.numel():
            first = int(hits[0])
            gen[row, first + 1 :] = gen[row, first]


def _decode_block(
    x, valid, lo, hi, steps, *, caller, family, strategy, temperature, mask_token_id, opts, generator, emit=None, block=0
) -> None:
    """Decode every mask in columns [lo, hi) of x, in place; ``emit(revealed, block)`` after each step."""
    batch, total = x.shape

    def masked_now() -> torch.Tensor:
        return (x[:, lo:hi] == mask_token_id) & valid[:, lo:hi]

    m0 = masked_now()
    if not bool(m0.any()):
        return
    dream = family.name == "dream"
    threshold = opts.threshold
    schedule = None if (dream or threshold is not None) else llada_num_transfer_tokens(m0.sum(1), steps)
    timesteps = dream_timesteps(steps, opts.eps, device=x.device) if dream else None
    cache = None
    if opts.cache is not None:
        first_col = lo + int(torch.nonzero(m0.any(0)).flatten()[0])
        win_start = caller.window_start(first_col)
        win_end = hi if opts.cache == "dual" else total
    rows = torch.arange(batch, device=x.device)
    # threshold mode reveals >= 1 token per row and step, so len(block) iterations always suffice
    iterations = steps if threshold is None else (hi - lo)

    for i in range(iterations):
        m = masked_now()
        if not bool(m.any()):
            break
        if threshold is None:
            if dream:
                k = dream_num_transfer_tokens(m.sum(1), timesteps, i, steps)
            else:
                k = schedule[:, i]
            k = torch.minimum(k, m.sum(1))
            if strategy != "origin" and not bool(k.any()):
                continue  # nothing to reveal: the reference's forward here changes nothing
        cols = lo + torch.nonzero(m.any(0)).flatten()
        if opts.cache is None:
            logits, _ = caller(x, cols)
        elif cache is None:  # first forward of the block: full pass that (re)fills the cache
            logits, cache = caller(x, cols, fill_cache=True)
        else:
            logits, _ = caller(x, cols, start=win_start, end=win_end, cache=cache)

        if dream:
            x0, score, prob = dream_style.propose(
                logits, strategy, temperature, opts.top_p, opts.top_k, generator
            )
        else:
            x0, score, prob = llada_style.propose(logits, strategy, temperature, generator)
        m_cols = m[:, cols - lo]

        full_x0 = x.clone()
        full_x0[:, cols] = torch.where(m_cols, x0, x[:, cols])

        if strategy == "origin" and threshold is None:
            # Dream 'origin': each masked position is revealed with probability 1 - s/t
            t, s = timesteps[i], timesteps[i + 1]
            p_transfer = 1 - s / t if i < steps - 1 else 1.0
            u = torch.rand(m_cols.shape, device=x.device, generator=generator)
            reveal = m_cols & (u < p_transfer)
            x[:, cols] = torch.where(reveal, full_x0[:, cols], x[:, cols])
            if emit is not None and bool(reveal.any()):
                revealed = torch.zeros_like(x, dtype=torch.bool)
                revealed[:, cols] = reveal
                emit(revealed, block)
            continue

        full_score = torch.full((batch, total), -torch.inf, dtype=score.dtype, device=x.device)
        full_score[:, cols] = torch.where(m_cols, score, torch.full_like(score, -torch.inf))

        transfer = torch.zeros((batch, total), dtype=torch.bool, device=x.device)
        if threshold is not None:
            above = m_cols & (prob > threshold)
            transfer[:, cols] = above
            has_mask = m_cols.any(1)
            best = torch.argmax(full_score, dim=1)
            transfer[rows[has_mask], best[has_mask]] = True
        elif dream and opts.alg_temp:
            weights = torch.softmax(full_score / opts.alg_temp, dim=-1)
            for r in range(batch):
                if int(k[r]) > 0:
                    picked = torch.multinomial(weights[r], int(k[r]), generator=generator)
                    transfer[r, picked] = True
        elif dream and bool((k == k[0]).all()):
            # the Dream reference selects with one batched top-k
            picked = torch.topk(full_score, int(k[0]), dim=-1).indices
            transfer.scatter_(1, picked, True)
        else:
            for r in range(batch):
                if int(k[r]) > 0:
                    transfer[r, torch.topk(full_score[r], int(k[r])).indices] = True
        transfer &= (x == mask_token_id) & valid
        x[transfer] = full_x0[transfer]
        if emit is not None:
            emit(transfer, block)
