"""Token proposals for the Dream sampler (``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``).

Per candidate position (logits already aligned, i.e. shifted right by one):

- logits are divided by ``temperature`` (> 0), then filtered by ``top_p`` (nucleus; the first
  token above the cumulative threshold is kept) and ``top_k``; ``probs = softmax``;
- ``x0`` is sampled from ``probs`` when ``temperature > 0``, else ``probs.max``;
- score: ``maskgit_plus`` = probability of ``x0``; ``topk_margin`` = top-1 minus top-2
  probability; ``entropy`` = negative entropy ``sum p log(p + 1e-10)``; ``origin`` has no score
  (positions are revealed at random with probability ``1 - s/t``; the engine handles it) and
  uses the probability of ``x0``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STRATEGIES = ("origin", "maskgit_plus", "topk_margin", "entropy")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of the sorted distribution whose mass reaches ``top_p``."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop_sorted = cum > top_p
    # a token is dropped only if the mass *before* it already exceeds top_p (so the first is kept)
    drop_sorted = torch.cat([torch.zeros_like(drop_sorted[..., :1]), drop_sorted[..., :-1]], dim=-1)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def propose(
    logits: torch.Tensor,
    strategy: str,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (x0 [...], score [...], prob of x0 [...])."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if temperature > 0:
        flat = flat / temperature
    if top_p is not None and top_p < 1:
        flat = top_p_filter(flat, top_p)
    if top_k is not None:
        flat = top_k_filter(flat, top_k)
    probs = torch.softmax(flat, dim=-1)
    if temperature > 0 and flat.shape[0] > 0:
        x0 = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
        prob = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        prob, x0 = probs.max(dim=-1)
    if strategy in ("maskgit_plus", "origin"):
        score = prob
    elif strategy == "topk_margin":
        top2 = torch.topk(probs, min(2, vocab), dim=-1).values  # same values as a full sort's first two
        score = top2[:, 0] - top2[:, 1]
    elif strategy == "entropy":
        score = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    else:  # validated by the engine
        raise ValueError(f"unknown strategy '{strategy}' (allowed: {', '.join(STRATEGIES)})")
    return x0.reshape(lead), score.reshape(lead), prob.reshape(lead)
