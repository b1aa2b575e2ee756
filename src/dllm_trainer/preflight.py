"""Checks run in the launching process BEFORE any worker starts (called by app.run_job).

Everything that can be known about a job without training is checked here, so a bad job fails in
about a second with one clear message instead of after the workers have started (and, with several
workers, instead of once per worker):

- output_dir (and adaptor_output_dir) can be created and written;
- resume_from_checkpoint, when a path, is a complete checkpoint that fits this run (checkpoints.py);
- a LOCAL model: the folder exists and is a Hugging Face model (config.json), its architecture fits
  training_method, max_length fits its positions, its weights exist and every safetensors file is
  intact, its tokenizer loads and has a mask token or can be given one;
- the dataset, FIRST (local, or a Hub id through the Hugging Face cache / network, with HF_TOKEN as
  the workers use it): it exists and loads, is not empty, its rows have one known format (the file
  and line of a row that differs), the Data Template fits its columns, and, with a local model, for
  datasets of up to PREFLIGHT_MAX_ROWS rows, at least one row survives tokenisation and truncation
  (the same build_datasets the workers run).

A Hub model id is left to the workers (its weights may need the network and a token). Each failure
raises ConfigError / ModelError / DataError.
"""
from __future__ import annotations

import copy
import glob
import os
import tempfile

from .config import TrainConfig
from .errors import ConfigError, DataError, ModelError

PREFLIGHT_MAX_ROWS = 5000  # datasets up to this size are tokenised here once (cache shared with the workers)
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "model.safetensors.index.json")


def run_preflight(cfg: TrainConfig, *, log=print):
    """Runs every check; returns the local model's config (None for a Hub model)."""
    check_output_dir(cfg.output_dir, "output_dir")
    if cfg.adaptor_output_dir.strip():
        check_output_dir(os.path.dirname(os.path.abspath(cfg.adaptor_output_dir)) or ".", "adaptor_output_dir")
    check_resume(cfg, log=log)
    if cfg.trust_remote_code:
        log("[dllm] warning: trust_remote_code is on: Python code shipped with the model "
            f"'{cfg.model_name}' will run. Turn it off unless you trust that code")
    plan = check_dataset_source(cfg)  # the dataset first: it is found and checked before any model
    tokenizer, model_config = check_model(cfg) if _is_local(cfg.model_name) else (None, None)
    if tokenizer is not None:
        check_dataset(cfg, tokenizer, plan, model_config)
    return model_config


def _is_local(name: str) -> bool:
    """A path that exists, or one that can only be meant as a path (absolute, ./, ~, ../, or 3+ parts)."""
    name = (name or "").strip()
    if not name:
        return False
    if os.path.exists(os.path.expanduser(name)):
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_output_dir(path: str, field: str) -> None:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dllm-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{field} '{path}' is not a writable folder ({e.strerror or e}); choose a folder this "
                          "user can create and write") from None


def check_resume(cfg: TrainConfig, log=print) -> None:
    """A checkpoint path must be complete and fit this run (same model, method, LoRA settings);
    settings a resume accepts but that change the run (length, schedule, batch) are stated."""
    spec = cfg.resume_from_checkpoint.strip()
    if spec and spec != "latest":
        from .training.checkpoints import check_checkpoint_fits, resolve_resume

        resolve_resume(spec, cfg.output_dir)
        check_checkpoint_fits(spec, cfg, log=log)


def check_model(cfg: TrainConfig):
    """Local model checks; returns the loaded tokenizer and the model's config."""
    from .training.loading import MASK_TOKEN_ADDED, check_family, load_model_config

    path = os.path.expanduser(cfg.model_name.strip())
    if not os.path.exists(path):
        raise ModelError(f"model '{cfg.model_name}' does not exist (give a local model folder or a Hugging Face Hub id)")
    if not os.path.isdir(path):
        raise ModelError(f"model '{cfg.model_name}' is a file; give the model's folder (with config.json and the weights)")
    if not os.listdir(path):
        raise ModelError(f"model folder '{cfg.model_name}' is empty (expected config.json, the weights and a tokenizer)")
    config = load_model_config(path, trust_remote_code=cfg.trust_remote_code)
    check_family(config, cfg)

    weights = sorted({f for pat in _WEIGHT_PATTERNS for f in glob.glob(os.path.join(glob.escape(path), pat))})
    if not weights:
        raise ModelError(f"model folder '{cfg.model_name}' has no weights (model.safetensors or pytorch_model.bin)")
    from .training.checkpoints import safetensors_problem, torch_file_problem

    for w in weights:
        problem = (safetensors_problem(w) if w.endswith(".safetensors")
                   else torch_file_problem(w) if w.endswith((".bin", ".pt")) else None)
        if problem:
            raise ModelError(f"model '{cfg.model_name}': the weights file {problem}; re-download or re-save the model")

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a model problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load a tokenizer for model '{cfg.model_name}': {first}") from None

    mid = getattr(config, "mask_token_id", None)
    vocab = getattr(config, "embedding_size", None) or getattr(config, "vocab_size", None)
    if isinstance(mid, int) and mid >= 0 and isinstance(vocab, int) and mid >= vocab:
        raise ModelError(f"model '{cfg.model_name}': mask_token_id {mid} (from its config.json) is outside its "
                         f"vocabulary of {vocab} tokens; set mask_token_id in config.json to the tokenizer's mask token id")
    if not (isinstance(mid, int) and mid >= 0) and tokenizer.mask_token_id is None:
        try:
            probe = copy.deepcopy(tokenizer)
            probe.add_special_tokens({"mask_token": MASK_TOKEN_ADDED})
            if probe.mask_token_id is None:
                raise ValueError("the tokenizer did not accept a new special token")
        except Exception as e:  # noqa: BLE001 - any failure means "cannot be extended"
            raise ModelError(
                f"the tokenizer of model '{cfg.model_name}' has no mask token and cannot be extended with one "
                f"({type(e).__name__}: {e}); use a tokenizer with a mask token or a model config with mask_token_id"
            ) from None
    return tokenizer, config


def check_dataset_source(cfg: TrainConfig):
    """Find and load the dataset (local, or a Hub id through the Hugging Face cache/network, as the
    workers will), check its row format and the Data Template; returns the data.DataPlan."""
    from .data import plan_datasets

    source = os.path.expanduser(cfg.dataset_name.strip())
    try:
        return plan_datasets(
            source, input_template=cfg.input_template or None, output_template=cfg.output_template or None,
            instruction_template=cfg.instruction_template or None, seed=cfg.seed,
            split=cfg.dataset_split or None, evaluation=cfg.eval_strategy != "no", token=os.environ.get("HF_TOKEN"),
        )
    except DataError as e:
        text = str(e)
        raise DataError(text if cfg.dataset_name.strip() in text else f"dataset '{cfg.dataset_name}': {text}") from None


def check_dataset(cfg: TrainConfig, tokenizer, plan, model_config=None) -> None:
    """Small datasets: at least one row survives tokenisation and truncation (as the workers run it)."""
    from .data import build_datasets
    from .training.loading import resolve_max_length

    rows = plan.train.num_rows + (plan.eval.num_rows if plan.eval is not None else 0)
    if rows > PREFLIGHT_MAX_ROWS:
        return
    try:
        build_datasets(
            plan.source, tokenizer, max_length=resolve_max_length(cfg, model_config), truncation=cfg.truncation,
            mask_prompt_loss=cfg.mask_prompt_loss, input_template=cfg.input_template or None,
            output_template=cfg.output_template or None, instruction_template=cfg.instruction_template or None,
            system_prompt=cfg.system_prompt or None, num_proc=1, plan=plan, log=None,
        )
    except (ConfigError, DataError):
        raise
    except Exception as e:  # noqa: BLE001 - the workers would fail on it the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"dataset '{cfg.dataset_name}' cannot be prepared: {first}") from None
