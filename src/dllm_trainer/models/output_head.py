"""Output head at selected positions, and chunked cross-entropy that never keeps full logits.

With a 126k-152k vocabulary the output head dominates activation memory: for N supervised
tokens the logits are ``N x V`` and their float32 copy for the loss is twice that again. In
masked diffusion training only the masked positions carry a loss, so both models

1. gather the final hidden states at ``output_positions`` (flat indices into ``B * L``) before
   the head, so the head never runs on unmasked tokens, and
2. with ``target_ids``, run (head + cross-entropy) over chunks of ``ce_chunk_size`` rows, each
   chunk under ``torch.utils.checkpoint``: backward recomputes that chunk's logits instead of
   storing them, so at most one ``chunk x V`` block of logits exists at any time.

``DiffusionLMOutput`` is the return type of both models' ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

IGNORE_INDEX = -100


@dataclass
class DiffusionLMOutput(ModelOutput):
    """Output of our LLaDA and Dream models (see docs/ARCHITECTURE.md, "Model API").

    logits: ``[B, L, V]``, or ``[N, V]`` with ``output_positions``, or ``None`` with ``target_ids``.
    token_loss: ``[N]`` float32 cross-entropy per selected position (``target_ids`` given).
    token_correct: ``[N]`` bool, argmax == target (``target_ids`` given).
    past_key_values: the ``BlockKVCache`` filled (``use_cache=True``) or read (``cache_start``).
        Stored in the field ``cache`` (transformers 5 renamed the ModelOutput field and maps the
        old name); ``out.past_key_values`` reads it without the deprecation warning.
    hidden_states: with ``output_hidden_states=True``, the input of every block plus the final
        normalised hidden state, each ``[B, L, D]``.
    """

    logits: Optional[torch.Tensor] = None
    token_loss: Optional[torch.Tensor] = None
    token_correct: Optional[torch.Tensor] = None
    cache: Optional[object] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None

    @property
    def past_key_values(self):
        return self.cache


def _head_and_ce(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()
    loss = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)
    correct = logits.argmax(dim=-1) == targets
    return loss, correct


def chunked_head_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float32 CE and argmax-correctness of ``head(hidden)`` against ``targets``.

    ``hidden``: ``[N, D]``; ``targets``: ``[N]`` (``-100`` rows give loss 0, correct False).
    Rows are processed ``chunk_size`` at a time; when gradients are needed each chunk is
    checkpointed so its ``chunk x V`` logits are freed right after the forward.
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected hidden [N, D] and targets [N], got {list(hidden.shape)} and {list(targets.shape)}"
        )
    if chunk_size is None or chunk_size <= 0:
        chunk_size = max(int(hidden.shape[0]), 1)
    targets = targets.to(device=hidden.device, dtype=torch.long)
    n = hidden.shape[0]
    # Under no_grad nothing is saved for backward, so plain chunking already bounds memory.
    needs_grad = torch.is_grad_enabled()
    losses, corrects = [], []
    # One chunk needs no Python loop over n: torch.compile then keeps one graph for every batch
    # instead of specialising (and recompiling) on the masked-token count.
    for start in [0] if n <= chunk_size else range(0, n, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if needs_grad and n > 0:
            # The RNG state is irrelevant here (no dropout in the head), so skip saving it.
            loss, correct = checkpoint(_head_and_ce, head, h, t, use_reentrant=False, preserve_rng_state=False)
        else:
            loss, correct = _head_and_ce(head, h, t)
        losses.append(loss)
        corrects.append(correct)
    if len(losses) == 1:
        return losses[0], corrects[0]
    return torch.cat(losses), torch.cat(corrects)


def select_positions(hidden: torch.Tensor, output_positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` (``[B, L, D]``) at flat indices ``output_positions`` (into ``B * L``) -> ``[N, D]``."""
    if output_positions.dim() != 1:
        raise ValueError(
            f"output_positions must be a 1-D tensor of flat indices into B*L, got {list(output_positions.shape)}"
        )
    if output_positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"output_positions must be an integer tensor, got {output_positions.dtype}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, output_positions.to(device=hidden.device, dtype=torch.long))


def apply_output_head(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    output_positions: Optional[torch.Tensor] = None,
    target_ids: Optional[torch.Tensor] = None,
    ce_chunk_size: int = 4096,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Shared tail of both models' forward: returns ``(logits, token_loss, token_correct)``.

    ``head`` maps final hidden states (before the final norm) to logits; it must act row-wise
    so that it can be applied to a gathered subset.
    """
    if output_positions is None:
        if target_ids is not None:
            raise ValueError("target_ids requires output_positions (the flat positions the targets belong to).")
        return head(hidden), None, None
    selected = select_positions(hidden, output_positions)
    if target_ids is None:
        return head(selected), None, None
    if target_ids.shape != output_positions.shape:
        raise ValueError(
            f"target_ids {list(target_ids.shape)} must have the same shape as "
            f"output_positions {list(output_positions.shape)}"
        )
    loss, correct = chunked_head_cross_entropy(head, selected, target_ids, ce_chunk_size)
    return None, loss, correct


# token_type_ids: transformers 4 fast tokenizers return them by default; these models have no token types.
_IGNORED_KWARGS = {"num_items_in_batch", "token_type_ids"}


def check_forward_kwargs(labels, output_attentions, kwargs) -> None:
    """Shared guard for arguments transformers/peft may pass that these models do not use."""
    if labels is not None:
        raise ValueError(
            "labels are not supported: masked-diffusion losses are computed from output_positions + "
            "target_ids (per-token CE), weighted by the trainer."
        )
    if output_attentions:
        raise ValueError("output_attentions is not supported (attention runs in fused SDPA kernels).")
    unexpected = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS)
    if unexpected:
        raise TypeError(f"unexpected forward arguments: {unexpected}")
