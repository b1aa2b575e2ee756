"""Monte-Carlo likelihood bound for masked diffusion LMs, as LLaDA evaluates it.

For a prompt ``c`` and an answer ``y`` of ``T`` tokens, the masked-diffusion ELBO is

    log p(y | c) >= E_{l ~ U{1..T}} E_{mask of l answer positions} [ (T / l) * sum_{masked i} log p(y_i | c, y_masked) ]

(LLaDA paper, eq. 14 / ``get_log_likelihood`` in the LLaDA repo). Estimated with ``mc_num``
samples processed ``batch_size`` at a time; within a batch the masked counts are stratified
(low variance): one ``k ~ U{1..T}``, then counts ``T / b`` apart on the cycle ``1..T`` (see
``stratified_mask_counts``); each sample masks that many answer positions chosen uniformly. The prompt is
never masked.

Returned per sequence: the bound on ``log p(y | c)`` in nats, ``nll_per_token = -bound / T``
(an upper bound on the true NLL per token) and ``perplexity_bound = exp(nll_per_token)``.

Determinism: the noise (counts and masks) comes from a private ``torch.Generator`` seeded by
``seed`` (on CPU, then moved), fresh for every sequence, so the same text gets the same masks
in every evaluation (comparable across training steps) and the result does not depend on call
order or device RNG state.

Family alignment (Dream predicts token ``i`` from output ``i-1``) is handled by
``FamilyStrategy.masked_token_loss`` / ``output_positions``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..families import get_family


@dataclass(frozen=True)
class ElboResult:
    log_likelihood: float  # ELBO lower bound on log p(answer | prompt), nats, summed over the answer
    nll_per_token: float  # -log_likelihood / num_tokens: upper bound on the NLL per token
    perplexity_bound: float  # exp(nll_per_token)
    num_tokens: int
    std_error: float  # Monte-Carlo standard error of log_likelihood
    mc_num: int


def _device(model) -> torch.device:
    return next(model.parameters()).device


def stratified_mask_counts(target_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Low-variance masked counts for ``batch`` samples, each uniform on ``1..target_len``.

    As in LLaDA: one ``k ~ U{1..T}``, then the samples sit ``T / batch`` apart on the cycle
    ``1..T``. LLaDA rounds ``k + j T / b`` half-to-even, which makes a count's distribution depend
    on the parity of ``k`` (non-uniform, so slightly biased) when ``j T / b`` ends in .5; we
    add the floored offset instead, which keeps every sample's count exactly uniform.
    """
    k = int(torch.randint(1, target_len + 1, (), generator=generator))
    offsets = (torch.arange(batch, dtype=torch.float64) * (target_len / batch)).floor().long()
    return ((k - 1 + offsets) % target_len) + 1


def _masked_answer_loss(model, family, ids, positions, targets, *, cfg_scale, prompt_len, mask_id):
    """Per-position float32 CE at flat ``positions`` of ``ids`` (family alignment applied)."""
    if cfg_scale <= 0:
        loss, _ = family.masked_token_loss(model, ids, None, None, positions, targets)
        return loss.float()
    uncond = ids.clone()
    uncond[:, :prompt_len] = mask_id
    both = torch.cat([ids, uncond], dim=0)
    seq_len = ids.shape[1]
    out_pos = family.output_positions(positions, seq_len)
    out_pos = torch.cat([out_pos, out_pos + ids.numel()])
    if family.native_masked_head:
        logits = model(input_ids=both, output_positions=out_pos).logits
    else:
        logits = model(input_ids=both).logits.flatten(0, 1)[out_pos]
    cond, unc = logits.float().chunk(2, dim=0)
    mixed = unc + (cfg_scale + 1) * (cond - unc)
    return F.cross_entropy(mixed, targets, reduction="none")


@torch.no_grad()
def masked_diffusion_elbo(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    cfg_scale: float = 0.0,
    mask_token_id: int | None = None,
) -> ElboResult:
    """Monte-Carlo ELBO of ``answer_ids`` given ``prompt_ids`` (both 1-D token id sequences)."""
    family = get_family(model)
    if mask_token_id is None:
        mask_token_id = getattr(model.config, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError("mask_token_id is not set on the model config: pass mask_token_id=")
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be >= 1 (got {mc_num}, {batch_size})")
    device = _device(model)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    answer = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1)
    target_len = answer.numel()
    if target_len == 0:
        raise ValueError("the answer (continuation) is empty: nothing to score")
    prompt_len = prompt.numel()
    seq = torch.cat([prompt, answer]).to(device)
    gen = torch.Generator().manual_seed(int(seed))

    was_training = model.training
    model.eval()
    sample_ll: list[torch.Tensor] = []
    try:
        remaining = mc_num
        while remaining > 0:
            b = min(batch_size, remaining)
            remaining -= b
            counts = stratified_mask_counts(target_len, b, gen)
            ranks = torch.stack([torch.randperm(target_len, generator=gen) for _ in range(b)])
            is_mask = ranks < counts.unsqueeze(1)  # [b, T]: `count` answer positions chosen uniformly
            is_mask = torch.cat([torch.zeros(b, prompt_len, dtype=torch.bool), is_mask], dim=1).to(device)
            ids = seq.unsqueeze(0).repeat(b, 1)
            noisy = ids.masked_fill(is_mask, mask_token_id)
            positions = torch.nonzero(is_mask.flatten()).flatten()
            targets = ids.flatten()[positions]
            loss = _masked_answer_loss(
                model, family, noisy, positions, targets,
                cfg_scale=cfg_scale, prompt_len=prompt_len, mask_id=mask_token_id,
            )
            row = positions // ids.shape[1]
            weight = (target_len / counts.to(device).float())[row]
            per_sample = torch.zeros(b, device=device).index_add_(0, row, loss * weight)
            sample_ll.append(-per_sample.cpu())
    finally:
        model.train(was_training)
    lls = torch.cat(sample_ll).double()
    ll = float(lls.mean())
    std_err = float(lls.std(unbiased=True) / math.sqrt(lls.numel())) if lls.numel() > 1 else float("nan")
    nll = -ll / target_len
    return ElboResult(
        log_likelihood=ll,
        nll_per_token=nll,
        perplexity_bound=math.exp(min(nll, 700.0)),
        num_tokens=target_len,
        std_error=std_err,
        mc_num=mc_num,
    )


def corpus_elbo(
    model,
    samples: Iterable[tuple[Sequence[int], Sequence[int]] | Sequence[int]],
    **kwargs,
) -> dict:
    """Token-weighted NLL bound over many sequences.

    ``samples``: ``(prompt_ids, answer_ids)`` pairs, or plain id sequences (scored unconditionally).
    Returns ``{"nll_per_token", "perplexity_bound", "num_tokens", "num_sequences"}``. Each sequence
    uses the same ``seed`` (fixed noise per text, comparable across evaluations).
    """
    total_nll, total_tokens, n = 0.0, 0, 0
    for sample in samples:
        if isinstance(sample, tuple) and len(sample) == 2 and not isinstance(sample[0], int):
            prompt, answer = sample
        else:
            prompt, answer = [], sample
        res = masked_diffusion_elbo(model, prompt, answer, **kwargs)
        total_nll += -res.log_likelihood
        total_tokens += res.num_tokens
        n += 1
    if total_tokens == 0:
        raise ValueError("no tokens to score")
    nll = total_nll / total_tokens
    return {
        "nll_per_token": nll,
        "perplexity_bound": math.exp(min(nll, 700.0)),
        "num_tokens": total_tokens,
        "num_sequences": n,
    }


def _prefix_ids(tokenizer) -> list[int]:
    for name in ("bos_token_id", "cls_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return [int(tid)]
    return []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval-harness splits them.

    Trailing whitespace of the context moves to the continuation; the continuation ids are the
    tail of the tokenised concatenation (so merges across the boundary stay consistent).
    A BOS (or CLS for BERT) starts the context when the tokenizer has one and the context does not
    already begin with it.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    prefix = _prefix_ids(tokenizer)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if prefix and list(ctx[:1]) == prefix:  # e.g. a chat template that writes the BOS itself
        prefix = []
    return prefix + list(ctx), list(whole[len(ctx):])


def loglikelihood(
    model,
    tokenizer,
    requests: Iterable[tuple[str, str]],
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    cfg_scale: float = 0.0,
    check_greedy: bool = True,
) -> list[tuple[float, bool]]:
    """lm-eval-harness style ``loglikelihood``: one ``(log_likelihood_bound, is_greedy)`` per request.

    ``is_greedy``: whether greedy low-confidence decoding of the continuation (all of it masked,
    one token per step) reproduces it exactly (LLaDA's evaluation does the same); ``False``
    without computing when ``check_greedy`` is off.
    """
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    results = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        res = masked_diffusion_elbo(
            model, ctx, cont, mc_num=mc_num, batch_size=batch_size, seed=seed,
            cfg_scale=cfg_scale, mask_token_id=mask_id,
        )
        greedy = suffix_is_greedy(model, ctx, cont, mask_token_id=mask_id) if check_greedy else False
        results.append((res.log_likelihood, greedy))
    return results


def suffix_is_greedy(model, ctx: Sequence[int], cont: Sequence[int], *, mask_token_id: int | None = None) -> bool:
    """Whether greedy decoding of ``cont`` (all of it masked after ``ctx``, one token per step,
    the family's default confidence strategy) reproduces it exactly (lm-eval's ``is_greedy``)."""
    from ..sampling import generate

    out = generate(
        model, torch.tensor([list(ctx)]), gen_length=len(cont), steps=len(cont),
        temperature=0.0, mask_token_id=mask_token_id,
    )
    return out[0, len(ctx):].tolist() == list(cont)
