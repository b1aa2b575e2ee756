"""Padding-free sequence packing for masked-diffusion training (``pack_sequences``).

What it does
------------
The collator receives a micro-batch of ``batch_size`` rows. Unpacked, every row is padded to the
longest one. Packed, the rows are laid end to end into as few sequences of at most
``pack_length`` (= ``max_length``) tokens as first-fit-decreasing finds, and only the tail of
each packed sequence is padding. A packed batch carries

- ``input_ids``, ``labels``   ``[P, Lp]``  (P packed sequences; padding: pad id / -100)
- ``position_ids``            ``[P, Lp]``  restart at 0 at every segment (row), so RoPE sees
                                          each row exactly as it would unpacked
- ``segment_ids``             ``[P, Lp]``  which row (0..B-1) a position belongs to, -1 = padding
- ``pack_index``              ``[B, Lmax]`` flat index into ``P * Lp`` of each row's tokens, -1 past
                                          the row's end (how to get back to the per-row layout)
- ``sample_index``            ``[B]``     per ROW, as unpacked (it seeds the row's noise)

and no ``attention_mask``: the trainer builds the block-diagonal bidirectional 4-D bool mask
(``block_diagonal_mask``) on the device, so rows never attend across segment boundaries and the
``P x Lp x Lp`` mask never travels through the data loader.

Exactness
---------
A packed segment gets exactly what the row would get unpacked and on its own (no padding):

- noise: the labels are unpacked to the per-row layout, ``noise.draw_masks`` runs per row with the
  row's ``sample_index`` (so the row's t and mask are the ones it would draw unpacked), and the
  mask is scattered back into the packed layout;
- loss weights (1/t, uniform, CART) are computed in the per-row layout, so CART's clean-context
  sum never crosses a segment boundary, and scattered back;
- Dream's one-position shift (token i predicted by output i-1) restarts at every segment: a
  segment's first token is predicted by its own output, as position 0 is;
- the normalisation (trainable tokens of the optimizer step, or masked tokens) is unchanged, and
  packing adds no trainable token.

Families
--------
Packing needs models that accept 4-D masks and per-row position ids: our LLaDA and Dream models
(``FamilyStrategy.native_masked_head``). For ``bert`` (HF BERT/ModernBERT) ``pack_sequences`` is
ignored with a log line, and length-grouped batching applies instead (``packing_active``).
LLaDA's trainable EOS padding pads every row of an unpacked batch to the batch's longest row;
packed rows carry no padding, so only the rows' own tokens (including the EOS the chat template
ends them with) are trained. That is the point of packing, and it is logged when a run starts.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .loss_weights import token_weights
from .noise import NoiseSchedule, draw_masks

PACKED_KEYS = ("segment_ids", "pack_index")


# ---- config ------------------------------------------------------------------------------------
def packing_active(cfg) -> bool:
    """True when ``cfg.pack_sequences`` is on and the family's models take block-diagonal masks."""
    from ..families import FAMILIES

    fam = FAMILIES.get(cfg.training_method)
    return bool(cfg.pack_sequences) and fam is not None and fam.native_masked_head


def packing_note(cfg) -> str | None:
    """The log line a run prints about packing (fallback for bert, EOS padding for llada), or None."""
    if not cfg.pack_sequences:
        return None
    if not packing_active(cfg):
        return (
            f"[dllm] pack_sequences is ignored for training_method '{cfg.training_method}': its models take no "
            "block-diagonal attention masks; using padded batches"
            + (" grouped by length" if cfg.group_by_length else "")
        )
    from ..families import get_family

    if get_family(cfg.training_method).configured(cfg).padding.trained:
        return (
            f"[dllm] pack_sequences: rows are packed without padding, so the trainable padding of unpacked "
            f"{cfg.training_method} batches does not apply (each row's own tokens, including its EOS, are trained)"
        )
    return None


# ---- collation ---------------------------------------------------------------------------------
def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: row indices grouped into bins whose lengths sum to at most ``capacity``.

    A row longer than ``capacity`` gets a bin of its own. Deterministic (ties keep row order).
    Within a bin, rows keep their original order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return [sorted(b) for b in bins]


def pack_rows(
    rows: list[dict],
    capacity: int,
    *,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pack rows (``input_ids``, ``labels``, ``sample_index``) into a padding-free batch (see module doc)."""
    lengths = [len(r["input_ids"]) for r in rows]
    bins = plan_bins(lengths, capacity)
    Lp = max(sum(lengths[i] for i in b) for b in bins)
    if pad_to_multiple_of:
        m = pad_to_multiple_of
        Lp = (Lp + m - 1) // m * m
    P, B, Lmax = len(bins), len(rows), max(lengths)
    input_ids = torch.full((P, Lp), pad_token_id, dtype=torch.long)
    labels = torch.full((P, Lp), -100, dtype=torch.long)
    position_ids = torch.zeros((P, Lp), dtype=torch.long)
    segment_ids = torch.full((P, Lp), -1, dtype=torch.long)
    pack_index = torch.full((B, Lmax), -1, dtype=torch.long)
    for p, members in enumerate(bins):
        start = 0
        for i in members:
            n = lengths[i]
            input_ids[p, start : start + n] = torch.tensor(rows[i]["input_ids"], dtype=torch.long)
            labels[p, start : start + n] = torch.tensor(rows[i]["labels"], dtype=torch.long)
            position_ids[p, start : start + n] = torch.arange(n)
            segment_ids[p, start : start + n] = i
            pack_index[i, :n] = p * Lp + start + torch.arange(n)
            start += n
    # Padding positions count up from 0 like a segment of their own (never attended, never trained).
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "pack_index": pack_index,
        "sample_index": torch.tensor([r["sample_index"] for r in rows], dtype=torch.long),
    }


def is_packed(inputs) -> bool:
    return all(k in inputs for k in PACKED_KEYS)


def block_diagonal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[P, 1, Lp, Lp]`` bool, True where query and key are in the same segment (padding attends nothing;
    the models let such query rows attend everywhere to avoid NaN, and their outputs are never used)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (segment_ids >= 0)[:, None, :])[:, None]


# ---- per-row <-> packed layout --------------------------------------------------------------------
def unpack(packed: torch.Tensor, pack_index: torch.Tensor, fill) -> torch.Tensor:
    """``[P, Lp]`` -> per-row ``[B, Lmax]``; positions past a row's end get ``fill``."""
    valid = pack_index >= 0
    out = packed.flatten()[pack_index.clamp(min=0)]
    return torch.where(valid, out, torch.as_tensor(fill, dtype=packed.dtype, device=packed.device))


def repack(rowwise: torch.Tensor, pack_index: torch.Tensor, shape, fill) -> torch.Tensor:
    """Per-row ``[B, Lmax]`` -> packed ``shape``; packed padding gets ``fill``."""
    out = torch.full((shape[0] * shape[1],), fill, dtype=rowwise.dtype, device=rowwise.device)
    valid = pack_index >= 0
    out[pack_index[valid]] = rowwise[valid]
    return out.view(shape)


def packed_noise_and_weights(
    inputs,
    *,
    schedule: NoiseSchedule,
    seed: int,
    epoch: int,
    stream: int,
    weight_kind: str,
    geo_p: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked ``[P, Lp]`` bool, t ``[B]``, weights ``[P, Lp]`` float32) for a packed batch.

    Drawn and weighted per ROW (exactly as unpacked), then scattered into the packed layout.
    """
    labels, pack_index = inputs["labels"], inputs["pack_index"]
    row_labels = unpack(labels, pack_index, -100)
    row_masked, t = draw_masks(row_labels, inputs["sample_index"], schedule=schedule, seed=seed, epoch=epoch, stream=stream)
    # Only the row's own positions are context (as for an unpadded row): CART stays inside the segment.
    row_weights = token_weights(weight_kind, row_masked, t, geo_p=geo_p, attention_mask=(pack_index >= 0))
    masked = repack(row_masked, pack_index, labels.shape, False)
    weights = repack(row_weights, pack_index, labels.shape, 0.0)
    return masked, t, weights


# ---- loss ------------------------------------------------------------------------------------------
def segment_output_positions(family, token_positions: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Flat output indices predicting the given flat token indices, with Dream's shift restarting at
    every segment: a segment's first token (position id 0) is predicted by its own output."""
    if not family.shift_logits:
        return token_positions
    at_segment_start = position_ids.flatten()[token_positions] == 0
    return torch.where(at_segment_start, token_positions, token_positions - 1)


@functools.lru_cache(maxsize=None)
def _unshifted(family):
    return dataclasses.replace(family, shift_logits=False)


def packed_masked_token_loss(
    family,
    model,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    position_ids: torch.Tensor,
    token_positions: torch.Tensor,
    targets: torch.Tensor,
    ce_chunk_size: int = 4096,
    target_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``family.masked_token_loss`` for a packed batch: block-diagonal attention, per-segment positions,
    and the Dream shift applied per segment (the family's own shift only knows row starts, so it is
    applied here and the family is called with its shift switched off)."""
    if not family.native_masked_head:
        raise ValueError(f"packing needs a model that takes 4-D attention masks; family '{family.name}' does not")
    out_pos = segment_output_positions(family, token_positions, position_ids)
    return _unshifted(family).masked_token_loss(
        model, input_ids, block_diagonal_mask(segment_ids), position_ids, out_pos, targets, ce_chunk_size,
        target_weights=target_weights,
    )
