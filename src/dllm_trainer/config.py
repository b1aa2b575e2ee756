"""The job configuration: typed, validated in one place, then passed around as a plain object.

`TrainConfig.from_dict` takes the flat key/value dict that Transformer Lab sends (form values,
mostly as strings: "true", "0.25", "8") or that a standalone user writes in a JSON file, and
returns a frozen dataclass or raises `ConfigError` with one message naming the field and what is
allowed.

Each form field's title, help text and JSON-schema constraints live next to its type below; the
plugin manifest (index.json) and the task's form (task.yaml `parameters`) are generated from them
(`dllm-trainer manifest --manifest index.json --task-yaml task.yaml`), and tests check that the
committed files and this module agree.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Keys the Transformer Lab app puts into a job's config beside the form values. They are accepted
# (and mostly ignored) so that a job config is never rejected for carrying them.
APP_KEYS = frozenset(
    {
        "job_id", "template_name", "model_architecture", "type", "experiment_name", "template_id",
        "embedding_model", "embedding_model_architecture", "formatting_template",
        "formatting_chat_template", "chat_column", "sweep_config", "run_sweeps", "sweep_metric",
        "lower_is_better", "_config", "input_file", "dataset", "model", "plugin_name",
        "model_path", "model_filename", "description", "name",
        # the Train modal's hidden fields and Data Template switches (transformerlab-app v0.30.x)
        "foundation_model_file_path", "embedding_model_file_path", "chatml_formatted_column",
        "apply_chat_template", "formatting_chat_template",
    }
)

# max_length 0 (the default): the model's own limit (max_position_embeddings), at most this.
MAX_LENGTH_AUTO_CAP = 1024

_CART_RE = re.compile(r"^cart\[geo_p:([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\]$")
_ADAPTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_GPU_IDS_RE = re.compile(r"^(auto|\d+(\s*,\s*\d+)*)$")


def _f(default, title: str, help: str, *, form: bool | str = True, **schema):
    """A config field with its manifest metadata (JSON-schema keywords go in **schema).
    form: True (both app forms), "task" (task.yaml only), False (neither)."""
    meta = {"title": title, "help": help, "form": form, "schema": schema}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    # ---- provided by the app (or the standalone config file), not form fields --------------
    model_name: str = _f("", "Model", "Local path, workspace model name, or Hugging Face Hub id.", form=False)
    dataset_name: str = _f("", "Dataset", "Local path/file, workspace dataset name, or Hub id.", form=False)
    output_dir: str = _f("./output", "Output directory", "Where checkpoints, TensorBoard events, metrics.json and the final model go.", form=False)
    adaptor_output_dir: str = _f("", "Adaptor output directory", "Where the LoRA adaptor is saved (default: <output_dir>/adaptors/<adaptor_name>).", form=False)
    dataset_split: str = _f("", "Dataset split", "Split to train on (default: train).", form=False)

    # ---- method and hardware -----------------------------------------------------------------
    training_method: str = _f("bert", "Training method", "bert: a masked-LM encoder (BERT, RoBERTa, XLM-R, DistilBERT, DeBERTa-v2, ELECTRA, ModernBERT; a missing MLM head is added) with MDLM. llada: LLaDA and LLaDA-MoE SFT (EOS-padded responses, 1/t weighting). dream: Dream SFT as dllm's (logits shifted by one, trained EOS padding, response cutoffs, CART weighting). a2d: turn a causal LM (Qwen2/3, Llama, Mistral, Gemma, GPT-NeoX, ...) into a diffusion LM: bidirectional attention, a mask token, Dream-style logits shift, EOS-padded responses, 1/t weighting.", enum=["bert", "llada", "dream", "a2d"])
    train_device: str = _f("cuda", "Training device", "cuda: GPUs (gpu_ids picks which); cpu: CPU workers (num_processes); tpu: accelerate's TPU mode.", enum=["cuda", "cpu", "tpu"])
    gpu_ids: str = _f("auto", "GPU IDs", "'auto' uses every visible GPU; or a comma list such as 0,2.", pattern=r"^(auto|\d+(\s*,\s*\d+)*)$")
    num_processes: int = _f(1, "CPU processes", "Number of worker processes when train_device is cpu (gloo backend).", minimum=1, maximum=256)
    num_machines: int = _f(1, "Machines", "Multi-node: number of machines in the job.", minimum=1, maximum=1024)
    machine_rank: int = _f(0, "Machine rank", "Multi-node: rank of this machine (0 is the main one).", minimum=0, maximum=1023)
    main_process_ip: str = _f("", "Main process IP", "Multi-node: address of the rank-0 machine.")
    main_process_port: int = _f(29500, "Main process port", "Multi-node / multi-process rendezvous port.", minimum=1, maximum=65535)
    accelerate_config_file: str = _f("", "Accelerate config file", "Optional accelerate config (FSDP, DeepSpeed ZeRO); its settings are passed to accelerate launch. Examples: configs/accelerate/{ddp,fsdp,zero2,zero3}.yaml.")
    memory_check: str = _f("refuse", "Memory check", "Before launch on GPUs, estimate the peak memory per GPU and print it. refuse: stop a run that cannot fit (naming settings that would); warn: only warn; off: skip the estimate.", enum=["refuse", "warn", "off"])

    # ---- batch and sequence ------------------------------------------------------------------
    batch_size: int = _f(4, "Batch size", "Per-device micro-batch size.", minimum=1, maximum=4096)
    gradient_accumulation_steps: int = _f(1, "Gradient accumulation steps", "Micro-batches per optimizer step; the loss is normalised over all of them.", minimum=1, maximum=4096)
    max_length: int = _f(0, "Max sequence length", "Rows are truncated (or filtered) to this many tokens. 0: the model's own limit (its maximum positions), at most 1024. A value above the model's positions is an error.", minimum=0, maximum=1048576)
    truncation: str = _f("right", "Truncation", "right: cut the end of long rows; filter: drop rows longer than max_length.", enum=["right", "filter"])
    pack_sequences: bool = _f(False, "Pack sequences", "Padding-free packing: several rows per sequence with block-diagonal attention (llada/dream).")
    group_by_length: bool = _f(True, "Group by length", "Batch rows of similar length together to reduce padding (when not packing).")

    # ---- model loading -------------------------------------------------------------------------
    dtype: str = _f("auto", "Precision", "auto: bfloat16 on GPUs that support it, else float32.", enum=["auto", "bfloat16", "float16", "float32"])
    load_in_4bit: bool = _f(False, "Load in 4-bit (QLoRA)", "Quantise the base model with bitsandbytes NF4 (CUDA only; requires LoRA).")
    trust_remote_code: bool = _f(False, "Trust remote code", "Run modeling code shipped with the checkpoint. Off by default: LLaDA, LLaDA-MoE and Dream are built in.")
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing", "Recompute activations in the backward pass to save memory.")
    torch_compile: bool = _f(False, "torch.compile", "Compile the model with torch.compile.")

    # ---- LoRA ------------------------------------------------------------------------------------
    lora: bool = _f(True, "Use LoRA", "Train a LoRA adaptor (fused into a full model at the end) instead of all weights.")
    lora_r: int = _f(32, "LoRA rank", "LoRA rank r (multiple of 4).", minimum=4, maximum=1024, multipleOf=4)
    lora_alpha: int = _f(64, "LoRA alpha", "LoRA scaling alpha (multiple of 4).", minimum=4, maximum=4096, multipleOf=4)
    lora_dropout: float = _f(0.05, "LoRA dropout", "Dropout on the LoRA path.", minimum=0.0, maximum=0.9)
    lora_target_modules: str = _f("all-linear", "LoRA target modules", "'all-linear', or a comma list of module names such as q_proj,k_proj,v_proj.")

    # ---- optimisation ----------------------------------------------------------------------------
    learning_rate: float = _f(5e-5, "Learning rate", "Peak learning rate (AdamW).", exclusiveMinimum=0.0, maximum=1.0)
    learning_rate_schedule: str = _f("cosine", "Learning rate schedule", "Schedule after warmup.", enum=["constant", "linear", "cosine", "constant_with_warmup"])
    warmup_ratio: float = _f(0.1, "Warmup ratio", "Fraction of optimizer steps spent warming up.", minimum=0.0, maximum=1.0)
    weight_decay: float = _f(0.0, "Weight decay", "AdamW weight decay.", minimum=0.0, maximum=1.0)
    max_grad_norm: float = _f(1.0, "Max gradient norm", "Gradient clipping norm (0 disables clipping).", minimum=0.0, maximum=10000.0)
    num_train_epochs: int = _f(1, "Epochs", "Passes over the data; 0 means train for train_steps optimizer steps instead (the log says which one sets the length).", minimum=0, maximum=10000)
    train_steps: int = _f(100, "Training steps", "Optimizer steps to train when Epochs is 0 (ignored otherwise).", minimum=1, maximum=100000000)
    seed: int = _f(42, "Seed", "Seed for initialisation, data order and the mask noise.", minimum=0, maximum=2147483647)

    # ---- logging, evaluation, checkpoints --------------------------------------------------------
    logging_steps: float = _f(10, "Logging steps", "Log every N optimizer steps; a value in (0, 1) is that fraction of all steps.", exclusiveMinimum=0.0, maximum=100000000)
    eval_strategy: str = _f("steps", "Evaluation strategy", "When to evaluate: every eval_steps, every epoch, or never.", enum=["steps", "epoch", "no"])
    eval_steps: float = _f(0.25, "Evaluation steps", "Evaluate every N optimizer steps; a value in (0, 1) is that fraction of all steps.", exclusiveMinimum=0.0, maximum=100000000)
    save_steps: float = _f(0.25, "Save steps", "Checkpoint every N optimizer steps; a value in (0, 1) is that fraction of all steps.", exclusiveMinimum=0.0, maximum=100000000)
    save_total_limit: int = _f(2, "Checkpoints kept", "Older checkpoints beyond this many are deleted.", minimum=1, maximum=1000)
    log_to_wandb: bool = _f(False, "Log to Weights & Biases", "Also log metrics to W&B (offline mode when there is no key or network).")
    resume_from_checkpoint: str = _f("", "Resume from checkpoint", "Empty: start fresh. 'latest': newest valid checkpoint of this run. Or a checkpoint path.")
    nonfinite_loss: str = _f("stop", "Non-finite loss", "stop: fail the run at the first NaN/inf loss; skip: skip such steps (at most 10 in a row).", enum=["stop", "skip"])

    # ---- diffusion objective -------------------------------------------------------------------
    mask_prompt_loss: bool = _f(True, "Mask prompt loss", "Keep prompt tokens visible and out of the loss (SFT). Off: the whole row is trained.")
    loss_weight_type: str = _f("auto", "Loss weighting", "auto: the method's default (scheduler for bert/llada/a2d, cart[geo_p:0.3] for dream). scheduler: 1/t. uniform: 1. cart[geo_p:P]: CART geometric-kernel weights with 0 < P <= 1.", pattern=r"^(auto|scheduler|uniform|cart\[geo_p:[0-9]*\.?[0-9]+\])$")
    loss_normalization: str = _f("trainable_tokens", "Loss normalisation", "trainable_tokens: divide by the number of trainable tokens over the whole optimizer step (all micro-batches and workers). masked_tokens: by the number of masked tokens.", enum=["trainable_tokens", "masked_tokens"])
    noise_eps: float = _f(1e-3, "Noise eps", "Mask ratio t = eps + (1 - eps) * U(0, 1).", minimum=0.0, maximum=0.5)
    min_mask_ratio: float = _f(0.0, "Min mask ratio", "t is rescaled into [min_mask_ratio, max_mask_ratio].", minimum=0.0, maximum=1.0)
    max_mask_ratio: float = _f(1.0, "Max mask ratio", "t is rescaled into [min_mask_ratio, max_mask_ratio].", minimum=0.0, maximum=1.0)
    dream_padding: str = _f("eos_trained", "Padding (dream)", "Dream: eos_trained (as dllm's Dream SFT): rows are padded with the pad token (Dream's <|endoftext|>, its EOS) and that padding is trained, so the model learns to end answers; padded positions are out of attention and count as clean context in CART. ignored: padding is out of attention, loss and CART context.", enum=["eos_trained", "ignored"])
    perbatch_cutoff: bool = _f(True, "Per-batch response cutoff (dream)", "Dream: pick one response length from the batch and trim longer responses to it before padding.")
    resp_cutoff_ratio: float = _f(0.0, "Response cutoff ratio (dream)", "Dream: probability of an extra random cut of the padded batch (used when perbatch_cutoff is off).", minimum=0.0, maximum=1.0)
    a2d_shift_logits: bool = _f(True, "Shift logits (a2d)", "a2d: predict token i from output i-1 (Dream-style), where the causal LM's head already predicts the next token, so its knowledge carries over. Off: token i from output i. Saved in the model's config for the samplers.")
    eval_elbo_samples: int = _f(0, "Eval ELBO samples", "Monte-Carlo samples per eval row for the likelihood bound (eval NLL and perplexity bound, as LLaDA evaluates); 0 turns it off.", minimum=0, maximum=4096)
    eval_elbo_rows: int = _f(32, "Eval ELBO rows", "Eval rows scored by the likelihood bound at each evaluation.", minimum=1, maximum=100000)
    ce_chunk_size: int = _f(4096, "Loss chunk size", "Masked tokens per chunk of the output head + cross-entropy (memory vs speed).", minimum=64, maximum=1048576)

    # ---- data -------------------------------------------------------------------------------
    num_proc: int = _f(1, "Data processes", "Processes for tokenising the dataset.", minimum=1, maximum=128)
    system_prompt: str = _f("", "System prompt", "Optional system message put before every prompt (rows that already start with one keep theirs).")
    # Transformer Lab v0.30's own Data Template tab (training_template_format "alpaca") sends these
    # three, so they are not in index.json's form; the current app's task form (task.yaml) has them.
    # Jinja over the dataset's columns; see data.py for how they apply.
    instruction_template: str = _f("", "Instruction template", "Data Template: Jinja rendered with the row; the system message (e.g. Summarize: {{instruction}}).", form="task")
    input_template: str = _f("", "Input template", "Data Template: Jinja rendered with the row; the user message (e.g. {{input}}).", form="task")
    output_template: str = _f("", "Output template", "Data Template: Jinja rendered with the row; the response trained on (e.g. {{output}}).", form="task")

    # ---- samples during training -----------------------------------------------------------------
    sample_prompts: str = _f("", "Sample prompts", "Prompts (one per line) generated from during training and logged to TensorBoard and the job log.")
    sample_every_steps: int = _f(0, "Sample every N steps", "Generate the sample prompts every N optimizer steps (0: only at the end).", minimum=0, maximum=100000000)
    sample_gen_length: int = _f(64, "Sample length", "Tokens generated per sample.", minimum=1, maximum=8192)
    sample_steps: int = _f(64, "Sample steps", "Diffusion steps per sample.", minimum=1, maximum=8192)

    # ---- outputs -------------------------------------------------------------------------------
    adaptor_name: str = _f("dllm-adaptor", "Adaptor name", "Name of the LoRA adaptor and of the fused model (letters, digits, '.', '_', '-'). When it is taken (e.g. the same template queued again), the run uses the next free name-2, name-3, ... and says so in the log.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, strict: bool = True) -> "TrainConfig":
        """Build and validate. strict: unknown keys (other than the app's) are an error."""
        if not isinstance(raw, dict):
            raise ConfigError(f"the job config must be a JSON object of key/value pairs, got {type(raw).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key in known:
                values[key] = _coerce(known[key], value)
            elif key in APP_KEYS or not strict:
                continue
            else:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key '{key}'{hint}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _check_schema(f, getattr(self, f.name))
        if not self.model_name.strip():
            raise ConfigError("model_name is required: a local model folder, a workspace model name or a Hub id")
        if not self.dataset_name.strip():
            raise ConfigError("dataset_name is required: a local dataset folder or file, a workspace dataset name or a Hub id")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty: give the folder for checkpoints, logs and the final model "
                              "(an empty value would mean the current folder)")
        if self.min_mask_ratio >= self.max_mask_ratio:
            raise ConfigError(
                f"min_mask_ratio ({self.min_mask_ratio}) must be smaller than max_mask_ratio ({self.max_mask_ratio})"
            )
        if self.load_in_4bit and not self.lora:
            raise ConfigError("load_in_4bit requires lora: true (a 4-bit base model can only be trained through a LoRA adaptor)")
        if self.train_device != "cuda" and self.load_in_4bit:
            raise ConfigError(f"load_in_4bit needs train_device 'cuda' (bitsandbytes 4-bit runs on CUDA GPUs), got '{self.train_device}'")
        for name in ("logging_steps", "eval_steps", "save_steps"):
            v = getattr(self, name)
            if v >= 1 and v != int(v):
                raise ConfigError(f"{name} must be a whole number of steps (>= 1) or a fraction in (0, 1), got {v}")
        if self.machine_rank >= self.num_machines:
            raise ConfigError(f"machine_rank must be below num_machines ({self.num_machines}), got {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip.strip():
            raise ConfigError("main_process_ip is required when num_machines > 1 (the address of the rank-0 machine)")
        self.loss_weight  # parses and validates loss_weight_type
        _ = self.lora_target_list
        for name in ("model_name", "dataset_name", "output_dir"):
            if "\x00" in getattr(self, name):
                raise ConfigError(f"{name} contains a NUL character")

    # ---- derived values -------------------------------------------------------------------------
    @property
    def loss_weight(self) -> tuple[str, float | None]:
        """("scheduler"|"uniform", None) or ("cart", p); "auto" resolved by the training method."""
        spec = self.loss_weight_type.strip()
        if spec == "auto":
            spec = {"dream": "cart[geo_p:0.3]"}.get(self.training_method, "scheduler")
        if spec in ("scheduler", "uniform"):
            return spec, None
        m = _CART_RE.match(spec)
        if m:
            p = float(m.group(1))
            if 0.0 < p <= 1.0:
                return "cart", p
            raise ConfigError(f"loss_weight_type: geo_p must be in (0, 1], got {m.group(1)}")
        raise ConfigError(
            f"loss_weight_type must be one of auto, scheduler, uniform or cart[geo_p:P] with 0 < P <= 1, got '{self.loss_weight_type}'"
        )

    @property
    def lora_target_list(self) -> str | list[str]:
        spec = self.lora_target_modules.strip()
        if spec in ("all-linear", "all_linear"):
            return "all-linear"
        names = [s.strip() for s in spec.split(",") if s.strip()]
        if not names or not all(re.match(r"^[A-Za-z0-9_.]+$", n) for n in names):
            raise ConfigError(
                f"lora_target_modules must be 'all-linear' or a comma list of module names (letters, digits, '_', '.'), got '{self.lora_target_modules}'"
            )
        return names

    @property
    def gpu_id_list(self) -> list[int] | None:
        """None for 'auto', else the listed GPU indices."""
        if self.gpu_ids.strip() == "auto":
            return None
        return [int(x) for x in self.gpu_ids.split(",")]

    @property
    def trains_by_steps(self) -> bool:
        return self.num_train_epochs == 0

    def resolve_steps(self, name: str, total_steps: int) -> int:
        """logging/eval/save steps: a value in (0, 1) is that fraction of all optimizer steps."""
        v = getattr(self, name)
        if v < 1:
            return max(1, math.ceil(v * total_steps))
        return int(v)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg


# ---- coercion and schema checks -----------------------------------------------------------------
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Accept the GUI's strings ("true", "0.25", "8") and JSON's native types."""
    typ = _field_type(f)
    name = f.name
    if value is None or (isinstance(value, str) and value.strip() == "" and typ is not str):
        return f.default  # an empty form value means "not set"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    # numbers
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return f.default
        try:
            num = float(text)
        except ValueError:
            kind = "a whole number" if typ is int else "a number"
            raise ConfigError(f"{name} must be {kind}, got {value!r}") from None
    elif isinstance(value, (int, float)):
        num = float(value)
    else:
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(num):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if typ is int:
        if num != int(num):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return int(num)
    return num


def _check_schema(f: dataclasses.Field, value: Any) -> None:
    s = f.metadata.get("schema", {})
    name = f.name
    if "enum" in s and value not in s["enum"]:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, s['enum']))}, got '{value}'")
    # fullmatch: like JSON Schema (ECMAScript) patterns, "$" must not accept a trailing newline.
    if "pattern" in s and not re.fullmatch(s["pattern"], str(value)):
        raise ConfigError(f"{name} {_PATTERN_HELP.get(name, 'has an invalid format')}, got '{value}'")
    lo, hi = s.get("minimum"), s.get("maximum")
    xlo = s.get("exclusiveMinimum")
    if lo is not None and value < lo or hi is not None and value > hi or xlo is not None and value <= xlo:
        low = f"> {xlo}" if xlo is not None else f">= {lo}" if lo is not None else ""
        high = f"<= {hi}" if hi is not None else ""
        rng = " and ".join(x for x in (low, high) if x)
        raise ConfigError(f"{name} must be {rng}, got {value}")
    if "multipleOf" in s and value % s["multipleOf"] != 0:
        raise ConfigError(f"{name} must be a multiple of {s['multipleOf']}, got {value}")


_PATTERN_HELP = {
    "gpu_ids": "must be 'auto' or a comma-separated list of GPU indices such as 0,2",
    "adaptor_name": "must be a single safe name: letters, digits, '.', '_' or '-', starting with a letter or digit, at most 100 characters, no path separators or '..'",
    "loss_weight_type": "must be one of auto, scheduler, uniform or cart[geo_p:P] with 0 < P <= 1",
}


def load_config_file(path: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a standalone JSON job config (same keys as the manifest plus model/dataset/output)."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
        raw = raw["config"]  # a Transformer Lab input file: {"experiment": ..., "config": {...}}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a JSON object of key/value pairs")
    raw = {**raw, **(overrides or {})}
    return TrainConfig.from_dict(raw)


# ---- manifest ----------------------------------------------------------------------------------
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def form_fields() -> list[dataclasses.Field]:
    """The v0.30 plugin form's fields (index.json)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("form") is True]


def task_form_fields() -> list[dataclasses.Field]:
    """The current app's task form (task.yaml): the plugin form's fields plus the Data Template ones."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("form")]


def manifest_parameters() -> tuple[dict, dict]:
    """(parameters, parameters_ui) for index.json, generated from the fields above."""
    params, ui = {}, {}
    for f in form_fields():
        entry = {"title": f.metadata["title"], "type": _JSON_TYPES[_field_type(f)], "default": f.default}
        entry.update(f.metadata["schema"])
        params[f.name] = entry
        ui[f.name] = {"ui:help": f.metadata["help"]}
        if _field_type(f) is str and f.name.endswith("_template") or f.name in ("sample_prompts", "system_prompt"):
            ui[f.name]["ui:widget"] = "textarea"
    return params, ui


def model_architectures() -> list[str]:
    """index.json's ``model_architectures`` (what the Train tab offers the plugin for): every family's."""
    from .families import FAMILIES

    return list(dict.fromkeys(a for fam in FAMILIES.values() for a in fam.architectures))


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Print or write the app forms' parameters (from the config fields) "
                                             "and model architectures (from the families).")
    ap.add_argument("--manifest", metavar="INDEX_JSON", help="update the parameters of this index.json (v0.30.x plugin) in place")
    ap.add_argument("--task-yaml", metavar="TASK_YAML", help="write the parameters of this task.yaml (current Transformer Lab task)")
    args = ap.parse_args(argv)
    params, ui = manifest_parameters()
    if args.manifest:
        with open(args.manifest, encoding="utf-8") as fh:
            manifest = json.load(fh)
        manifest["parameters"], manifest["parameters_ui"] = params, ui
        manifest["model_architectures"] = model_architectures()
        with open(args.manifest, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2)
            fh.write("\n")
    if args.task_yaml:
        from .hosts.tlab_task import write_task_yaml

        write_task_yaml(args.task_yaml)
    if not (args.manifest or args.task_yaml):
        print(json.dumps({"parameters": params, "parameters_ui": ui}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
