"""Per-device peak memory of a training run, estimated before any worker starts.

Two halves, so that the launching process never imports torch:

- `model_shape(config, ...)` builds the model on the meta device (no memory, ~1 s even for 8B)
  and reads what the estimate needs from the real module tree: parameter counts, the Linear
  layers (LoRA targets, 4-bit weights, autocast copies), the output head, the FSDP unit
  (`_no_split_modules` block). It runs in a short subprocess (`probe_job`, also reporting the
  visible GPUs) started by the app, or directly for `dllm-trainer memory-plan`.
- `estimate(shape, spec)` is plain arithmetic over that shape and the run's settings
  (`RunSpec`: LoRA/QLoRA/full, dtype, batch x length, gradient checkpointing, sharding over the
  devices). It returns the components and the peak; `check_job` prints them as a table and
  refuses a run that cannot fit the visible GPUs, naming settings that would fit.

The model of the peak (bytes per device):

    static   = weights + optimizer states (AdamW: two float32 moments per trainable parameter)
    forward  = activations + autocast copies of the Linear weights + one output-head chunk
    backward = gradients (+ DDP's gradient buckets)
    peak     = static + gathered FSDP/ZeRO-3 units + max(forward, backward)   (+ both with accumulation > 1)
               + runtime overhead (CUDA context, NCCL)

Activations follow our llama-style blocks (LLaDA, Dream) tensor by tensor: what autograd keeps
per token and layer (two RMSNorms with their float32 inputs, the q/k/v/o and MLP inputs, SDPA's
q, k, v and output, the SwiGLU intermediates, LoRA dropout inputs), or only each block's input
with gradient checkpointing plus one block recomputed. The output head runs only at masked
positions, `ce_chunk_size` rows at a time, so it costs one chunk of logits (with their float32
copies and gradients), not batch x length x vocabulary. Checked against the measured peak on CPU
(tests/test_memory_plan.py).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace

from ..errors import ConfigError, UserError

GIB = 1024**3
CUDA_OVERHEAD = 1.0 * GIB  # CUDA context, cuBLAS workspaces, NCCL buffers (measured 0.5-1.5 GiB on recent GPUs)
NF4_BYTES = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8  # 4 bits + double-quantised absmax (8-bit per 64, fp32 per 256 blocks)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Published configs of the models the README's table is about (config.json of each release).
PUBLISHED = {
    "llada-8b": {  # GSAI-ML/LLaDA-8B-Base / -Instruct
        "model_type": "llada", "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32,
        "mlp_hidden_size": 12288, "mlp_ratio": 4, "vocab_size": 126464, "embedding_size": 126464,
        "weight_tying": False, "max_sequence_length": 4096, "rope_theta": 500000.0, "include_bias": False,
        "include_qkv_bias": False, "block_type": "llama", "layer_norm_type": "rms", "mask_token_id": 126336,
    },
    "dream-7b": {  # Dream-org/Dream-v0-Base-7B / -Instruct-7B (Qwen2.5-7B layout)
        "model_type": "Dream", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "mask_token_id": 151666,
        "pad_token_id": 151643, "bos_token_id": 151643, "eos_token_id": 151643,
    },
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (read from its meta-device module tree)."""

    params: int  # every parameter
    linear_weights: int  # weights of the nn.Linear layers (autocast copies; 4-bit unless the head)
    head_params: int  # the output projection (0 when tied to the input embeddings)
    vocab: int  # output rows of the head
    hidden: int
    intermediate: int
    layers: int
    block_params: int  # one `_no_split_modules` block: the FSDP / ZeRO-3 gathering unit
    lora_params: int = 0  # for the job's LoRA rank and targets
    lora_inputs_per_block: int = 0  # sum of in_features of the LoRA-wrapped Linears of one block
    lora_linears_per_block: int = 0
    # down projections of our LLaDA/Dream SwiGLU MLPs (models/swiglu.py): in a full fine-tune they
    # keep neither the SwiGLU product nor an autocast copy of their weight for backward
    swiglu_down_weights: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """The settings of a run that decide its memory."""

    lora: bool = True
    lora_r: int = 32
    lora_dropout: float = 0.05
    load_in_4bit: bool = False
    dtype: str = "bfloat16"  # resolved: bfloat16 | float16 | float32
    batch_size: int = 1
    max_length: int = 1024
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    ce_chunk_size: int = 4096
    max_mask_ratio: float = 1.0
    devices: int = 1  # processes the training state is sharded over
    kind: str = "single"  # single | ddp | fsdp | deepspeed
    sharding: str = "none"  # none | optimizer | grads | full (distributed.SHARDING_LEVELS)
    offload_optimizer: bool = False
    offload_params: bool = False
    device: str = "cuda"  # cuda | cpu

    @property
    def label(self) -> str:
        method = "QLoRA" if self.load_in_4bit else ("LoRA" if self.lora else "full")
        where = {"fsdp": "FSDP", "deepspeed": "ZeRO", "ddp": "DDP"}.get(self.kind, "")
        return f"{method}, {self.dtype}, batch {self.batch_size} x {self.max_length}" + (
            ", grad ckpt" if self.gradient_checkpointing else "") + (f", {where} x{self.devices}" if where else "")


@dataclass
class MemoryPlan:
    spec: RunSpec
    rows: list[tuple[str, float]] = field(default_factory=list)  # (component, bytes per device)
    peak: float = 0.0

    def table(self, capacity: float | None = None, name: str = "") -> str:
        lines = [f"[dllm] memory plan per device ({name + ': ' if name else ''}{self.spec.label}):"]
        for comp, b in self.rows:
            if b > 0:
                lines.append(f"[dllm]   {comp:<34} {b / GIB:8.2f} GiB")
        cap = f" of {capacity / GIB:.1f} GiB" if capacity else ""
        lines.append(f"[dllm]   {'estimated peak':<34} {self.peak / GIB:8.2f} GiB{cap}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The estimate (no torch)
# ---------------------------------------------------------------------------------------------


def _block_activations(shape: ModelShape, spec: RunSpec, s: int, sx: int) -> float:
    """Bytes autograd keeps per token for one block (see the module docstring; checked tensor by
    tensor against saved_tensors_hooks in tests/test_memory_plan.py).

    s: bytes of the compute dtype (autocast); sx: bytes of the residual stream (the dtype of
    the embedding output: float32 master weights keep it float32 under autocast)."""
    d, h = shape.hidden, shape.intermediate
    b = 4 * s * d  # SDPA keeps q, k, v (k/v repeated to all heads for GQA) and its output (o_proj reads a view of it)
    if not spec.lora:
        fused = shape.swiglu_down_weights > 0
        cast = sx != s  # autocast casts each Linear's input separately, and each copy is kept
        b += 2 * (4 * d + sx * d)  # two RMSNorms: float32 input (the residual itself when float32), normalised copy
        b += (3 * s * d if cast else sx * d) + (2 * s * d if cast else sx * d)  # inputs of q/k/v and gate/up
        # SwiGLU: gate pre-activation and up projection (+ its activation and the product the down
        # projection keeps, unless models/swiglu.py rebuilds them in backward)
        b += 2 * s * h if fused else 4 * s * h
        return b
    b += 3 * s * h  # SwiGLU around an adaptor-wrapped down projection: gate pre-activation, its activation, up
    # Frozen base: its Linears and norms keep no inputs for weight gradients; the adaptors do.
    b += 2 * 4 * d  # the norms' float32 inputs
    if shape.lora_linears_per_block:
        mask = 4 if spec.device == "cpu" else 1  # dropout masks: float on CPU, bool on CUDA
        # Each adaptor keeps its own (dropped, or cast back from peft's float32) input; with float32
        # weights and no dropout several adaptors share one input (then this overestimates).
        b += shape.lora_inputs_per_block * ((mask + s) if spec.lora_dropout > 0 else s)
        b += shape.lora_linears_per_block * spec.lora_r * s  # lora_A outputs, kept by lora_B
    return b


def _residual_bytes(spec: RunSpec) -> int:
    w = _DTYPE_BYTES[spec.dtype]
    if spec.load_in_4bit:
        return 4  # prepare_model_for_kbit_training keeps the embeddings in float32
    if spec.lora:
        return w
    if spec.kind == "fsdp" and spec.sharding != "none":
        return w  # FSDP mixed precision gathers the parameters in the compute dtype
    if spec.kind == "deepspeed":
        return w  # DeepSpeed holds 16-bit module weights
    return 4  # float32 master weights (autocast only casts the Linear inputs)


def estimate(shape: ModelShape, spec: RunSpec) -> MemoryPlan:
    """Per-device peak memory of `spec` on a model of `shape` (bytes)."""
    w = _DTYPE_BYTES[spec.dtype]
    s = w  # compute dtype
    n = max(1, spec.devices)
    P = shape.params
    trainable = shape.lora_params if spec.lora else P
    half = w < 4
    shard_all = spec.sharding == "full"
    shard_grads = spec.sharding in ("grads", "full")
    shard_opt = spec.sharding != "none"
    ds = spec.kind == "deepspeed"

    # weights
    if spec.lora:
        base = P
        if spec.load_in_4bit:
            quant = shape.linear_weights - shape.head_params
            weights = quant * NF4_BYTES + (base - quant) * 4
        else:
            weights = base * w
        weights += shape.lora_params * 4  # peft keeps adaptors in float32
    else:
        weights = P * (w if ds and half else 4)  # DeepSpeed: 16-bit module weights (master copy: optimizer)
    if shard_all:
        weights /= n
    if spec.offload_params:
        weights = 0.0

    # optimizer states (+ DeepSpeed's float32 master weights for 16-bit full fine-tuning)
    opt = trainable * 8 + (trainable * 4 if ds and half and not spec.lora else 0)
    if shard_opt:
        opt /= n
    if spec.offload_optimizer:
        opt = 0.0

    # gradients: float32 for float32 parameters (full fine-tune masters, LoRA adaptors)
    grads = trainable * (w if ds and half and not spec.lora else 4)
    if shard_grads:
        grads /= n
    buckets = trainable * 4 if spec.kind == "ddp" and n > 1 else 0.0  # DDP's flat gradient buckets

    # autocast copies of the Linear weights, kept from their use in forward until their backward
    casts = 0.0
    if half and not spec.lora and not ds and not (spec.kind == "fsdp" and spec.sharding != "none"):
        casts = (shape.linear_weights - shape.swiglu_down_weights) * s
    elif half and spec.lora:
        casts = shape.lora_params * s

    # gathered units (FSDP / ZeRO-3): the unit in use plus the prefetched one, the head group
    # (kept until backward), and one unit's unsharded gradients being reduced
    gathered = 0.0
    if shard_all and n > 1:
        unit = shape.block_params * w
        gathered = 2 * unit + shape.head_params * w + shape.block_params * 4
    elif spec.kind == "fsdp" and spec.sharding == "grads" and n > 1:
        gathered = P * w  # without resharding every unit stays gathered until its backward

    # activations
    tokens = spec.batch_size * spec.max_length
    sx = _residual_bytes(spec)
    per_block = _block_activations(shape, spec, s, sx)
    if spec.gradient_checkpointing:
        acts = tokens * (shape.layers * sx * shape.hidden + per_block)  # block inputs + one block recomputed
    else:
        acts = tokens * shape.layers * per_block
    masked = max(1, math.ceil(tokens * spec.max_mask_ratio))
    acts += masked * shape.hidden * sx  # final hidden states at the masked positions (the head's input)
    chunk = min(spec.ce_chunk_size, masked)
    head = chunk * shape.vocab * (12 + s)  # logits, float32 copy, log-softmax and their gradients

    # the head's backward runs first, while every activation is still alive: its weight gradient
    # (full fine-tune) exists before the activations start to be freed
    # (full fine-tune) exists before the activations start to be freed. With accumulation every
    # gradient of the earlier micro-batches is there too.
    backward = grads + buckets
    if spec.gradient_accumulation_steps > 1:
        head_grad = 0.0
        dynamic = acts + casts + head + backward
    else:
        head_grad = 0.0 if spec.lora else shape.head_params * 4 / (n if shard_grads else 1)
        dynamic = max(acts + casts + head + head_grad, backward)
    overhead = CUDA_OVERHEAD if spec.device == "cuda" else 0.0
    rows = [
        ("weights" + (" (4-bit base)" if spec.load_in_4bit else ""), weights),
        ("optimizer states (AdamW)", opt),
        ("gradients", grads),
        ("DDP gradient buckets", buckets),
        ("gathered FSDP/ZeRO units", gathered),
        ("autocast weight copies", casts),
        ("activations" + (" (checkpointed)" if spec.gradient_checkpointing else ""), acts),
        (f"output head ({chunk} masked rows)", head + head_grad),
        ("CUDA context and buffers", overhead),
    ]
    peak = weights + opt + gathered + dynamic + overhead
    return MemoryPlan(spec=spec, rows=rows, peak=peak)


# ---------------------------------------------------------------------------------------------
# The model's shape (torch, meta device)
# ---------------------------------------------------------------------------------------------


def _intermediate(config, linears: list[tuple[str, int, int]], hidden: int) -> int:
    """The MLP width a token's activations go through (MoE: its top-k experts together)."""
    experts, topk = getattr(config, "expert_intermediate_size", None), getattr(config, "num_experts_per_tok", None)
    if isinstance(experts, int) and isinstance(topk, int) and experts > 0 and topk > 0:
        return experts * topk  # approximate: routing keeps per-expert copies and gate scores too
    for key in ("intermediate_size", "effective_mlp_hidden_size", "mlp_hidden_size"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return max((o for _, i, o in linears if i == hidden), default=4 * hidden)


def _is_target(name: str, targets) -> bool:
    if targets == "all-linear":
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def model_shape(config, *, family: str, lora_r: int = 0, lora_targets="all-linear") -> ModelShape:
    """Build the model on the meta device and measure it. `config` is a transformers config."""
    import torch
    import transformers
    from torch import nn

    from .. import models  # noqa: F401 - registers LLaDA and Dream
    from ..families import FAMILIES

    auto_cls = getattr(transformers, FAMILIES[family].auto_class)  # the class training loads
    with torch.device("meta"):
        model = auto_cls.from_config(config)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    head_params = 0 if head is None or tied else head.weight.numel()
    vocab = head.weight.shape[0] if head is not None else embed.weight.shape[0]
    hidden = embed.weight.shape[1]
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    lora = [(n, m) for n, m in linears if m is not head and _is_target(n, lora_targets)] if lora_r else []
    first = blocks[0] if blocks else None
    in_first = {id(m) for m in first.modules()} if first is not None else set()
    lora_first = [m for _, m in lora if id(m) in in_first]
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        linear_weights=sum(m.weight.numel() for _, m in linears),
        head_params=head_params,
        vocab=vocab,
        hidden=hidden,
        intermediate=_intermediate(config, [(n, m.in_features, m.out_features) for n, m in linears], hidden),
        layers=len(blocks) or int(getattr(config, "num_hidden_layers", 1)),
        block_params=sum(p.numel() for p in first.parameters()) if first is not None else 0,
        lora_params=sum(lora_r * (m.in_features + m.out_features) for _, m in lora),
        lora_inputs_per_block=sum(m.in_features for m in lora_first),
        lora_linears_per_block=len(lora_first),
        swiglu_down_weights=sum(d.weight.numel() for d in map(_swiglu_down, model.modules()) if d is not None),
    )


def _swiglu_down(module):
    """The down projection of one of our models' SwiGLU MLPs (models/swiglu.py), else None."""
    name = type(module).__name__
    if name == "LLaDALlamaBlock":
        return module.ff_out
    if name == "DreamMLP":
        return module.down_proj
    return None


# ---------------------------------------------------------------------------------------------
# The job: spec from the config, probe subprocess, the check before launch
# ---------------------------------------------------------------------------------------------


def spec_for(cfg, *, dtype: str, devices: int = 1, layout=None, device: str = "cuda") -> RunSpec:
    """The RunSpec of a job; `dtype` resolved ('auto' -> what the workers will use)."""
    kind, sharding = "single", "none"
    offload_opt = offload_params = False
    if layout is not None and layout.kind in ("fsdp", "deepspeed"):
        kind, sharding = layout.kind, layout.sharding
        offload_opt, offload_params = layout.offload_optimizer, layout.offload_params
        if layout.kind == "fsdp" and layout.offload_params:
            offload_opt = True  # FSDP's CPU offload moves parameters, gradients and the optimizer step
        if layout.hybrid and layout.num_machines:
            devices = max(1, devices // layout.num_machines)
    elif devices > 1:
        kind = "ddp"
    gc = cfg.gradient_checkpointing or bool(layout is not None and getattr(layout, "activation_checkpointing", False))
    return RunSpec(
        lora=cfg.lora, lora_r=cfg.lora_r, lora_dropout=cfg.lora_dropout, load_in_4bit=cfg.load_in_4bit, dtype=dtype,
        batch_size=cfg.batch_size, max_length=cfg.max_length, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=gc, ce_chunk_size=cfg.ce_chunk_size, max_mask_ratio=cfg.max_mask_ratio,
        devices=max(1, devices), kind=kind, sharding=sharding, offload_optimizer=offload_opt,
        offload_params=offload_params, device=device,
    )


def _probe_main(job_path: str) -> int:
    """Subprocess entry: the model's shape, the visible GPUs and the dtype 'auto' resolves to, as JSON."""
    from ..config import TrainConfig
    from .loading import check_family, load_model_config, resolve_dtype

    with open(job_path, encoding="utf-8") as fh:
        cfg = TrainConfig.from_dict(json.load(fh), strict=False)
    import torch

    config = load_model_config(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
    family = check_family(config, cfg).name
    shape = model_shape(config, family=family, lora_r=cfg.lora_r if cfg.lora else 0,
                        lora_targets=cfg.lora_target_list)
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "total": props.total_memory})
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(resolve_dtype(cfg), "float32")
    print(json.dumps({"shape": shape.to_json(), "gpus": gpus, "dtype": dtype}))
    return 0


def probe_job(config_path: str, *, timeout: float = 180.0, env: dict | None = None) -> dict:
    """Run the probe in a subprocess (the launching process stays free of torch and CUDA)."""
    if env is None:
        from .launcher import worker_env

        env = worker_env({})  # our package importable, as for the workers
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_trainer.training.memory_plan", "--probe", config_path],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if proc.returncode != 0:
        from ..errors import ERROR_PREFIX

        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        reason = next((ln.split(ERROR_PREFIX.strip(), 1)[1].strip() for ln in lines if ERROR_PREFIX.strip() in ln),
                      lines[-1] if lines else f"exit code {proc.returncode}")
        raise RuntimeError(reason)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternatives(shape: ModelShape, spec: RunSpec, capacity: float, *, visible: int) -> list[str]:
    """Settings that would make `spec` fit `capacity`, each with its estimate."""
    tries: list[tuple[str, RunSpec]] = []
    if not spec.gradient_checkpointing:
        tries.append(("gradient_checkpointing: true", replace(spec, gradient_checkpointing=True)))
    gc = replace(spec, gradient_checkpointing=True)
    if spec.batch_size > 1:
        accum = spec.gradient_accumulation_steps * spec.batch_size
        tries.append((f"batch_size: 1, gradient_accumulation_steps: {accum}, gradient_checkpointing: true",
                      replace(gc, batch_size=1, gradient_accumulation_steps=accum)))
    if spec.ce_chunk_size > 1024:
        tries.append(("ce_chunk_size: 1024, gradient_checkpointing: true", replace(gc, ce_chunk_size=1024)))
    if not spec.lora:
        tries.append(("lora: true, gradient_checkpointing: true", replace(gc, lora=True)))
    if spec.lora and not spec.load_in_4bit and spec.kind != "fsdp" and spec.device == "cuda":
        tries.append(("load_in_4bit: true (QLoRA), gradient_checkpointing: true", replace(gc, load_in_4bit=True)))
    if visible > 1 and not (spec.kind == "fsdp" and spec.sharding == "full" and spec.devices >= visible) \
            and not spec.load_in_4bit:
        tries.append((f"accelerate_config_file: configs/accelerate/fsdp.yaml over {visible} GPUs, gradient_checkpointing: true",
                      replace(gc, kind="fsdp", sharding="full", devices=visible)))
    out = []
    for text, s in tries:
        p = estimate(shape, s).peak
        if p <= capacity:
            out.append(f"{text} (est. {p / GIB:.1f} GiB)")
    return out


def check_job(cfg, plan, config_path: str, *, log=print, probe=None) -> MemoryPlan | None:
    """The memory plan of a CUDA job, printed; ConfigError when it cannot fit the GPUs it will use
    (memory_check 'refuse'). A plan that cannot be made (e.g. a Hub model offline) is skipped
    with one line: it never blocks a job by itself."""
    if cfg.train_device != "cuda" or cfg.memory_check == "off":
        return None
    try:
        info = (probe or probe_job)(config_path)
    except Exception as e:  # noqa: BLE001 - the plan is advice; the workers report real problems
        log(f"[dllm] memory plan skipped: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        return None
    shape = ModelShape(**info["shape"])
    gpus = info.get("gpus") or []
    ids = cfg.gpu_id_list
    used = [g for g in gpus if ids is None or g["index"] in ids] or gpus
    spec = spec_for(cfg, dtype=info["dtype"], devices=plan.world_size, layout=plan.layout)
    mp = estimate(shape, spec)
    capacity = min((g["total"] for g in used), default=None)
    log(mp.table(capacity, name=os.path.basename(cfg.model_name.rstrip("/")) or cfg.model_name))
    if capacity is None or mp.peak <= capacity:
        if capacity and mp.peak > 0.9 * capacity:
            log("[dllm] warning: the estimate is within 10% of the GPU memory; the run may run out of memory")
        return mp
    gpu = next(g for g in used if g["total"] == capacity)
    fixes = alternatives(shape, spec, capacity, visible=len(used))
    msg = (f"the run needs about {mp.peak / GIB:.1f} GiB per GPU but GPU {gpu['index']} ({gpu['name']}) has "
           f"{capacity / GIB:.1f} GiB (estimate above); "
           + (f"it would fit with: {'; or '.join(fixes)}" if fixes else "no single setting change makes it fit: "
              "use more GPUs with configs/accelerate/fsdp.yaml, LoRA, a shorter max_length")
           + ". Set memory_check: warn to start it anyway")
    if cfg.memory_check == "warn":
        log(f"[dllm] warning: {msg}")
        return mp
    raise MemoryPlanError(msg)


class MemoryPlanError(ConfigError):
    """The estimated peak memory does not fit the visible GPUs."""


# ---------------------------------------------------------------------------------------------
# `dllm-trainer memory-plan`
# ---------------------------------------------------------------------------------------------


def _published_config(name: str):
    from .. import models  # noqa: F401
    from transformers import AutoConfig

    conf = dict(PUBLISHED[name])
    return AutoConfig.for_model(conf.pop("model_type"), **conf)


def readme_table(*, batch_size: int = 1, max_length: int = 1024, gpu_gib: float = 80.0) -> str:
    """LLaDA-8B and Dream-7B, LoRA / QLoRA / full, on 1 and 8 GPUs (the README's table)."""
    rows = ["| model | method | 1 GPU | 1 GPU, grad ckpt | 8 GPUs FSDP | 8 GPUs FSDP, grad ckpt |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, family in (("llada-8b", "llada"), ("dream-7b", "dream")):
        config = _published_config(name)
        shape = model_shape(config, family=family, lora_r=32)
        for method, kw in (("LoRA r=32", dict(lora=True)), ("QLoRA r=32", dict(lora=True, load_in_4bit=True)),
                           ("full", dict(lora=False))):
            cells = []
            for devices, gc in ((1, False), (1, True), (8, False), (8, True)):
                if kw.get("load_in_4bit") and devices > 1:
                    cells.append("n/a (4-bit is not sharded)")
                    continue
                spec = RunSpec(batch_size=batch_size, max_length=max_length, gradient_checkpointing=gc,
                               devices=devices, kind="fsdp" if devices > 1 else "single",
                               sharding="full" if devices > 1 else "none", **kw)
                peak = estimate(shape, spec).peak
                cells.append(f"{peak / GIB:.1f} GiB" + ("" if peak <= gpu_gib * GIB else " ✗"))
            label = f"{name} ({shape.params / 1e9:.2f}B)"
            rows.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="dllm-trainer memory-plan",
        description="Estimate per-GPU peak memory of a training job before running it.")
    ap.add_argument("--config", help="a job config (JSON); the same estimate the job prints before launch")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the job runs on (default 1)")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of each GPU in GiB (default 80)")
    ap.add_argument("--readme", action="store_true", help="print the LLaDA-8B / Dream-7B table of the README")
    ap.add_argument("--batch-size", type=int, default=1, help="with --readme (default 1)")
    ap.add_argument("--max-length", type=int, default=1024, help="with --readme (default 1024)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        return _probe_main(args.probe)
    if args.readme:
        print(f"Estimated peak memory per GPU, batch {args.batch_size} x {args.max_length} tokens, bf16, AdamW "
              f"(✗: does not fit {args.gpu_gib:g} GiB):\n")
        print(readme_table(batch_size=args.batch_size, max_length=args.max_length, gpu_gib=args.gpu_gib))
        return 0
    if not args.config:
        ap.error("give --config FILE.json or --readme")
    from ..config import load_config_file
    from ..errors import report_user_error
    from .distributed import read_layout
    from .loading import check_family, load_model_config

    try:
        overrides = dict(p.split("=", 1) for p in args.set)
        cfg = load_config_file(args.config, overrides)
        config = load_model_config(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
        family = check_family(config, cfg).name
        layout = read_layout(cfg.accelerate_config_file) if cfg.accelerate_config_file.strip() else None
    except UserError as e:
        return report_user_error(e)
    shape = model_shape(config, family=family, lora_r=cfg.lora_r if cfg.lora else 0, lora_targets=cfg.lora_target_list)
    dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16"
    devices = (layout.num_processes if layout is not None and layout.num_processes else args.gpus)
    mp = estimate(shape, spec_for(cfg, dtype=dtype, devices=devices, layout=layout))
    capacity = args.gpu_gib * GIB
    print(mp.table(capacity, name=cfg.model_name))
    if mp.peak > capacity:
        fixes = alternatives(shape, mp.spec, capacity, visible=args.gpus)
        print("[dllm] does not fit; would fit with: " + ("; or ".join(fixes) if fixes else "no single change"))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
