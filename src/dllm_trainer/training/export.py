"""The job's final model: fuse a LoRA adaptor into its base, write the model card and metadata.

Fusing happens in the launching process after the workers exit: the base model is reloaded in
full precision on the CPU (also after 4-bit training, so the fused weights carry no quantisation
error), the adaptor applied and merged with peft's `merge_and_unload`, and the result saved in
the family's published on-disk format (a2d: the base causal LM's own format plus a config marker).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from ..errors import ModelError

METADATA_FILE = "dllm_training.json"

# Never written to metadata or model cards, whatever the config holds.
_SECRET_KEY_RE = re.compile(r"(token|key|secret|password)", re.I)


def fuse_adaptor(base_model: str, adaptor_dir: str, out_dir: str, *, family_name: str, dtype=None,
                 trust_remote_code: bool = False, log=print, family=None) -> str:
    """``family``: the run's configured strategy (``families.get_family(name).configured(cfg)``);
    default: the plain strategy of ``family_name``."""
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ..families import get_family
    from .loading import resize_embeddings

    family = family or get_family(family_name)
    dtype = dtype or torch.float32
    try:
        base = getattr(transformers, family.auto_class).from_pretrained(
            base_model, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot reload base model '{base_model}' to fuse the adaptor: {str(e).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(adaptor_dir if _has_tokenizer(adaptor_dir) else base_model)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        resize_embeddings(base, len(tokenizer))  # a mask token was added during training: the same rows
    if tokenizer.mask_token_id is not None and getattr(base.config, "mask_token_id", None) is None:
        base.config.mask_token_id = tokenizer.mask_token_id
    model = PeftModel.from_pretrained(base, adaptor_dir)
    fused = model.merge_and_unload()
    _untie_shared_parameters(fused)
    mask_id = getattr(fused.config, "mask_token_id", None)
    if mask_id is not None:
        family.adapt(fused, int(mask_id), log=log)  # a2d: bidirectional + the config marker
    save_model_atomic(fused, tokenizer, out_dir)
    log(f"[dllm] fused adaptor {adaptor_dir} into {base_model}: {out_dir}")
    return out_dir


def _untie_shared_parameters(model) -> None:
    """Give parameters that still share storage their own copy when the config says untied.

    peft's merge sets ``tie_word_embeddings=False`` when a trained head (modules_to_save) no longer
    matches the input embeddings. Other ties can remain in memory (BERT: ``cls.predictions.decoder.bias``
    is ``cls.predictions.bias``); ``save_pretrained`` writes such a shared tensor once, and a reload
    with ``tie_word_embeddings=False`` does not re-tie it, so the trained bias would come back as zeros.
    """
    import torch

    if getattr(model.config, "tie_word_embeddings", True):
        return
    seen: set[int] = set()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in seen:
                setattr(module, name, torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            else:
                seen.add(id(param))


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def save_model_atomic(model, tokenizer, out_dir: str) -> None:
    """Write into a temporary sibling folder, then rename: a crash never leaves half a model."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot write the model to '{out_dir}': {e.strerror or e}") from None


def training_metadata(cfg, metrics: dict, *, base_model: str, adaptor_dir: str | None) -> dict:
    """What a user needs to know later about how this model was made (no secrets)."""
    meta = {
        "base_model": base_model,
        "dataset": cfg.dataset_name,
        "training_method": cfg.training_method,
        "loss_weight_type": cfg.loss_weight_type,
        "loss_weight_resolved": "cart[geo_p:%g]" % cfg.loss_weight[1] if cfg.loss_weight[0] == "cart" else cfg.loss_weight[0],
        "mask_prompt_loss": cfg.mask_prompt_loss,
        "perbatch_cutoff": cfg.perbatch_cutoff,
        "resp_cutoff_ratio": cfg.resp_cutoff_ratio,
        "noise_eps": cfg.noise_eps,
        "lora": cfg.lora,
        "lora_r": cfg.lora_r if cfg.lora else None,
        "lora_alpha": cfg.lora_alpha if cfg.lora else None,
        "lora_dropout": cfg.lora_dropout if cfg.lora else None,
        "lora_target_modules": cfg.lora_target_modules if cfg.lora else None,
        "adaptor": adaptor_dir,
        "steps": metrics.get("global_step"),
        "max_length": cfg.max_length,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "final_metrics": {k: v for k, v in metrics.items() if not _SECRET_KEY_RE.search(k)},
        "trainer": "dllm_trainer",
    }
    return meta


def write_model_card(out_dir: str, meta: dict, *, name: str) -> None:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [diffusion-lm, masked-diffusion, dllm_trainer]",
        f"base_model: {meta['base_model']}",
        "---",
        f"# {name}",
        "",
        f"A masked diffusion language model fine-tuned from `{meta['base_model']}` with the Diffusion LLM Trainer "
        f"(`{meta['training_method']}` method, loss weighting `{meta['loss_weight_resolved']}`).",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for key in ("dataset", "training_method", "loss_weight_type", "mask_prompt_loss", "perbatch_cutoff",
                "resp_cutoff_ratio", "lora", "lora_r", "lora_alpha", "lora_target_modules", "steps", "max_length",
                "learning_rate", "seed"):
        lines.append(f"| {key} | {meta.get(key)} |")
    if meta.get("final_metrics"):
        lines += ["", "## Final metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in meta["final_metrics"].items()]
    lines += ["", "Sample with `dllm-trainer generate --model <this folder> --prompt \"...\"`.", ""]
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    with open(os.path.join(out_dir, METADATA_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
