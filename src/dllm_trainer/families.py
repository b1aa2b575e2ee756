"""One strategy object per model family: bert, llada, dream, a2d.

Everything that differs between the families lives here, so the trainer, the collator and the
samplers ask the strategy instead of branching on names:

- which checkpoints belong to the family (config ``model_type`` / ``architectures``),
- how logits line up with tokens (Dream predicts token i from output i-1),
- how a batch's rows are padded and how that padding is treated (``Padding``: LLaDA pads with
  EOS and trains on it; Dream, by default, trains its pad token as dllm's Dream SFT does),
- which config settings apply to the family only (model cards list only those),
- which loss weighting and sampler are the family's defaults,
- how to get the cross-entropy at masked positions only (our LLaDA/Dream models compute the head
  there natively; HF BERT models give full logits that we gather; HF causal LMs compute the head
  at the needed columns through ``logits_to_keep``),
- which Auto class loads the family's checkpoints, and what a loaded model needs before it is a
  diffusion LM (a2d: bidirectional attention and a config marker; see models/a2d.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ModelError


@dataclass(frozen=True)
class Padding:
    """How the rows of a batch are padded to one length (collator.py) and how the trainer treats
    that padding (attention, loss, CART context).

    Right padding only. ``fill`` is the token written past a row's end ("eos" or "pad");
    ``trained``: its label is that token (maskable, in the loss, counted as a trainable token),
    else -100; ``attended``: attention_mask 1 there (the model sees it as a real token);
    ``isolated``: padded positions attend to nothing and are seen by nothing (the pairwise mask
    dllm's Dream model builds from a 2-D padding mask; it only matters when padding is trained and
    not attended); ``clean_context``: an unmasked padded position counts as clean context in CART
    weights.
    """

    fill: str
    trained: bool
    attended: bool
    isolated: bool = False
    clean_context: bool = False

    def model_attention_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask the model gets for a collated 2-D ``attention_mask`` (0 = padding)."""
        if not self.isolated or attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
            return attention_mask
        keep = attention_mask.bool()
        return keep[:, None, :, None] & keep[:, None, None, :]  # [B, 1, Lq, Lk]

    def context_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask CART weights count clean context in (None: every unmasked position counts)."""
        return None if self.clean_context else attention_mask


# LLaDA SFT: responses padded with EOS, attended and trained: how LLaDA learns where an answer ends.
EOS_TRAINED = Padding(fill="eos", trained=True, attended=True, clean_context=True)
# dllm's Dream SFT (examples/dream/sft.py): padded with the pad token (Dream's <|endoftext|>, its
# EOS), labels = pad ("finetune on padded <eos_token>"), attention_mask 0 there, which Dream's
# forward turns into a pairwise mask; CART counts every unmasked position, padding included.
DREAM_PAD_TRAINED = Padding(fill="pad", trained=True, attended=False, isolated=True, clean_context=True)
# Padding is out of attention, loss and CART context (BERT; Dream's `dream_padding: ignored`).
IGNORED = Padding(fill="pad", trained=False, attended=False)


@dataclass(frozen=True)
class FamilyStrategy:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    shift_logits: bool  # Dream: position i is predicted by output i-1 (position 0 by output 0)
    padding: Padding  # how a batch's rows are padded (a run may choose another of padding_options)
    uses_response_cutoffs: bool  # Dream SFT: perbatch_cutoff / resp_cutoff_ratio
    default_loss_weight: str
    default_sampler: str
    native_masked_head: bool  # model(..., output_positions=, target_ids=) is supported
    auto_class: str = "AutoModel"  # the transformers Auto class that loads the family's checkpoints
    trains_mask_embedding: bool = False  # LoRA also trains the mask token's embedding row (a new token)
    padding_options: tuple[tuple[str, Padding], ...] = ()  # (name, policy) the padding_setting picks from
    padding_setting: str | None = None  # the TrainConfig field that picks it (Dream: dream_padding)
    bos_before_trained_first_token: bool = False  # dllm's trainer, right-shifted logits (collator.py)
    pipeline_tag: str = "text-generation"  # for the model card
    own_settings: tuple[str, ...] = ()  # TrainConfig fields that apply to this family only (model card)

    # ---- per-model variants and preparation (a2d overrides these) ------------------------------
    def handles(self, model_type: str) -> bool:
        """Whether checkpoints of this (lower-case) config ``model_type`` belong to the family."""
        return model_type in self.model_types

    def configured(self, cfg) -> "FamilyStrategy":
        """The strategy a training run with config ``cfg`` uses (options of the method applied)."""
        if self.padding_setting is None:
            return self
        return dataclasses.replace(self, padding=self.padding_option(getattr(cfg, self.padding_setting)))

    def padding_option(self, name: str) -> Padding:
        options = dict(self.padding_options)
        if name not in options:
            raise ModelError(f"unknown padding '{name}' for {self.name} (allowed: {', '.join(options) or 'none'})")
        return options[name]

    def for_config(self, config) -> "FamilyStrategy":
        """The strategy that fits a saved/loaded model with this config (e.g. its logits alignment)."""
        return self

    def adapt(self, model, mask_token_id: int, *, log=print) -> None:
        """Make a freshly loaded checkpoint of the family a diffusion LM of this strategy (in place)."""

    def logits_at(self, model, input_ids: torch.Tensor, columns: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits [B, len(columns), V] of the model outputs at sequence ``columns`` (kwargs: None dropped)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return model(input_ids=input_ids, **kwargs).logits[:, columns]

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
        target_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token float32 cross-entropy and argmax-correctness at ``token_positions`` (flat).
        With ``target_weights`` ``[N]``: the weighted sum ``sum_i w_i * CE_i`` instead of the
        per-token CE (our models then use the fused head + loss, output_head.py)."""
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
                **({} if target_weights is None else {"target_weights": target_weights}),
            )
            loss = out.token_loss if target_weights is None else out.weighted_loss
            return loss, out.token_correct
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        logits = model(**kwargs).logits
        picked = logits.flatten(0, 1)[out_pos].float()
        loss = F.cross_entropy(picked, targets, reduction="none")
        if target_weights is not None:
            loss = (loss * target_weights.float()).sum()
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
    padding=IGNORED,
    uses_response_cutoffs=False,
    default_loss_weight="scheduler",
    default_sampler="low_confidence",
    native_masked_head=False,
    auto_class="AutoModelForMaskedLM",
    pipeline_tag="fill-mask",
)

LLADA = FamilyStrategy(
    name="llada",
    model_types=("llada", "lladamoe"),  # LLaDA-MoE trains and samples exactly like LLaDA
    architectures=("LLaDAModelLM", "LLaDAMoEModelLM"),
    shift_logits=False,
    padding=EOS_TRAINED,
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
    padding=DREAM_PAD_TRAINED,
    padding_options=(("eos_trained", DREAM_PAD_TRAINED), ("ignored", IGNORED)),
    padding_setting="dream_padding",
    bos_before_trained_first_token=True,
    uses_response_cutoffs=True,
    default_loss_weight="cart[geo_p:0.3]",
    default_sampler="maskgit_plus",
    native_masked_head=True,
    own_settings=("dream_padding", "perbatch_cutoff", "resp_cutoff_ratio"),
)



@dataclass(frozen=True)
class A2DStrategy(FamilyStrategy):
    """Autoregressive -> diffusion: a Hugging Face causal LM trained as a masked diffusion LM.

    The model is the base's own class made bidirectional (models/a2d.py); the logits shift is an
    option of the run (``a2d_shift_logits``), recorded in the saved model's config marker and read
    back from it (``for_config``). Responses are EOS-padded and the padding trained, as for LLaDA.
    """

    def handles(self, model_type: str) -> bool:
        # The listed types are tested; any other decoder transformers builds with
        # AutoModelForCausalLM (and no masked-LM class: not an encoder) is tried, and
        # check_bidirectional refuses it on load if it ignores config.is_causal.
        if model_type in self.model_types:
            return True
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    def configured(self, cfg) -> "FamilyStrategy":
        return dataclasses.replace(super().configured(cfg), shift_logits=bool(cfg.a2d_shift_logits))

    def for_config(self, config) -> "FamilyStrategy":
        from .models.a2d import read_marker

        marker = read_marker(config)
        if marker is None:
            raise ModelError(
                f"this {getattr(config, 'model_type', '?')} model is an autoregressive LM, not a diffusion LM: "
                "convert it first by training it with training_method 'a2d'"
            )
        shift = bool(marker.get("shift_logits", True))
        return self if shift == self.shift_logits else dataclasses.replace(self, shift_logits=shift)

    def adapt(self, model, mask_token_id: int, *, log=print) -> None:
        from .models.a2d import check_bidirectional, make_diffusion_lm

        make_diffusion_lm(model, mask_token_id, shift_logits=self.shift_logits)
        check_bidirectional(model)
        log(f"[dllm] a2d: {getattr(model.config, 'model_type', '?')} attention made bidirectional "
            f"(config.is_causal=False); mask token id {mask_token_id}; logits shift {'on' if self.shift_logits else 'off'}")

    def logits_at(self, model, input_ids: torch.Tensor, columns: torch.Tensor, **kwargs) -> torch.Tensor:
        # HF causal LMs run the output head only at ``logits_to_keep`` (a tensor of sequence indices).
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return model(input_ids=input_ids, logits_to_keep=columns, use_cache=False, **kwargs).logits

    def masked_token_loss(self, model, input_ids, attention_mask, position_ids, token_positions, targets,
                          ce_chunk_size: int = 4096, target_weights=None):
        seq_len = input_ids.shape[1]
        out_pos = self.output_positions(token_positions, seq_len)
        columns, slot = torch.unique(out_pos % seq_len, return_inverse=True)
        logits = self.logits_at(model, input_ids, columns, attention_mask=attention_mask, position_ids=position_ids)
        picked = logits[out_pos // seq_len, slot].float()
        loss = F.cross_entropy(picked, targets, reduction="none")
        if target_weights is not None:
            loss = (loss * target_weights.float()).sum()
        return loss, picked.argmax(-1) == targets


A2D = A2DStrategy(
    name="a2d",
    # Decoder-only causal LMs whose attention honours transformers' config.is_causal switch
    # (tested; checked on every load by models.a2d.check_bidirectional). SmolLM/SmolLM2 are
    # Llama. Other causal LMs are tried too (``handles``) but not offered in the Train tab.
    model_types=("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "gpt_neox", "smollm3",
                 "phi3"),
    architectures=("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                   "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GPTNeoXForCausalLM",
                   "SmolLM3ForCausalLM", "Phi3ForCausalLM"),
    shift_logits=True,
    padding=EOS_TRAINED,
    uses_response_cutoffs=False,
    default_loss_weight="scheduler",
    default_sampler="low_confidence",
    native_masked_head=False,
    auto_class="AutoModelForCausalLM",
    trains_mask_embedding=True,
    own_settings=("a2d_shift_logits",),
)

FAMILIES: dict[str, FamilyStrategy] = {f.name: f for f in (BERT, LLADA, DREAM, A2D)}


def family_of_model_type(model_type: str | None) -> FamilyStrategy | None:
    mt = (model_type or "").lower()
    for fam in FAMILIES.values():  # in order: a2d's catch-all for causal LMs comes last
        if fam.handles(mt):
            return fam
    return None


def get_family(name_or_model) -> FamilyStrategy:
    """The strategy for a family name ("bert" | "llada" | "dream" | "a2d"), a config, or a model
    (then the variant that fits it: an a2d model's logits shift comes from its config marker)."""
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
    return fam.for_config(config)
