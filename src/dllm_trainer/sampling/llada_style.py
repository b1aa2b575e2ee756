"""Token proposals for the LLaDA / BERT samplers (strategies ``low_confidence`` and ``random``).

At each step every candidate position gets a proposed token ``x0`` and a score; the engine then
reveals the highest-scoring masked positions.

- ``x0``: argmax of the logits at temperature 0; otherwise Gumbel-max sampling done in float64
  (``exp(logits) / (-log u) ** temperature``, as the LLaDA reference does, because low-precision
  Gumbel noise hurts generation quality).
- score: ``low_confidence`` = softmax probability of ``x0`` under the (untempered) model
  distribution; ``random`` = uniform noise (random remasking order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STRATEGIES = ("low_confidence", "random")


def propose(
    logits: torch.Tensor,
    strategy: str,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (x0 [...], score [...], prob of x0 [...])."""
    if temperature > 0:
        logits64 = logits.to(torch.float64)
        u = torch.rand(logits64.shape, dtype=torch.float64, device=logits.device, generator=generator)
        x0 = torch.argmax(logits64.exp() / (-torch.log(u)) ** temperature, dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    probs = F.softmax(logits, dim=-1)
    prob = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    if strategy == "low_confidence":
        score = prob
    elif strategy == "random":
        score = torch.rand(x0.shape, device=logits.device, generator=generator)
    else:  # validated by the engine
        raise ValueError(f"unknown strategy '{strategy}' (allowed: {', '.join(STRATEGIES)})")
    return x0, score, prob
