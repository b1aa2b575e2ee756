"""Batching of tokenised rows for diffusion training.

Rows arrive unpadded (input_ids, labels, prompt_len, sample_index). The family's padding policy
(``families.Padding``) decides how they are padded:

- llada: padded with EOS, and the EOS padding is *trainable* (label = EOS, attended): this is how
  LLaDA learns where an answer ends.
- dream: optional per-batch response cutoff (one response length drawn from the batch, longer
  responses trimmed to it before padding), or with probability resp_cutoff_ratio an extra random
  cut of the padded batch. By default (``dream_padding: eos_trained``, as dllm's Dream SFT) the
  padding is the pad token with label = pad token (trained) and attention_mask 0; with
  ``ignored`` it is masked out of attention and loss. When a row's first token is trained (no
  prompt, or mask_prompt_loss off), every row gets a BOS in front (label -100), as dllm's trainer
  does for right-shifted logits.
- bert: plain padding, masked out of attention and loss.

The random choices of the Dream cutoffs are seeded by the batch's sample indices, so a batch is
collated the same way after a resume.

With ``pack_length`` set (``pack_sequences``, llada/dream only), the rows are not padded but packed
into sequences of at most ``pack_length`` tokens with per-row position ids (packing.py); the Dream
cutoffs are applied to the rows first, exactly as they would be unpacked.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..families import FamilyStrategy
from .packing import pack_rows

CUTOFF_STREAM = 2


@dataclass
class DiffusionCollator:
    family: FamilyStrategy
    pad_token_id: int
    eos_token_id: int | None = None
    perbatch_cutoff: bool = True
    resp_cutoff_ratio: float = 0.0
    seed: int = 42
    pad_to_multiple_of: int | None = None
    pack_length: int | None = None  # set: padding-free packing into sequences of this many tokens
    bos_token_id: int | None = None  # Dream: put in front of every row when a first token is trained

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [
            {
                "input_ids": list(f["input_ids"]),
                "labels": list(f["labels"]),
                "prompt_len": int(f.get("prompt_len", 0)),
                "sample_index": int(f.get("sample_index", i)),
            }
            for i, f in enumerate(features)
        ]
        rng = self._batch_rng(rows)
        if self.family.uses_response_cutoffs and self.perbatch_cutoff:
            self._perbatch_cutoff(rows, rng)
        if (self.family.bos_before_trained_first_token and self.bos_token_id is not None
                and any(r["labels"][0] != -100 for r in rows)):
            # As dllm's trainer does for right-shifted logits: a trained first token has no output
            # before it to be predicted from, so every row of the batch starts with an untrained BOS.
            for r in rows:
                r["input_ids"], r["labels"] = [self.bos_token_id, *r["input_ids"]], [-100, *r["labels"]]
                r["prompt_len"] += 1

        max_len = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            max_len = (max_len + m - 1) // m * m
        if self.pack_length:
            # Packing: the random cut of the padded batch (same rng draws as below) is applied to
            # the rows instead, so each packed row is exactly the row the padded batch would hold.
            if self._draw_resp_cutoff(rng):
                self._resp_cutoff_rows(rows, rng, max_len)
            return pack_rows(rows, self.pack_length, pad_token_id=self.pad_token_id,
                             pad_to_multiple_of=self.pad_to_multiple_of)
        policy = self.family.padding
        pad_id = self.eos_token_id if policy.fill == "eos" else self.pad_token_id
        if pad_id is None:
            raise ValueError(f"{self.family.name} training pads with the {policy.fill} token, but the tokenizer has none")
        label_pad, attend_pad = (pad_id if policy.trained else -100), int(policy.attended)

        B = len(rows)
        input_ids = torch.full((B, max_len), pad_id, dtype=torch.long)
        labels = torch.full((B, max_len), label_pad, dtype=torch.long)
        attention_mask = torch.full((B, max_len), attend_pad, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
            attention_mask[b, :n] = 1
        # Under attended (LLaDA) padding nothing is padding for attention: every position is a real token.
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "sample_index": torch.tensor([r["sample_index"] for r in rows], dtype=torch.long),
        }
        if self._draw_resp_cutoff(rng):
            batch = self._resp_cutoff(batch, rows, rng)
        return batch

    # ---- Dream cutoffs ---------------------------------------------------------------------
    def _batch_rng(self, rows) -> np.random.Generator:
        indices = [r["sample_index"] for r in rows]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, CUTOFF_STREAM, *indices])))

    @staticmethod
    def _perbatch_cutoff(rows, rng) -> None:
        """Pick one response length from the batch; trim every longer response to it."""
        resp_lens = [len(r["input_ids"]) - r["prompt_len"] for r in rows]
        kept = int(resp_lens[int(rng.integers(len(resp_lens)))])
        for r, n in zip(rows, resp_lens):
            cut = max(n - kept, 0)
            if cut:
                r["input_ids"] = r["input_ids"][:-cut]
                r["labels"] = r["labels"][:-cut]

    def _draw_resp_cutoff(self, rng) -> bool:
        return (
            self.family.uses_response_cutoffs
            and not self.perbatch_cutoff
            and self.resp_cutoff_ratio > 0
            and rng.random() < self.resp_cutoff_ratio
        )

    @staticmethod
    def _resp_cutoff_rows(rows, rng, padded_len) -> None:
        """``_resp_cutoff`` on unpadded rows: trim every row to the cut padded length."""
        min_resp = min(len(r["input_ids"]) - r["prompt_len"] for r in rows)
        if min_resp <= 1:
            return
        new_len = padded_len - int(rng.integers(1, min_resp))
        for r in rows:
            r["input_ids"], r["labels"] = r["input_ids"][:new_len], r["labels"][:new_len]

    @staticmethod
    def _resp_cutoff(batch, rows, rng):
        """Chop a random number of positions (less than the shortest response) off the padded batch."""
        min_resp = min(len(r["input_ids"]) - r["prompt_len"] for r in rows)
        if min_resp <= 1:
            return batch
        cut = int(rng.integers(1, min_resp))
        new_len = batch["input_ids"].shape[1] - cut
        return {k: (v[:, :new_len].contiguous() if v.dim() == 2 else v) for k, v in batch.items()}
