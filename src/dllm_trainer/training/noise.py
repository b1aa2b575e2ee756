"""The MDLM forward (noising) process.

Each sample draws a mask ratio t = eps + (1 - eps) * U(0, 1) (then rescaled into
[min_ratio, max_ratio]) and masks each trainable token independently with probability t.
Prompt tokens (label -100) are never masked.

The randomness of a sample comes from a generator seeded by (seed, stream, epoch, sample_index)
alone, never from a worker's RNG stream. So a sample gets the same noise whatever batch it lands
in, however many workers there are, and after a resume: this is what makes the loss invariant to
how a batch is split and lets a resumed run reach the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TRAIN_STREAM = 0
EVAL_STREAM = 1  # evals use fixed noise (epoch 0) so eval losses are comparable across steps


@dataclass(frozen=True)
class NoiseSchedule:
    eps: float = 1e-3
    min_ratio: float = 0.0
    max_ratio: float = 1.0

    def ratio(self, u: float) -> float:
        t = self.eps + (1.0 - self.eps) * u
        return self.min_ratio + (self.max_ratio - self.min_ratio) * t


def sample_generator(seed: int, stream: int, epoch: int, sample_index: int) -> np.random.Generator:
    """An independent generator per sample; numpy draws element by element, so a row's first k
    uniforms do not depend on how long the (padded) row is."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, epoch, sample_index])))


def draw_masks(
    labels: torch.Tensor,
    sample_index: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    seed: int,
    epoch: int,
    stream: int = TRAIN_STREAM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (masked [B, L] bool, t [B] float32) on the device of ``labels``.

    Only trainable positions (labels != -100) can be masked.
    """
    B, L = labels.shape
    ts = np.empty(B, dtype=np.float64)
    uniforms = np.empty((B, L), dtype=np.float64)
    for b, idx in enumerate(sample_index.tolist()):
        g = sample_generator(seed, stream, epoch, int(idx))
        ts[b] = schedule.ratio(g.random())
        uniforms[b] = g.random(L)
    t = torch.from_numpy(ts).to(labels.device, torch.float32)
    u = torch.from_numpy(uniforms).to(labels.device)
    masked = (u < t.double()[:, None]) & (labels != -100)
    return masked, t
