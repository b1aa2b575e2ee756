"""Per-token weights of the masked-diffusion cross-entropy.

- scheduler: 1/t, the ELBO weight of the linear (MDLM/LLaDA) schedule, per sample.
- uniform:   1 for every masked token.
- cart:      CART (Dream): a masked token i is weighted by how much clean context surrounds it,
             w_i = sum over unmasked positions j of 1/2 * p * (1 - p)^(|i - j| - 1).

Unmasked tokens always weigh 0. Padding (attention_mask 0) does not count as context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_weights(
    kind: str,
    masked: torch.Tensor,
    t: torch.Tensor,
    *,
    geo_p: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights [B, L] (float32) for ``masked`` [B, L] bool and per-sample ratios ``t`` [B]."""
    m = masked.float()
    if kind == "scheduler":
        return m / t.float()[:, None]
    if kind == "uniform":
        return m
    if kind == "cart":
        if geo_p is None:
            raise ValueError("cart weighting needs geo_p")
        return cart_weights(masked, geo_p, attention_mask)
    raise ValueError(f"unknown loss weight kind '{kind}'")


def cart_weights(masked: torch.Tensor, p: float, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    B, L = masked.shape
    clean = ~masked
    if attention_mask is not None:
        clean = clean & attention_mask.bool()
    # Geometric kernel over distances -(L-1)..(L-1), zero at distance 0; a 1-D convolution sums it
    # over the clean positions around every position at once. float64 keeps long rows exact.
    d = torch.arange(-(L - 1), L, device=masked.device, dtype=torch.float64).abs()
    kernel = torch.where(d == 0, torch.zeros_like(d), 0.5 * p * (1.0 - p) ** (d - 1))
    context = F.conv1d(clean.double()[:, None, :], kernel.flip(0)[None, None, :], padding=L - 1)[:, 0]
    return (context * masked.double()).float()
