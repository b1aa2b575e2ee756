"""Sharded training (FSDP, DeepSpeed ZeRO) as described by an accelerate config file.

`read_layout(path)` reads an accelerate config (YAML or JSON, no torch import) into a `Layout`:
what is sharded, how checkpoints are written, the process count. The launcher uses it to validate
the job before any worker starts (a DeepSpeed config without the deepspeed package, 4-bit with a
sharded base, a ZeRO-3 config that would not gather the 16-bit weights for the final model) and to
build the `accelerate launch` command; the memory plan uses it to divide the weights, gradients and
optimizer states over the devices.

`enable_fsdp_on_cpu()` runs in the workers. accelerate switches to FSDP only for accelerator
backed process groups (AcceleratorState: MULTI_GPU, MULTI_NPU, MULTI_XPU, ...), never for
MULTI_CPU, although torch's FSDP (fully_shard and FSDP1) runs on CPU tensors over gloo. On
`train_device: cpu` with an FSDP config the workers apply the same switch accelerate applies on
GPUs (distributed type FSDP, the FSDP plugin, its mixed-precision policy), so every later step
(wrapping, sharded optimizer, gathered state dicts, FSDP checkpoints) is accelerate's own code.
That is what lets the FSDP path be tested end to end on a CPU-only machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError, UserError

# How much of the training state each kind of run shards over its processes.
#   none: every process holds everything (DDP, FSDP NO_SHARD)
#   optimizer: optimizer states (ZeRO-1)
#   grads: optimizer states and gradients (ZeRO-2, FSDP SHARD_GRAD_OP / FSDP2 without resharding)
#   full: parameters too (ZeRO-3, FSDP FULL_SHARD / HYBRID_SHARD, FSDP2 with resharding)
SHARDING_LEVELS = ("none", "optimizer", "grads", "full")


@dataclass(frozen=True)
class Layout:
    kind: str  # "single" | "ddp" | "fsdp" | "deepspeed" | "tpu" | "other"
    sharding: str = "none"  # one of SHARDING_LEVELS
    fsdp_version: int | None = None
    zero_stage: int | None = None
    state_dict_type: str | None = None  # FSDP: FULL_STATE_DICT | SHARDED_STATE_DICT
    activation_checkpointing: bool = False  # FSDP's own activation checkpointing
    offload_params: bool = False
    offload_optimizer: bool = False
    zero3_save_16bit_model: bool = False
    num_processes: int | None = None  # over all machines, as accelerate counts them
    num_machines: int | None = None
    hybrid: bool = False  # FSDP HYBRID_SHARD: sharded within a machine, replicated across machines
    path: str = ""

    @property
    def sharded(self) -> bool:
        return self.kind in ("fsdp", "deepspeed")

    @property
    def name(self) -> str:
        if self.kind == "fsdp":
            return f"FSDP{self.fsdp_version or 1} ({self.sharding}-shard)"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return {"ddp": "DDP", "single": "one process"}.get(self.kind, self.kind)


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes")


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_layout(path: str) -> Layout:
    """The sharding layout an accelerate config file asks for; ConfigError when it cannot be read."""
    import yaml  # accelerate's own dependency; YAML is a superset of the JSON configs accelerate also reads

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"accelerate_config_file '{path}' cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"accelerate_config_file '{path}' is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"accelerate_config_file '{path}' must hold a mapping of accelerate settings")
    dtype = str(raw.get("distributed_type") or "NO").upper()
    common = dict(num_processes=_int(raw.get("num_processes")), num_machines=_int(raw.get("num_machines")), path=path)
    if dtype == "FSDP":
        fsdp = raw.get("fsdp_config") or {}
        fsdp = {k if k.startswith("fsdp_") else f"fsdp_{k}": v for k, v in fsdp.items()}
        version = _int(fsdp.get("fsdp_version")) or 1
        if version not in (1, 2):
            raise ConfigError(f"accelerate_config_file '{path}': fsdp_version must be 1 or 2, got {fsdp.get('fsdp_version')}")
        if version == 2:
            reshard = _flag(fsdp.get("fsdp_reshard_after_forward", True))
            sharding, hybrid = ("full" if reshard else "grads"), False
        else:
            strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
            # accelerate also accepts the enum's numbers: 1 FULL_SHARD, 2 SHARD_GRAD_OP, 3 NO_SHARD, 4/5 HYBRID
            strategy = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD",
                        "5": "_HYBRID_SHARD_ZERO2"}.get(strategy, strategy)
            sharding = {"FULL_SHARD": "full", "HYBRID_SHARD": "full", "SHARD_GRAD_OP": "grads",
                        "_HYBRID_SHARD_ZERO2": "grads", "NO_SHARD": "none"}.get(strategy)
            if sharding is None:
                raise ConfigError(f"accelerate_config_file '{path}': unknown fsdp_sharding_strategy '{strategy}'")
            hybrid = "HYBRID" in strategy
        return Layout(
            kind="fsdp", sharding=sharding, fsdp_version=version, hybrid=hybrid,
            state_dict_type=str(fsdp.get("fsdp_state_dict_type", "FULL_STATE_DICT")).upper(),
            activation_checkpointing=_flag(fsdp.get("fsdp_activation_checkpointing", False)),
            offload_params=_flag(fsdp.get("fsdp_offload_params", False)), **common,
        )
    if dtype == "DEEPSPEED":
        ds = raw.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            raise ConfigError(
                f"accelerate_config_file '{path}' points to a separate DeepSpeed JSON (deepspeed_config_file); "
                "give the ZeRO settings in the accelerate config itself (zero_stage, offload_*_device, "
                "zero3_save_16bit_model), as configs/accelerate/zero2.yaml and zero3.yaml do"
            )
        stage = _int(ds.get("zero_stage", 2))
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"accelerate_config_file '{path}': zero_stage must be 0, 1, 2 or 3, got {ds.get('zero_stage')}")
        return Layout(
            kind="deepspeed", zero_stage=stage, sharding=SHARDING_LEVELS[stage],
            offload_optimizer=str(ds.get("offload_optimizer_device", "none")).lower() not in ("none", ""),
            offload_params=str(ds.get("offload_param_device", "none")).lower() not in ("none", ""),
            zero3_save_16bit_model=_flag(ds.get("zero3_save_16bit_model", False)), **common,
        )
    if dtype in ("MULTI_GPU", "MULTI_CPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_HPU"):
        return Layout(kind="ddp", **common)
    if dtype == "NO":
        return Layout(kind="single", **common)
    if dtype in ("XLA", "TPU"):
        return Layout(kind="tpu", **common)
    return Layout(kind="other", **common)


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def check_layout(layout: Layout, *, train_device: str, load_in_4bit: bool, gradient_checkpointing: bool = False,
                 deepspeed_available: bool | None = None) -> None:
    """What this trainer cannot run with `layout`, as one ConfigError naming the file and the fix."""
    where = f"accelerate_config_file '{layout.path}'"
    if layout.kind == "deepspeed":
        if train_device != "cuda":
            raise ConfigError(f"{where} uses DeepSpeed ZeRO-{layout.zero_stage}, which needs train_device 'cuda' "
                              "(for CPU workers use an FSDP config such as configs/accelerate/fsdp.yaml)")
        available = deepspeed_installed() if deepspeed_available is None else deepspeed_available
        if not available:
            raise ConfigError(
                f"{where} uses DeepSpeed ZeRO-{layout.zero_stage}, but the 'deepspeed' package is not installed in "
                "this environment; install it (pip install 'dllm-trainer[deepspeed]', or pip install deepspeed) or "
                "use an FSDP config (configs/accelerate/fsdp.yaml)"
            )
    if load_in_4bit and layout.kind in ("fsdp", "deepspeed") and layout.sharding == "full":
        raise ConfigError(
            f"load_in_4bit cannot be combined with {where} ({layout.name} shards the base weights, and "
            "bitsandbytes' 4-bit weights cannot be sharded here); use LoRA without 4-bit under FSDP/ZeRO-3, "
            "or 4-bit with DDP or ZeRO-2"
        )
    if layout.kind == "fsdp" and layout.activation_checkpointing and gradient_checkpointing:
        raise ConfigError(
            f"{where} turns on fsdp_activation_checkpointing and gradient_checkpointing is on too: every block "
            "would be recomputed twice; keep one (gradient_checkpointing: true with fsdp_activation_checkpointing: false)"
        )


def check_resume_layout(resume: str, layout: Layout | None) -> None:
    """A checkpoint written by a sharded run resumes only under the same kind of sharding."""
    from .checkpoints import sharded_checkpoint_kind

    spec = (resume or "").strip()
    if not spec or spec == "latest" or not os.path.isdir(spec):
        return
    kind = sharded_checkpoint_kind(spec)
    have = layout.kind if layout is not None else None
    if kind and kind != have:
        name = {"fsdp": "an FSDP", "deepspeed": "a DeepSpeed"}[kind]
        raise ConfigError(
            f"resume_from_checkpoint '{spec}' holds {name} run's sharded training state; resume it with the same "
            f"accelerate_config_file ({'configs/accelerate/fsdp.yaml' if kind == 'fsdp' else 'a ZeRO config'}) "
            "as the run that wrote it"
        )


def launch_overrides(layout: Layout) -> list[str]:
    """`accelerate launch` flags this trainer needs whatever the config file says."""
    if layout.kind == "deepspeed" and layout.zero_stage == 3:
        # The final model / adaptor is written from the gathered 16-bit weights
        # (stage3_gather_16bit_weights_on_model_save); without it HF saves only DeepSpeed's shards.
        return ["--zero3_save_16bit_model", "true"]
    return []


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

_cpu_fsdp_enabled = False


def start_process_group(cfg) -> None:
    """Start accelerate's process group before the model is loaded, as an FSDP run needs it there:
    transformers loads the weights on rank 0 only (the others build on the meta device) when
    fsdp_cpu_ram_efficient_loading is on, and accelerate broadcasts them while sharding. On CPU
    this also switches accelerate's FSDP on for gloo (enable_fsdp_on_cpu)."""
    import warnings

    import torch
    from accelerate import PartialState

    # Our blocks return their K/V (for the sampling cache) next to the hidden state; FSDP2 warns
    # about any view among a block's outputs because an in-place op on it would skip a hook.
    # Training never touches those tensors (the loss equality with unsharded runs is tested).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if cfg.train_device == "cpu" or not torch.cuda.is_available():
        enable_fsdp_on_cpu()
    PartialState(cpu=cfg.train_device == "cpu")


def leave_process_group() -> None:
    """End a worker's part in the process group once its run is done: every rank waits for the
    others, then the group is destroyed. A worker that exits with the group still up leaves gloo's
    threads to the interpreter's teardown, which can abort the process ("terminate called without
    an active exception", seen on a loaded CI box); the launcher then reports a failed job, and
    torchrun's agents wait 300 s on an exit barrier the dead rank never reaches."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        PartialState().destroy_process_group()


def fsdp_requested() -> bool:
    """This worker was launched with an FSDP accelerate config (accelerate launch sets the variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP run over a gloo (CPU) process group; see the module docstring.

    Only the distributed type of a MULTI_CPU state is changed, exactly as AcceleratorState does
    for GPU process groups when an FSDP plugin is given."""
    global _cpu_fsdp_enabled
    if _cpu_fsdp_enabled:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # as accelerate does at the end of its __init__: later AcceleratorState() calls copy it back
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = __init__
    _cpu_fsdp_enabled = True


def reshard_fsdp(model) -> None:
    """Free the gathered weights FSDP2 keeps after a forward without backward (evaluation, samples
    during training): modules with reshard_after_forward=False (the root, accelerate's head group)
    still hold their unsharded parameters then. Saving starts from the sharded state, as Hugging
    Face's Trainer does before it builds the optimizer."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class WeightsNotGathered(UserError):
    """A sharded run ended without full weights to save (DeepSpeed ZeRO-3 without 16-bit gathering)."""


def save_full_model(trainer, output_dir: str) -> None:
    """The trained model (or LoRA adaptor) as ONE full Hugging Face folder, however it was sharded.

    Hugging Face's `save_model` gathers FSDP FULL_STATE_DICT and DeepSpeed (ZeRO-3: the 16-bit
    weights, stage3_gather_16bit_weights_on_model_save) runs; with FSDP SHARDED_STATE_DICT it
    writes nothing, so those are gathered here (accelerate's get_state_dict: a collective that
    every process joins; the main process writes). Must be called on every process."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    reshard_fsdp(trainer.model)
    if getattr(trainer, "is_fsdp_enabled", False) and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        trainer._save(output_dir, state_dict=state_dict)
    else:
        trainer.save_model(output_dir)
    if trainer.args.should_save:
        names = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
        if not names & {"model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                        "pytorch_model.bin", "adapter_model.bin"}:
            raise WeightsNotGathered(
                f"the trained weights were not gathered into {output_dir} (DeepSpeed ZeRO-3 saved only its shards: "
                "set zero3_save_16bit_model: true in the accelerate config); the checkpoints in the output "
                "folder hold the training state"
            )
