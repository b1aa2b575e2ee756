"""How many masked tokens are revealed at each denoising step.

Two schedules, one per reference sampler:

- LLaDA (``generate.py`` of the LLaDA release): inside a block, the masked count ``n`` is split
  evenly over the block's steps: every step reveals ``n // steps`` tokens and the first
  ``n % steps`` steps reveal one more. Precomputed once per block.
- Dream (``generation_utils.py`` of the Dream release): timesteps ``linspace(1, eps, steps + 1)``
  (float32); at step ``i`` with ``t = ts[i]``, ``s = ts[i + 1]`` and ``n`` tokens still masked,
  ``int(n * (1 - s / t))`` tokens are revealed, and all remaining ones at the last step.
  Recomputed from the current masked count at every step.
"""
from __future__ import annotations

import torch


def llada_num_transfer_tokens(mask_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """[B] masked counts -> [B, steps] tokens to reveal per step (remainder to the earliest steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    counts = mask_counts.reshape(-1, 1).long()
    base = counts // steps
    remainder = counts % steps
    extra = torch.arange(steps, device=counts.device).unsqueeze(0) < remainder
    return base + extra.long()


def dream_timesteps(steps: int, eps: float = 1e-3, device=None) -> torch.Tensor:
    """Dream's decreasing time grid: ``steps + 1`` float32 points from 1 to ``eps``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_num_transfer_tokens(
    num_masked: torch.Tensor, timesteps: torch.Tensor, step: int, steps: int
) -> torch.Tensor:
    """[B] masked counts -> [B] tokens to reveal at ``step`` of ``steps`` (Dream's rule).

    The arithmetic is done in float32 tensors exactly like the reference, so the integer counts
    (which depend on float rounding of ``1 - s / t``) agree with it.
    """
    n = num_masked.reshape(-1).to(torch.float32)
    if step >= steps - 1:
        return n.long()
    t = timesteps[step]
    s = timesteps[step + 1]
    return (n * (1 - s / t)).long()  # truncation toward zero == Python int() for n >= 0
