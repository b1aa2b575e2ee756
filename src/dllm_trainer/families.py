"""One strategy object per model family: bert, llada, dream.

Everything that differs between the families lives here, so the trainer, the collator and the
samplers ask the strategy instead of branching on names:

- which checkpoints belong to the family (config ``model_type`` / ``architectures``),
- how logits line up with tokens (Dream predicts token i from output i-1),
- how responses are padded (LLaDA pads with EOS and trains on it),
- which loss weighting and sampler are the family's defaults,
- how to get the cross-entropy at masked positions only (our LLaDA/Dream models compute the head
  there natively; HF BERT models give full logits that we gather).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ModelError


@dataclass(frozen=True)
class FamilyStrategy:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    shift_logits: bool  # Dream: position i is predicted by output i-1 (position 0 by output 0)
    pad_with_eos: bool  # LLaDA SFT: responses padded with EOS, and those EOS are trained
    uses_response_cutoffs: bool  # Dream SFT: perbatch_cutoff / resp_cutoff_ratio
    default_loss_weight: str
    default_sampler: str
    native_masked_head: bool  # model(..., output_positions=, target_ids=) is supported

    # ---- logits alignment -------------------------------------------------------------------
    def output_positions(self, token_positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Flat indices (into B*L) of the model outputs that predict the given flat token indices."""
        if not self.shift_logits:
            return token_positions
        at_row_start = (token_positions % seq_len) == 0
        return torch.where(at_row_start, token_positions, token_positions - 1)

    def align_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full [B, L, V] logits aligned so that logits[:, i] predicts token i."""
        if not self.shift_logits:
            return logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    # ---- loss at masked positions -----------------------------------------------------------
    def masked_token_loss(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        token_positions: torch.Tensor,
        targets: torch.Tensor,
        ce_chunk_size: int = 4096,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token float32 cross-entropy and argmax-correctness at ``token_positions`` (flat)."""
        seq_len = input_ids.shape[1]
        out_pos = self.output_positions(token_positions, seq_len)
        if self.native_masked_head:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_positions=out_pos,
                target_ids=targets,
                ce_chunk_size=ce_chunk_size,
            )
            return out.token_loss, out.token_correct
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        logits = model(**kwargs).logits
        picked = logits.flatten(0, 1)[out_pos].float()
        loss = F.cross_entropy(picked, targets, reduction="none")
        return loss, picked.argmax(-1) == targets


BERT = FamilyStrategy(
    name="bert",
    # Any encoder whose masked-LM class AutoModelForMaskedLM builds; a plain encoder checkpoint
    # (e.g. BertModel) loads into it with the MLM head initialised (training/loading.py).
    model_types=("bert", "modernbert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "electra"),
    architectures=(
        "BertForMaskedLM", "ModernBertForMaskedLM", "RobertaForMaskedLM", "XLMRobertaForMaskedLM",
        "DistilBertForMaskedLM", "DebertaV2ForMaskedLM", "ElectraForMaskedLM",
        "BertModel", "ModernBertModel", "RobertaModel", "XLMRobertaModel", "DistilBertModel", "DebertaV2Model",
        "ElectraModel",
    ),
    shift_logits=False,
    pad_with_eos=False,
    uses_response_cutoffs=False,
    default_loss_weight="scheduler",
    default_sampler="low_confidence",
    native_masked_head=False,
)

LLADA = FamilyStrategy(
    name="llada",
    model_types=("llada", "lladamoe"),  # LLaDA-MoE trains and samples exactly like LLaDA
    architectures=("LLaDAModelLM", "LLaDAMoEModelLM"),
    shift_logits=False,
    pad_with_eos=True,
    uses_response_cutoffs=False,
    default_loss_weight="scheduler",
    default_sampler="low_confidence",
    native_masked_head=True,
)

DREAM = FamilyStrategy(
    name="dream",
    model_types=("dream",),  # compared case-insensitively: the public config says "Dream"
    architectures=("DreamModel",),
    shift_logits=True,
    pad_with_eos=False,
    uses_response_cutoffs=True,
    default_loss_weight="cart[geo_p:0.3]",
    default_sampler="maskgit_plus",
    native_masked_head=True,
)

FAMILIES: dict[str, FamilyStrategy] = {f.name: f for f in (BERT, LLADA, DREAM)}


def family_of_model_type(model_type: str | None) -> FamilyStrategy | None:
    mt = (model_type or "").lower()
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    return None


def get_family(name_or_model) -> FamilyStrategy:
    """The strategy for a family name ("bert" | "llada" | "dream"), a config, or a model."""
    if isinstance(name_or_model, str):
        try:
            return FAMILIES[name_or_model]
        except KeyError:
            raise ModelError(
                f"unknown model family '{name_or_model}' (allowed: {', '.join(FAMILIES)})"
            ) from None
    config = getattr(name_or_model, "config", name_or_model)
    # peft wraps the model; its config is the base model's.
    fam = family_of_model_type(getattr(config, "model_type", None))
    if fam is None:
        raise ModelError(
            f"model type '{getattr(config, 'model_type', None)}' is not a supported diffusion LM "
            f"(supported: {', '.join(a for f in FAMILIES.values() for a in f.architectures)})"
        )
    return fam
