"""The job's final model: fuse a LoRA adaptor into its base, make every saved folder loadable
anywhere, write the model card and metadata.

Fusing happens in the launching process after the workers exit: the base model is reloaded in
full precision on the CPU (also after 4-bit training, so the fused weights carry no quantisation
error), the adaptor applied and merged with peft's `merge_and_unload`, and the result saved in
the family's published on-disk format (a2d: the base causal LM's own format plus a config marker).

Outputs that load anywhere (`make_portable`, run on the fused model, the full fine-tune's final
model and every checkpoint): a folder loads without dllm_trainer, with transformers 4.57 and 5.x,
through `AutoTokenizer.from_pretrained(dir)` and `AutoModel.from_pretrained(dir,
trust_remote_code=True)`:

- remote code: when the base ships the modeling files its `auto_map` names (every published
  LLaDA/Dream checkpoint does), all its `*.py` files are copied and `auto_map` kept. Otherwise our
  own model file (models/llada.py, llada_moe.py or dream.py, written to serve as remote code) and
  the files it imports are copied and `auto_map` points at them (models.REMOTE_CODE). BERT and
  ModernBERT are native to transformers and need none.
- tokenizer: when our tokenizer is the base's (same vocabulary, special tokens and chat template),
  the base's own tokenizer files replace what transformers 5 wrote; otherwise (a mask or pad token
  was added) transformers 5's `tokenizer_class: TokenizersBackend`, unknown to transformers 4,
  becomes `PreTrainedTokenizerFast`, and `special_tokens_map.json` is written.
- `generation_config.json` is copied from the base when it has one.
The base is found as a local folder or in the local Hugging Face cache (nothing is downloaded).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile

from ..errors import ModelError
from .file_modes import apply_default_modes

METADATA_FILE = "dllm_training.json"

# Never written to metadata or model cards, whatever the config holds.
_SECRET_KEY_RE = re.compile(r"(token|key|secret|password)", re.I)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_CACHE_RE = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")

# Tokenizer files as transformers 4 and 5 write or read them (tokenization_*.py: remote tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def fuse_adaptor(base_model: str, adaptor_dir: str, out_dir: str, *, family_name: str, dtype=None,
                 trust_remote_code: bool = False, log=print, family=None) -> str:
    """``family``: the run's configured strategy (``families.get_family(name).configured(cfg)``);
    default: the plain strategy of ``family_name``."""
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .. import models  # noqa: F401  (registers LLaDA/Dream with the Auto classes)
    from ..families import get_family
    from .loading import quiet_load_report, resize_embeddings

    family = family or get_family(family_name)
    dtype = dtype or torch.float32
    try:
        with quiet_load_report():  # a missing masked-LM head was reported when training started
            base = getattr(transformers, family.auto_class).from_pretrained(
                base_model, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot reload base model '{base_model}' to fuse the adaptor: {str(e).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(adaptor_dir if _has_tokenizer(adaptor_dir) else base_model)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        resize_embeddings(base, len(tokenizer))  # a mask token was added during training: the same rows
    if tokenizer.mask_token_id is not None and getattr(base.config, "mask_token_id", None) is None:
        base.config.mask_token_id = tokenizer.mask_token_id
    base_tied = _embeddings_tied(base)
    model = PeftModel.from_pretrained(base, adaptor_dir)
    fused = model.merge_and_unload(progressbar=True)
    if base_tied:
        _retie_embeddings(fused)
    _untie_shared_parameters(fused)
    mask_id = getattr(fused.config, "mask_token_id", None)
    if mask_id is not None:
        family.adapt(fused, int(mask_id), log=log)  # a2d: bidirectional + the config marker
    save_model_atomic(fused, tokenizer, out_dir, base=base_model, trust_remote_code=trust_remote_code)
    log(f"[dllm] fused adaptor {adaptor_dir} into {base_model}: {out_dir}")
    return out_dir


def _embeddings_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _retie_embeddings(model) -> bool:
    """Tie the output head's decoder to the input embeddings again when their values are equal.

    A head trained under LoRA (modules_to_save) comes back from the adaptor as a separate copy even
    when its decoder stayed tied during training (loading.retie_saved_head); re-tying keeps the fused
    model the base's size and layout (tie_word_embeddings), with the same logits."""
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None:
        return False
    if out.weight is not inp.weight:
        if out.weight.shape != inp.weight.shape or not torch.equal(out.weight.to(inp.weight.dtype), inp.weight):
            return False
        out.weight = inp.weight
    model.config.tie_word_embeddings = True
    return True


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


def save_model_atomic(model, tokenizer, out_dir: str, *, base: str | None = None,
                      trust_remote_code: bool = False) -> None:
    """Write into a temporary sibling folder, then rename: a crash never leaves half a model."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_portable(tmp, base, trust_remote_code=trust_remote_code)
        apply_default_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 would make the model private
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot write the model to '{out_dir}': {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# Outputs that load anywhere
# ---------------------------------------------------------------------------------------------
def base_model_dir(base: str | None) -> str | None:
    """The base model's files on this machine: its folder, or its snapshot in the local Hugging
    Face cache (never downloaded here); None when neither exists."""
    if not base:
        return None
    path = os.path.expanduser(base)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if not _HUB_ID_RE.match(base):
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(base, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache (or no hub library): nothing to copy from
        return None


def make_portable(folder: str, base: str | None, *, trust_remote_code: bool = False) -> None:
    """Make a saved model / checkpoint / adaptor folder load without dllm_trainer, with
    transformers 4.x and 5.x (see the module docstring). ``base``: the base model's path or Hub id."""
    base_dir = base_model_dir(base)
    if os.path.isfile(os.path.join(folder, "config.json")):
        _remote_code(folder, base_dir)
        gen = os.path.join(base_dir or "", "generation_config.json")
        if base_dir and os.path.isfile(gen):  # the base's, as it is (training does not change it)
            shutil.copy2(gen, folder)
    if _has_tokenizer(folder):
        _portable_tokenizer(folder, base_dir, trust_remote_code)


def _auto_map_modules(auto_map: dict) -> set[str]:
    """Module names an auto_map refers to ("repo--module.Class" and [slow, fast] pairs included)."""
    refs = []
    for value in auto_map.values():
        refs += value if isinstance(value, (list, tuple)) else [value]
    return {ref.split("--")[-1].rsplit(".", 1)[0] for ref in refs if isinstance(ref, str) and "." in ref}


def _remote_code(folder: str, base_dir: str | None) -> None:
    from .. import models

    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    modules = _auto_map_modules(config.get("auto_map") or {})
    if base_dir and modules and all(os.path.isfile(os.path.join(base_dir, m + ".py")) for m in modules):
        for src in glob.glob(os.path.join(base_dir, "*.py")):  # the published code, and what it imports
            shutil.copy2(src, folder)
        return
    architecture = (config.get("architectures") or [None])[0]
    if architecture not in models.REMOTE_CODE:  # BERT / ModernBERT: native to transformers
        return
    auto_map, files = models.REMOTE_CODE[architecture]
    models_dir = os.path.dirname(os.path.abspath(models.__file__))
    for name in (*files, *models.REMOTE_CODE_SHARED_FILES):
        shutil.copy2(os.path.join(models_dir, name), folder)
    config["auto_map"] = dict(auto_map)
    _write_json(path, config, sort_keys=True)


def _write_json(path: str, data, *, sort_keys: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


_FINGERPRINTS: dict[tuple, str | None] = {}


def _tokenizer_fingerprint(path: str, trust_remote_code: bool) -> str | None:
    """What a tokenizer does (vocabulary, added and special tokens, chat template), or None when
    it cannot be loaded. Cached per folder state (checkpoints compare against the same base)."""
    stamp = tuple((f, os.path.getmtime(os.path.join(path, f)), os.path.getsize(os.path.join(path, f)))
                  for f in sorted(os.listdir(path)) if f in TOKENIZER_FILES)
    key = (os.path.abspath(path), stamp, trust_remote_code)
    if key not in _FINGERPRINTS:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            what = {
                "vocab": sorted(tok.get_vocab().items()),
                "added": sorted((i, str(t)) for i, t in tok.added_tokens_decoder.items()),
                "special": {k: str(getattr(tok, k, None)) for k in _SPECIAL_TOKEN_KEYS},
                "chat_template": tok.chat_template,
            }
            _FINGERPRINTS[key] = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
        except Exception:  # noqa: BLE001 - an unloadable base tokenizer: ours is written standalone
            _FINGERPRINTS[key] = None
    return _FINGERPRINTS[key]


def _portable_tokenizer(folder: str, base_dir: str | None, trust_remote_code: bool) -> None:
    if base_dir and _has_tokenizer(base_dir):
        ours = _tokenizer_fingerprint(folder, trust_remote_code)
        if ours is not None and ours == _tokenizer_fingerprint(base_dir, trust_remote_code):
            # Unchanged: the base's own files, which every transformers version it supports reads.
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
            for name in os.listdir(base_dir):
                if name in TOKENIZER_FILES or (name.startswith("tokenization_") and name.endswith(".py")):
                    shutil.copy2(os.path.join(base_dir, name), folder)
    _readable_by_transformers_4(folder)


def _readable_by_transformers_4(folder: str) -> None:
    """A tokenizer_config.json written by transformers 5 names the class `TokenizersBackend`, which
    transformers 4 does not know: name the fast tokenizer class both read, and add what 4.x reads."""
    path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(path)
    if config.get("tokenizer_class") != "TokenizersBackend":
        return
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # transformers 4's fast tokenizers would otherwise also return token_type_ids.
    config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    if isinstance(config.get("extra_special_tokens"), list):  # 5.x's list is 4.x's additional_special_tokens
        extra = config.pop("extra_special_tokens")
        config["additional_special_tokens"] = list(dict.fromkeys([*config.get("additional_special_tokens", []), *extra]))
    _write_json(path, config)
    special = os.path.join(folder, "special_tokens_map.json")
    if not os.path.exists(special):
        keys = (*_SPECIAL_TOKEN_KEYS, "additional_special_tokens")
        _write_json(special, {k: config[k] for k in keys if config.get(k)})


def hub_id(name: str, resolved: str | None = None) -> str | None:
    """The Hugging Face Hub id of a base model given as ``name`` (and found at ``resolved``), or
    None when it has none we can tell. A local folder tells it by a Transformer Lab index.json
    (``json_data.huggingface_repo``), a Hugging Face cache path, or ``_name_or_path`` in config.json."""
    name = (name or "").strip()
    folder = next((p for p in (resolved, name) if p and os.path.isdir(os.path.expanduser(p))), None)
    if folder is None:
        return name if _HUB_ID_RE.match(name) and not name.startswith("TransformerLab/") else None
    folder = os.path.realpath(os.path.expanduser(folder))
    index = _read_json(os.path.join(folder, "index.json"))
    data = index.get("json_data") if isinstance(index.get("json_data"), dict) else {}
    repo = str(data.get("huggingface_repo") or "").strip()
    if _HUB_ID_RE.match(repo):
        return repo
    m = _HF_CACHE_RE.search(folder)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    recorded = str(_read_json(os.path.join(folder, "config.json")).get("_name_or_path") or "").strip()
    if _HUB_ID_RE.match(recorded) and not os.path.exists(recorded):
        return recorded
    return None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def base_license(base_dir: str | None) -> str | None:
    """``license`` from the front matter of the base's README.md (its model card), if any."""
    try:
        with open(os.path.join(base_dir or "", "README.md"), encoding="utf-8") as fh:
            text = fh.read(20000)
    except (OSError, UnicodeDecodeError):
        return None
    m = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    lic = re.search(r"^license:\s*['\"]?([A-Za-z0-9._-]+)['\"]?\s*$", m.group(1), re.M) if m else None
    return lic.group(1) if lic else None


# ---------------------------------------------------------------------------------------------
# Metadata and model card
# ---------------------------------------------------------------------------------------------
# Settings every method uses; a family's own ones (FamilyStrategy.own_settings) are added for it only.
COMMON_SETTINGS = ("dataset", "training_method", "loss_weight_type", "mask_prompt_loss", "noise_eps", "lora",
                   "lora_r", "lora_alpha", "lora_target_modules", "steps", "max_length", "learning_rate", "seed")


def _public_name(name: str | None) -> str | None:
    """A Hub id or workspace name as given; a local path reduced to its folder/file name."""
    if not name:
        return name
    path = os.path.expanduser(name.strip())
    return os.path.basename(path.rstrip("/")) if os.path.isabs(path) or os.path.exists(path) else name.strip()


def training_metadata(cfg, metrics: dict, *, base_model: str, adaptor_dir: str | None,
                      base_hub_id: str | None = None, license_id: str | None = None) -> dict:
    """What a user needs to know later about how this model was made (no secrets, no local paths
    of the base model or dataset). Only the settings that applied to the method."""
    from ..families import get_family

    family = get_family(cfg.training_method)
    meta = {
        "base_model": _public_name(base_model),
        "base_model_hub_id": base_hub_id,
        "license": license_id,
        "pipeline_tag": family.pipeline_tag,
        "dataset": _public_name(cfg.dataset_name),
        "training_method": cfg.training_method,
        "loss_weight_type": cfg.loss_weight_type,
        "loss_weight_resolved": "cart[geo_p:%g]" % cfg.loss_weight[1] if cfg.loss_weight[0] == "cart" else cfg.loss_weight[0],
        "mask_prompt_loss": cfg.mask_prompt_loss,
        "noise_eps": cfg.noise_eps,
        **{k: getattr(cfg, k) for k in family.own_settings},
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
    from ..families import get_family

    family = get_family(meta["training_method"])
    hub = meta.get("base_model_hub_id")
    remote_code = bool(_read_json(os.path.join(out_dir, "config.json")).get("auto_map"))  # make_portable's
    front = ["---", "library_name: transformers", f"pipeline_tag: {meta.get('pipeline_tag') or family.pipeline_tag}"]
    if meta.get("license"):
        front.append(f"license: {meta['license']}")
    if hub:
        front.append(f"base_model: {hub}")
    front += ["tags: [diffusion-lm, masked-diffusion, dllm_trainer]", "---"]
    base = f"[`{hub}`](https://huggingface.co/{hub})" if hub else f"`{meta['base_model']}`"
    lines = front + [
        f"# {name}",
        "",
        f"A masked diffusion language model fine-tuned from {base} with the Diffusion LLM Trainer "
        f"(`{meta['training_method']}` method, loss weighting `{meta['loss_weight_resolved']}`).",
        "",
        "## Loading",
        "",
        *_loading_text(family, name, remote_code=remote_code),
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for key in (*COMMON_SETTINGS, *family.own_settings):
        if key.startswith("lora_") and not meta.get("lora"):
            continue
        lines.append(f"| {key} | {meta.get(key)} |")
    if meta.get("final_metrics"):
        lines += ["", "## Final metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in meta["final_metrics"].items()]
    lines.append("")
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    with open(os.path.join(out_dir, METADATA_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)


def _loading_text(family, name: str, *, remote_code: bool) -> list[str]:
    repo = f"<this folder or your-user/{name}>"
    sample = f'`dllm-trainer generate --model "{repo}" --prompt "..."`'
    if family.auto_class == "AutoModelForCausalLM" and not remote_code:  # a2d: the base's own class
        return [
            "The base causal LM's own format and class, with `\"is_causal\": false` in `config.json`:",
            "transformers 5 builds it with bidirectional attention (transformers 4 may not honour that key).",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto")',
            "```",
            "",
            f"It is a masked diffusion model: sample by iterative unmasking with the Diffusion LLM Trainer, {sample}.",
        ]
    if not remote_code:  # native to transformers (masked-LM encoders)
        return [
            "```python",
            f"from transformers import {family.auto_class}, AutoTokenizer",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            f'model = {family.auto_class}.from_pretrained("{repo}")',
            "```",
            "",
            f"Sample with the Diffusion LLM Trainer: {sample}.",
        ]
    return [
        "Without the Diffusion LLM Trainer (transformers 4.57 or 5.x; the modeling code is in this folder):",
        "",
        "```python",
        f"from transformers import {family.auto_class}, AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)',
        f'model = {family.auto_class}.from_pretrained("{repo}", trust_remote_code=True, dtype="auto")',
        'logits = model(**tokenizer("Hello", return_tensors="pt")).logits',
        "```",
        "",
        "It is a masked diffusion model, not an autoregressive one: sample by iterative unmasking, e.g. "
        "with the Diffusion LLM Trainer (`pip install` it, then no remote code runs):",
        "",
        "```python",
        "import dllm_trainer  # registers LLaDA, LLaDA-MoE and Dream with transformers",
        "from transformers import AutoModel",
        f'model = AutoModel.from_pretrained("{repo}")',
        "```",
        "",
        f"or {sample}.",
    ]
