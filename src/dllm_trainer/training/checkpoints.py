"""Atomic, validated training checkpoints.

Layout: Hugging Face's, `<output_dir>/checkpoint-<step>/` (weights, optimizer.pt, scheduler.pt,
rng_state.pth or rng_state_<rank>.pth per worker, trainer_state.json, training_args.bin), rotated
to at most `save_total_limit` folders. Two additions make them safe to resume from:

Writing (`AtomicCheckpointWriter`, used by `MDLMTrainer._save_checkpoint`)
    Every worker writes into the staging folder `<output_dir>/.tmp-checkpoint-<step>/checkpoint-<step>/`.
    After a barrier, the main process adds `dllm_checkpoint.json` (the step, the world size and the
    size of every file), validates the result, fsyncs it and renames it to `checkpoint-<step>` in
    one `os.rename`. A crash, a SIGKILL or a full disk at any moment leaves either the previous
    checkpoints untouched plus a `.tmp-*` folder (cleaned up by the next run), or the complete new
    checkpoint: never a half-written `checkpoint-<step>`. A full disk (ENOSPC) ends the run with
    `CheckpointWriteError`, a one-line message naming the folder and the last complete checkpoint.
    A checkpoint whose trainable weights are not finite is never written (`NonFiniteWeightsError`).

Validating (`checkpoint_problems`)
    A checkpoint is usable when trainer_state.json parses (with a global_step), the weights exist
    and every `*.safetensors` header is intact and matches the file size (a truncated or zeroed
    file is caught without loading it), the torch files (`*.pt`, `*.pth`, `*.bin`) are complete zip
    archives, and, when `dllm_checkpoint.json` is there, every listed file (among them one RNG
    state per worker) exists with its recorded size. `latest_valid_checkpoint` walks `checkpoint-*` from the
    highest step down, logging why each broken one is skipped.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import struct
import time
import zipfile

from ..errors import ConfigError, UserError
from .file_modes import apply_default_modes

MANIFEST_NAME = "dllm_checkpoint.json"
STAGING_PREFIX = ".tmp-checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")
RESUME_FILES = ("optimizer.pt", "scheduler.pt")  # without these a resume is not exact
# Sharded runs write their resume state in their own layout (distributed.py):
#   FSDP, SHARDED_STATE_DICT: pytorch_model_fsdp_0/ and optimizer_0/ (torch.distributed.checkpoint folders,
#                             one shard file per process plus .metadata); FULL_STATE_DICT: pytorch_model_fsdp.bin
#                             and optimizer.bin (gathered);
#   DeepSpeed: global_step<N>/ (model and optimizer shards of every rank) named by the file `latest`.
FSDP_WEIGHTS = ("pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
OPTIMIZER_STATES = ("optimizer.pt", "optimizer.bin", "optimizer_0")
DCP_METADATA = ".metadata"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (typically: the disk is full)."""


class NonFiniteWeightsError(UserError):
    """The weights became NaN/inf: the checkpoint is not written, the previous ones are kept."""


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def safetensors_problem(path: str) -> str | None:
    """None when the safetensors file's header is intact and its size matches; else what is wrong."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{name} is truncated ({size} bytes; not even a header)"
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER:
                return f"{name} has a corrupt header (header length {n}, file size {size} bytes)"
            if 8 + n > size:
                return f"{name} is truncated ({size} bytes, shorter than its own {n}-byte header)"
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as e:
        return f"{name} cannot be read: {e.strerror or e}"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{name} has a corrupt header (not JSON)"
    if not isinstance(header, dict):
        return f"{name} has a corrupt header (not a JSON object)"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"{name} has a corrupt entry for tensor '{key}'"
        numel = 1
        for d in shape:
            numel *= d
        width = _DTYPE_BYTES.get(dtype)
        if stop < begin or (width is not None and (stop - begin) != numel * width):
            return f"{name} has inconsistent offsets for tensor '{key}'"
        end = max(end, stop)
    expected = 8 + n + end
    if expected != size:
        return f"{name} is truncated or padded: {size} bytes, its header describes {expected}"
    return None


def torch_file_problem(path: str) -> str | None:
    """torch.save files are zip archives: a truncated one has no readable central directory."""
    name = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as zf:
            if not zf.namelist():
                return f"{name} is empty"
    except zipfile.BadZipFile:
        return f"{name} is truncated or corrupt (not a complete torch archive)"
    except OSError as e:
        return f"{name} cannot be read: {e.strerror or e}"
    return None


def checkpoint_problems(path: str, *, need_optimizer: bool = True) -> list[str]:
    """What makes `path` unusable for an exact resume ([] when it is fine)."""
    if not os.path.isdir(path):
        return ["not a folder"]
    problems: list[str] = []
    state_path = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_path):
        problems.append(f"no {TRAINER_STATE}")
    else:
        try:
            with open(state_path, encoding="utf-8") as fh:
                state = json.load(fh)
            if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
                problems.append(f"{TRAINER_STATE} has no global_step")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            problems.append(f"{TRAINER_STATE} is not valid JSON")

    files = set(os.listdir(path))
    deepspeed_tag = _deepspeed_tag(path, files)
    if not any(w in files for w in WEIGHT_FILES + FSDP_WEIGHTS) and not deepspeed_tag:
        problems.append("no model weights (model.safetensors / adapter_model.safetensors)")
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        if folder in files and not os.path.isfile(os.path.join(path, folder, DCP_METADATA)):
            problems.append(f"{folder}/ has no {DCP_METADATA} (an unfinished sharded save)")
    if "latest" in files and not deepspeed_tag:
        problems.append("the DeepSpeed folder named by 'latest' is missing")
    for index_name in ("model.safetensors.index.json",):
        if index_name in files:
            try:
                with open(os.path.join(path, index_name), encoding="utf-8") as fh:
                    shards = set(json.load(fh)["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                problems.append(f"{index_name} is not valid")
                shards = set()
            problems += [f"shard {s} is missing" for s in sorted(shards) if s not in files]
    for name in sorted(files):
        p = os.path.join(path, name)
        if name.endswith(".safetensors") and os.path.isfile(p):
            msg = safetensors_problem(p)
        elif name.endswith((".pt", ".pth", ".bin")) and os.path.isfile(p):
            msg = torch_file_problem(p)
        else:
            msg = None
        if msg:
            problems.append(msg)
    manifest = None
    mpath = os.path.join(path, MANIFEST_NAME)
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as fh:
                manifest = json.load(fh)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                raise ValueError
        except (OSError, UnicodeDecodeError, ValueError):
            problems.append(f"{MANIFEST_NAME} is not valid")
            manifest = None
    if manifest is not None:
        for name, size in manifest["files"].items():
            p = os.path.join(path, name)
            if any(name in m for m in problems):
                continue  # already reported more precisely
            if not os.path.isfile(p):
                problems.append(f"{name} is missing")
            elif os.path.getsize(p) != size:
                problems.append(f"{name} has {os.path.getsize(p)} bytes, {size} were written")

    if need_optimizer:
        if not deepspeed_tag:  # DeepSpeed keeps optimizer and scheduler inside global_step<N>/
            if not any(f in files for f in OPTIMIZER_STATES):
                problems.append("no optimizer.pt (needed to resume the optimizer exactly)")
            if "scheduler.pt" not in files:
                problems.append("no scheduler.pt (needed to resume the optimizer exactly)")
    return list(dict.fromkeys(problems))


def _deepspeed_tag(path: str, files: set[str]) -> str | None:
    """The global_step<N> folder a DeepSpeed checkpoint's `latest` file names, when it exists."""
    if "latest" not in files:
        return None
    try:
        with open(os.path.join(path, "latest"), encoding="utf-8") as fh:
            tag = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if tag and tag in files and os.path.isdir(os.path.join(path, tag)) else None


def sharded_checkpoint_kind(path: str) -> str | None:
    """'fsdp' / 'deepspeed' when checkpoint `path` holds a sharded run's resume state, else None.
    Such a checkpoint resumes only under the same kind of accelerate config (distributed.py)."""
    try:
        files = set(os.listdir(path))
    except OSError:
        return None
    if any(f in files for f in FSDP_WEIGHTS):
        return "fsdp"
    if _deepspeed_tag(path, files):
        return "deepspeed"
    return None


def is_valid_checkpoint(path: str) -> bool:
    return not checkpoint_problems(path)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-<step> folder in output_dir, highest step first."""
    out = []
    for d in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*")):
        m = CHECKPOINT_RE.match(os.path.basename(d))
        if m and os.path.isdir(d):
            out.append((int(m.group(1)), d))
    return sorted(out, reverse=True)


def latest_valid_checkpoint(output_dir: str, *, log=print) -> str | None:
    """The highest-step usable checkpoint in output_dir; each broken one is logged and skipped
    (for messages such as "the last complete checkpoint is kept"; a resume uses newest_checkpoint)."""
    for _, path in list_checkpoints(output_dir):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        log(f"[dllm] warning: checkpoint {path} is incomplete or corrupt ({'; '.join(problems[:3])}); "
            "trying an older one")
    return None


def _weights_intact(path: str) -> bool:
    try:
        files = set(os.listdir(path))
    except OSError:
        return False
    weights = [f for f in files if f in WEIGHT_FILES or f.endswith(".safetensors")]
    if not any(f in files for f in WEIGHT_FILES):
        return False
    for f in weights:
        p = os.path.join(path, f)
        if f.endswith(".safetensors") and safetensors_problem(p):
            return False
        if f.endswith(".bin") and torch_file_problem(p):
            return False
    return True


def newest_checkpoint(output_dir: str) -> str | None:
    """What resume_from_checkpoint 'latest' resumes from: the highest-step checkpoint-N of
    output_dir (None when there is none). When that one is broken, nothing is skipped silently:
    ConfigError says exactly what is wrong, whether its weights are intact, and the choices
    (an older valid checkpoint by path, or moving the broken one away). Nothing is changed on disk."""
    ckpts = list_checkpoints(output_dir)
    if not ckpts:
        return None
    step, path = ckpts[0]
    problems = checkpoint_problems(path)
    if not problems:
        return path
    older = next((p for _, p in ckpts[1:] if not checkpoint_problems(p)), None)
    weights = ("its model weights are intact (they still load as a model, e.g. dllm-trainer generate --model "
               f"{path})" if _weights_intact(path) else "its model weights are damaged too")
    if older:
        choice = (f"to continue from the older checkpoint set resume_from_checkpoint: {older} (the steps after "
                  f"{os.path.basename(older)} are trained again), or move {os.path.basename(path)} out of {output_dir} first")
    else:
        choice = "there is no older valid checkpoint: start a new run in a new output_dir"
    raise ConfigError(
        f"resume_from_checkpoint 'latest': the newest checkpoint {path} (step {step}) cannot be resumed: "
        f"{'; '.join(problems[:3])}. {weights[0].upper()}{weights[1:]}. Nothing was changed; {choice}"
    )


def resolve_resume(spec: str, output_dir: str, *, log=print) -> str | None:
    """resume_from_checkpoint -> a checkpoint folder or None. '' -> None; 'latest' -> the newest
    checkpoint-N of output_dir (None, with a log line, when there is none; ConfigError when it is
    broken: newest_checkpoint); a path -> that folder, ConfigError when it is missing or unusable."""
    spec = (spec or "").strip()
    if not spec:
        return None
    if spec == "latest":
        found = newest_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if found is None:
            log(f"[dllm] resume_from_checkpoint 'latest': no checkpoint in {output_dir} yet, starting fresh")
        return found
    if not os.path.isdir(spec):
        raise ConfigError(f"resume_from_checkpoint '{spec}' is not a checkpoint folder (give 'latest', or a "
                          "checkpoint-N folder of an earlier run)")
    problems = checkpoint_problems(spec)
    if problems:
        raise ConfigError(f"resume_from_checkpoint '{spec}' is incomplete or corrupt: {'; '.join(problems[:3])}")
    return spec


def refuse_fresh_run_over(output_dir: str) -> None:
    """A run that does not resume must not write into a folder holding another run's checkpoints:
    its checkpoint-N folders would be replaced, and rotation (save_total_limit) would delete them."""
    ckpts = list_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    if ckpts:
        names = ", ".join(os.path.basename(p) for _, p in sorted(ckpts)[-3:])
        raise ConfigError(
            f"output_dir '{output_dir}' already holds checkpoints of another run ({names}); this run does not resume, "
            "so they would be overwritten or deleted. To continue that run set resume_from_checkpoint: latest; "
            "to start a new one choose a new output_dir"
        )


# ---------------------------------------------------------------------------------------------
# Does a checkpoint fit this run? (resume)
# ---------------------------------------------------------------------------------------------

# What a checkpoint remembers about its run (manifest "run"); written by AtomicCheckpointWriter.
_FIT_KEYS = (("model_name", "model"), ("training_method", "training_method"), ("lora", "LoRA"),
             ("lora_r", "LoRA rank"), ("lora_alpha", "lora_alpha"), ("lora_target_modules", "lora_target_modules"))
_SCHEDULE_KEYS = ("num_train_epochs", "train_steps", "learning_rate", "learning_rate_schedule", "warmup_ratio",
                  "batch_size", "gradient_accumulation_steps")


def run_record(cfg, *, trainable_parameters: int | None = None) -> dict:
    rec = {"model_name": cfg.model_name, "training_method": cfg.training_method, "lora": cfg.lora,
           "lora_r": cfg.lora_r if cfg.lora else None, "lora_alpha": cfg.lora_alpha if cfg.lora else None,
           "lora_target_modules": cfg.lora_target_modules if cfg.lora else None,
           "trainable_parameters": trainable_parameters}
    rec.update({k: getattr(cfg, k) for k in _SCHEDULE_KEYS})
    if not cfg.trains_by_steps:
        rec["train_steps"] = None  # not used when training by epochs
    return rec


def checkpoint_run(path: str) -> dict:
    """The run record of a checkpoint: the manifest's, else what its files tell (LoRA adaptor
    config or a full model) for checkpoints written before records existed."""
    try:
        with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as fh:
            rec = json.load(fh).get("run")
        if isinstance(rec, dict):
            return rec
    except (OSError, ValueError, AttributeError):
        pass
    rec: dict = {}
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
            adapter = json.load(fh)
        rec.update(lora=True, lora_r=adapter.get("r"), lora_alpha=adapter.get("lora_alpha"))
        if adapter.get("base_model_name_or_path"):
            rec["model_name"] = adapter["base_model_name_or_path"]
    except (OSError, ValueError, AttributeError):
        if os.path.isfile(os.path.join(path, "config.json")):
            rec["lora"] = False
    return rec


def _same_model(a, b) -> bool:
    a, b = str(a or "").strip(), str(b or "").strip()
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def check_checkpoint_fits(path: str, cfg, *, log=None, trainable_parameters: int | None = None) -> None:
    """ConfigError naming every difference that makes checkpoint `path` unusable for this run
    (model, method, LoRA on/off, rank, alpha, targets, trainable parameters); then, through `log`,
    one line per changed setting that a resume accepts but that changes the run (length,
    learning-rate schedule, batch)."""
    rec = checkpoint_run(path)
    now = run_record(cfg, trainable_parameters=trainable_parameters)
    diffs = []
    for key, label in _FIT_KEYS:
        if key not in rec or rec[key] is None and key != "lora":
            continue
        if key == "lora_target_modules" and not now["lora"]:
            continue
        same = _same_model(rec[key], now[key]) if key == "model_name" else rec[key] == now[key]
        if not same:
            diffs.append(f"{label}: checkpoint {_show(rec[key])}, this run {_show(now[key])}")
    if trainable_parameters is not None and isinstance(rec.get("trainable_parameters"), int) \
            and rec["trainable_parameters"] != trainable_parameters:
        diffs.append(f"trainable parameters: checkpoint {rec['trainable_parameters']:,}, this run {trainable_parameters:,}")
    if diffs:
        raise ConfigError(
            f"resume_from_checkpoint '{path}' does not fit this run: {'; '.join(diffs)}. Resume with the "
            "checkpoint's settings, or start a new run in a new output_dir"
        )
    if log is None:
        return
    for key in _SCHEDULE_KEYS:
        if key in rec and rec[key] is not None and now[key] is not None and rec[key] != now[key]:
            log(f"[dllm] note: resuming with {key} {_show(now[key])} (the checkpoint's run had {_show(rec[key])}): "
                + _SCHEDULE_NOTE.get(key, "the rest of the run follows the new value"))


_SCHEDULE_NOTE = {
    "train_steps": "the run ends at the new step count and the learning-rate schedule is recomputed for it "
                   "(the learning rate from the resumed step on follows the new curve)",
    "num_train_epochs": "the run ends after the new number of epochs and the learning-rate schedule is recomputed for it",
    "learning_rate": "the learning rate from the resumed step on follows the new peak",
    "learning_rate_schedule": "the learning rate from the resumed step on follows the new schedule",
    "warmup_ratio": "the learning-rate schedule is recomputed with the new warmup",
    "batch_size": "the steps after the checkpoint see other batches than an uninterrupted run would",
    "gradient_accumulation_steps": "the steps after the checkpoint see other batches than an uninterrupted run would",
}


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if v is None:
        return "none"
    return f"'{v}'" if isinstance(v, str) else str(v)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            _fsync_path(os.path.join(root, f))
        _fsync_path(root)


def write_manifest(path: str, step: int, world_size: int, skipped_nonfinite_steps: int = 0,
                   run: dict | None = None) -> None:
    files = {}
    for root, _dirs, names in os.walk(path):
        for n in names:
            if n == MANIFEST_NAME:
                continue
            full = os.path.join(root, n)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    manifest = {"step": step, "world_size": world_size, "files": files,
                "skipped_nonfinite_steps": skipped_nonfinite_steps, "run": run,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(path, MANIFEST_NAME), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def skipped_steps_in(path: str) -> int:
    """Micro-batches skipped for a non-finite loss up to checkpoint `path` (0 when not recorded),
    so a resumed run keeps counting from there."""
    try:
        with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as fh:
            return int(json.load(fh).get("skipped_nonfinite_steps", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (torch and safetensors wrap the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if "no space left on device" in text or "disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(what: str, where: str, output_dir: str) -> str:
    last = latest_valid_checkpoint(output_dir, log=lambda *_: None) if os.path.isdir(output_dir) else None
    kept = f"the last complete checkpoint {last} is kept" if last else "no complete checkpoint was saved yet"
    return (f"out of disk space while writing {what} to {where}; {kept}. Free some space (or lower "
            "save_total_limit) and rerun with resume_from_checkpoint: latest")


def remove_stale_staging(output_dir: str, *, log=print) -> None:
    """Remove `.tmp-checkpoint-*` folders left by a run that died while saving."""
    for d in glob.glob(os.path.join(glob.escape(output_dir), STAGING_PREFIX + "*")):
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
            log(f"[dllm] removed the unfinished checkpoint {d} of an interrupted run")


def rotate(output_dir: str, limit: int | None, keep: str, also_keep: str | None = None) -> None:
    """Keep at most `limit` checkpoint-N folders: the oldest steps go first; `keep` (the one just
    written) and `also_keep` (HF's best checkpoint) are never deleted, whatever their step."""
    if not limit or limit <= 0:
        return
    ckpts = [p for _, p in sorted(list_checkpoints(output_dir))]  # oldest step first
    protected = {os.path.abspath(x) for x in (keep, also_keep) if x}
    excess = len(ckpts) - limit
    for p in ckpts:
        if excess <= 0:
            break
        if os.path.abspath(p) in protected:
            continue
        shutil.rmtree(p, ignore_errors=True)
        excess -= 1


def commit(staged: str, final: str) -> None:
    """Rename the complete staged checkpoint into place (replacing an old folder of that name)."""
    parent = os.path.dirname(final)
    old = None
    if os.path.lexists(final):
        old = os.path.join(os.path.dirname(staged), "replaced")
        os.rename(final, old)
    os.rename(staged, final)
    _fsync_path(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _weights_finite(model) -> bool:
    import torch

    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor: this process's shard
        if p.requires_grad and local.numel() and not bool(torch.isfinite(local.detach()).all()):
            return False
    return True


class AtomicCheckpointWriter:
    """Saves one checkpoint for `trainer` through the staging folder (see the module docstring).

    `save_into_staging()` must run Hugging Face's own checkpoint code while
    `trainer._checkpoint_staging_root` redirects its output folder to the staging root."""

    def __init__(self, trainer, run_dir: str):
        self.trainer = trainer
        self.run_dir = run_dir
        self.step = trainer.state.global_step
        self.name = f"checkpoint-{self.step}"
        self.final = os.path.join(run_dir, self.name)
        self.staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}{self.step}")
        self.staged = os.path.join(self.staging_root, self.name)

    def _barrier(self) -> None:
        self.trainer.accelerator.wait_for_everyone()

    def _all_finite(self, model) -> bool:
        finite = _weights_finite(model)
        from .callbacks import _any_rank

        return not _any_rank(not finite, self.trainer.args)

    def save(self, model, save_into_staging) -> None:
        trainer = self.trainer
        main = trainer.args.should_save
        if not self._all_finite(trainer.model if model is None else model):
            raise NonFiniteWeightsError(
                f"the model weights became non-finite (NaN/inf) by step {self.step}; checkpoint {self.name} was not "
                f"written and the earlier checkpoints in {self.run_dir} are kept. Lower learning_rate or check the data"
            )
        if main and os.path.lexists(self.staging_root):
            shutil.rmtree(self.staging_root, ignore_errors=True)
        self._barrier()
        failure: BaseException | None = None
        trainer._checkpoint_staging_root = self.staging_root
        try:
            save_into_staging()
        except Exception as e:  # noqa: BLE001 - translated below, after cleaning up
            failure = e
        finally:
            trainer._checkpoint_staging_root = None
        if failure is None:
            self._barrier()
        if main and failure is None:
            try:
                write_manifest(self.staged, self.step, trainer.args.world_size,
                               getattr(trainer, "skipped_steps", 0), getattr(trainer, "run_record", None))
                problems = checkpoint_problems(self.staged, need_optimizer=not trainer.args.save_only_model)
                if problems:
                    raise CheckpointWriteError(f"checkpoint {self.name} was written incompletely: {'; '.join(problems[:3])}")
                apply_default_modes(self.staged)  # safetensors writes 0600; checkpoints are shared like the model
                _fsync_tree(self.staged)
                commit(self.staged, self.final)
                shutil.rmtree(self.staging_root, ignore_errors=True)
                rotate(self.run_dir, trainer.args.save_total_limit, keep=self.final,
                       also_keep=trainer.state.best_model_checkpoint)
            except Exception as e:  # noqa: BLE001
                failure = e
        if failure is not None:
            if main:
                shutil.rmtree(self.staging_root, ignore_errors=True)
            if isinstance(failure, UserError):
                raise failure
            if is_disk_full(failure):
                raise CheckpointWriteError(disk_full_message(f"checkpoint {self.name}", self.run_dir, self.run_dir)) from None
            raise failure
        self._barrier()
        if not main and getattr(trainer.args, "local_process_index", 0) == 0:
            shutil.rmtree(self.staging_root, ignore_errors=True)  # another machine's own (unshared) staging


class disk_errors:
    """Context manager: a full disk while writing `what` becomes a CheckpointWriteError."""

    def __init__(self, what: str, where: str, output_dir: str):
        self.what, self.where, self.output_dir = what, where, output_dir

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, UserError) and is_disk_full(exc):
            raise CheckpointWriteError(disk_full_message(self.what, self.where, self.output_dir)) from None
        return False
