"""Loading a model + tokenizer for training: family check, precision, 4-bit, mask token, LoRA.

The family's Auto class loads the checkpoint (masked LMs, our LLaDA/Dream, causal LMs for a2d);
``family.adapt`` then makes it the family's diffusion LM (a2d: bidirectional attention)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..errors import ConfigError, ModelError
from ..families import FAMILIES, FamilyStrategy, family_of_model_type

MASK_TOKEN_ADDED = "<|mdm_mask|>"



@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    family: FamilyStrategy
    mask_token_id: int
    torch_dtype: torch.dtype
    new_head: bool  # the checkpoint had no output head (e.g. a sentence-embedding BERT)


def resolve_dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        if cfg.train_device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]


@contextmanager
def quiet_load_report():
    """Loading a checkpoint that lacks some weights makes transformers print a load-report table
    and, for a BERT without its masked-LM head (e.g. a sentence-embedding model, to which we add
    the head), "This checkpoint seem corrupted ... tie cls.predictions.bias". The caller says what
    matters once, in its own words (load_for_training: the new head; other missing weights)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _stored_model_type(path: str) -> str | None:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            mt = json.load(fh).get("model_type")
        return mt.lower() if isinstance(mt, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def load_model_config(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if _stored_model_type(path) not in FAMILIES["bert"].model_types:
        # LLaDA/Dream (or a Hub id): register ours with the Auto classes. A BERT-family config does
        # not need it, and the launching process's preflight then skips importing transformers' model code.
        from .. import models  # noqa: F401

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model folder '{path}' has no config.json (is it empty or not a Hugging Face model?)")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not os.path.exists(path) and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
            raise ModelError(f"model '{path}' does not exist (give a local model folder or a Hugging Face Hub id)") from None
        if "custom code" in first or "trust_remote_code" in first:
            raise ModelError(
                f"model '{path}' can only be loaded by running Python code shipped with it (auto_map), and "
                "trust_remote_code is off; set trust_remote_code: true only if you trust that code"
            ) from None
        raise ModelError(f"cannot load the config of model '{path}': {first}") from None


def check_family(config, cfg: TrainConfig) -> FamilyStrategy:
    family = FAMILIES[cfg.training_method]
    found = family_of_model_type(getattr(config, "model_type", None))
    archs = ", ".join(getattr(config, "architectures", None) or [str(getattr(config, "model_type", "?"))])
    if found is None:
        raise ModelError(
            f"model '{cfg.model_name}' ({archs}) is not supported: training_method '{cfg.training_method}' expects "
            f"{' or '.join(family.architectures)}"
        )
    if found is not family:
        raise ConfigError(
            f"training_method '{cfg.training_method}' does not fit model '{cfg.model_name}' ({archs}): "
            f"use training_method '{found.name}' for this model"
        )
    limit = max_positions(config)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"max_length ({cfg.max_length}) exceeds the model's maximum positions ({limit}); use at most "
                          f"{limit}, or 0 for the model's own limit")
    return family


def head_modules(model) -> list[str]:
    """Names of a masked-LM's output head: its top-level submodules with weights other than the
    encoder (``base_model_prefix``), e.g. ``cls`` (BERT), ``lm_head`` (RoBERTa), ``head``+``decoder``
    (ModernBERT), ``vocab_transform``+``vocab_layer_norm``+``vocab_projector`` (DistilBERT)."""
    base = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != base and any(True for _ in child.parameters())]


def resolve_max_length(cfg: TrainConfig, config) -> int:
    """max_length as set, or for 0 (the default) the model's maximum positions capped at
    MAX_LENGTH_AUTO_CAP (so the form's default fits a 512-position BERT and a 256-position test model)."""
    from ..config import MAX_LENGTH_AUTO_CAP

    if cfg.max_length > 0:
        return cfg.max_length
    limit = max_positions(config)
    return min(limit, MAX_LENGTH_AUTO_CAP) if limit else MAX_LENGTH_AUTO_CAP


def max_length_note(cfg: TrainConfig, resolved: int, config) -> str | None:
    """The log line that says what max_length 0 became."""
    from ..config import MAX_LENGTH_AUTO_CAP

    if cfg.max_length > 0:
        return None
    limit = max_positions(config)
    limit_text = f"the model's maximum positions are {limit}" if limit else "the model states no maximum positions"
    return f"[dllm] max_length 0 (auto): {resolved} tokens ({limit_text}; auto is at most {MAX_LENGTH_AUTO_CAP})"


def load_for_training(cfg: TrainConfig, *, log=print, device_map=None) -> LoadedModel:
    import transformers
    from transformers import AutoTokenizer

    config = load_model_config(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
    family = check_family(config, cfg).configured(cfg)
    dtype = resolve_dtype(cfg)
    if cfg.trust_remote_code:
        log("[dllm] warning: trust_remote_code is on: modeling code shipped with the checkpoint will run")

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"cannot load a tokenizer for model '{cfg.model_name}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    # Full fine-tunes keep float32 master weights (mixed precision autocasts); LoRA keeps the
    # frozen base in the low precision to save memory.
    kwargs["dtype"] = dtype if cfg.lora else torch.float32
    if cfg.load_in_4bit:
        if not torch.cuda.is_available():
            raise ConfigError("load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit), and none is visible")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    auto_cls = getattr(transformers, family.auto_class)
    try:
        with quiet_load_report():
            model, info = auto_cls.from_pretrained(cfg.model_name, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the weights of model '{cfg.model_name}': {msg}") from None

    new_head = False
    head_names = head_modules(model)
    all_missing = list(info.get("missing_keys", []) or [])
    missing = [k for k in all_missing if any(k.startswith(h + ".") for h in head_names)]
    if missing:
        new_head = True
        log(f"[dllm] model '{cfg.model_name}' has no masked-LM head in its checkpoint: initialised it fresh "
            f"({len(missing)} tensors: {', '.join(sorted(missing)[:4])}{', ...' if len(missing) > 4 else ''}); it is trained in full")
    other = sorted(set(all_missing) - set(missing))
    if other:
        log(f"[dllm] warning: {len(other)} weights of model '{cfg.model_name}' are not in its checkpoint and start "
            f"random (e.g. {', '.join(other[:3])}); check that the checkpoint is complete")

    mask_id = resolve_mask_token(model, tokenizer, log=log)
    family.adapt(model, mask_id, log=log)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"the tokenizer of '{cfg.model_name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    if cfg.lora:
        model = apply_lora(model, cfg, family, new_head_modules=head_names if new_head else [], log=log,
                           mask_token_id=mask_id)
    return LoadedModel(model, tokenizer, family, mask_id, dtype, new_head)


def resolve_mask_token(model, tokenizer, *, log=print) -> int:
    """The config's mask_token_id, else the tokenizer's mask token, else a new one (embeddings resized)."""
    mid = getattr(model.config, "mask_token_id", None)
    rows = model.get_input_embeddings().weight.shape[0]
    if isinstance(mid, int) and 0 <= mid < rows:
        return mid
    if isinstance(mid, int) and mid >= 0:
        # e.g. a config without the key gets the published model's default id (LLaDA: 126336),
        # which a smaller vocabulary does not have
        log(f"[dllm] warning: the model config's mask_token_id {mid} is outside its {rows} embeddings; ignoring it")
    if tokenizer.mask_token_id is not None:
        if tokenizer.mask_token_id >= rows:
            resize_embeddings(model, len(tokenizer))
        model.config.mask_token_id = tokenizer.mask_token_id
        return tokenizer.mask_token_id
    try:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN_ADDED})
        new_id = tokenizer.mask_token_id
        if new_id is None:
            raise ValueError("the tokenizer did not accept a new special token")
        if new_id >= model.get_input_embeddings().weight.shape[0]:
            resize_embeddings(model, len(tokenizer))
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot be extended"
        raise ModelError(
            f"the tokenizer has no mask token and cannot be extended with one ({type(e).__name__}: {e}); "
            "use a tokenizer with a mask token or a model config with mask_token_id"
        ) from None
    model.config.mask_token_id = new_id
    log(f"[dllm] the model and tokenizer had no mask token: added '{MASK_TOKEN_ADDED}' as id {new_id} and resized the embeddings")
    return new_id


def resize_embeddings(model, rows: int) -> None:
    """Grow the input/output embeddings to ``rows``; new rows = the mean of the old ones.

    Deterministic on purpose (transformers' mean resizing samples them at random): fusing a LoRA
    adaptor reloads the base and resizes it again, and must get the same rows as training had.
    """
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            w = emb.weight
            if w.shape[0] > old:
                w[old:] = w[:old].float().mean(0).to(w.dtype)
            bias = getattr(emb, "bias", None)
            if bias is not None and bias.shape[0] > old:
                bias[old:] = bias[:old].float().mean().to(bias.dtype)


def apply_lora(model, cfg: TrainConfig, family: FamilyStrategy, *, new_head_modules=(), log=print,
               mask_token_id: int | None = None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora_cfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_list,
        bias="none",
        modules_to_save=list(new_head_modules) or None,
        # a2d: the mask token is new to a causal LM, so its embedding row is trained (peft merges it back)
        trainable_token_indices=[mask_token_id] if family.trains_mask_embedding and mask_token_id is not None else None,
    )
    embeddings = model.get_input_embeddings().weight
    try:
        model = get_peft_model(model, lora_cfg)
    except ValueError as e:
        raise ConfigError(f"lora_target_modules '{cfg.lora_target_modules}' does not fit this model: {str(e).splitlines()[0]}") from None
    retie_saved_head(model, embeddings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"[dllm] LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {cfg.lora_target_modules}: {trainable:,} of {total:,} parameters trainable")
    return model


def retie_saved_head(model, embeddings) -> int:
    """Keep a new output head's decoder tied to the (frozen) input embeddings under LoRA.

    peft trains a new head (modules_to_save) as a deep copy, and the copy's decoder weight is a
    separate, trainable tensor although the base ties it to the word embeddings (BERT, ModernBERT):
    the fused model would then carry an extra vocab x hidden matrix (all-MiniLM-L6-v2: 138 MB instead
    of 91 MB) and could not be tied again. Sharing the embedding tensor in the copy keeps the
    published layout (decoder = embeddings, trained: transform, norm, bias). Returns the number of
    tensors re-tied."""
    from peft.utils import ModulesToSaveWrapper

    tied = 0
    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        names = [n for n, p in wrapper.original_module.named_parameters() if p is embeddings]
        for copy in wrapper.modules_to_save.values():
            for name in names:
                owner_path, _, leaf = name.rpartition(".")
                owner = copy.get_submodule(owner_path) if owner_path else copy
                setattr(owner, leaf, embeddings)
                tied += 1
    return tied
