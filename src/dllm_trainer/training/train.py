"""The training recipe each worker runs: config -> model -> data -> MDLMTrainer -> saved model.

Run in-process with `run_training(cfg)`, or as an `accelerate launch` worker:
`python -m dllm_trainer.training.train --config-json FILE` (what the launcher does).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from ..config import TrainConfig
from ..errors import UserError
from .cpu import default_cpu_threads


@dataclass
class TrainResult:
    output_dir: str
    final_model_dir: str | None  # full fine-tune: the saved model
    adaptor_dir: str | None  # LoRA: the saved adaptor (fused later by export.py)
    metrics: dict = field(default_factory=dict)
    stopped: bool = False
    global_step: int = 0
    samples: list = field(default_factory=list)


def adaptor_dir_for(cfg: TrainConfig) -> str:
    return cfg.adaptor_output_dir or os.path.join(cfg.output_dir, "adaptors", cfg.adaptor_name)


def final_model_dir_for(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, "final_model")


def find_resume_checkpoint(cfg: TrainConfig, log=print) -> str | None:
    """'' -> None; 'latest' -> newest valid checkpoint-N in output_dir (None if none); else the path
    (ConfigError when it is missing, incomplete or corrupt). See checkpoints.py."""
    from .checkpoints import resolve_resume

    return resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir, log=log)


def is_complete_checkpoint(path: str) -> bool:
    """trainer_state.json, intact weights, optimizer/scheduler and RNG states (checkpoints.py)."""
    from .checkpoints import is_valid_checkpoint

    return is_valid_checkpoint(path)


def _checkpoint_step(path: str) -> int:
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
            return int(json.load(fh).get("global_step") or 0)
    except (OSError, ValueError, AttributeError):
        return 0


def _is_main_worker() -> bool:
    return os.environ.get("RANK", "0") == "0"


def build_training_args(cfg: TrainConfig, dtype, *, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    from .packing import packing_active

    on_cpu = cfg.train_device == "cpu" or not torch.cuda.is_available()
    # Mixed precision follows our dtype, not the accelerate config's `mixed_precision` (which
    # accelerate launch exports and TrainingArguments would read when bf16/fp16 are off).
    os.environ["ACCELERATE_MIXED_PRECISION"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    report_to = ["tensorboard"] + (["wandb"] if cfg.log_to_wandb else [])
    eval_strategy = cfg.eval_strategy if has_eval else "no"
    kwargs = dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.learning_rate_schedule,
        # HF reads a warmup_steps value below 1 as a ratio of all steps (1.0 would mean one step).
        warmup_steps=min(cfg.warmup_ratio, 0.999999),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        # HF reads values in (0, 1) as fractions of all optimizer steps, as our config does.
        logging_steps=cfg.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps if eval_strategy == "steps" else None,
        save_strategy="epoch" if cfg.eval_strategy == "epoch" else "steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to,
        remove_unused_columns=False,  # the collator needs prompt_len and sample_index
        dataloader_num_workers=0,
        use_cpu=on_cpu,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Packed batches mix lengths on purpose; bert cannot pack (packing_active) and groups instead.
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not packing_active(cfg) else "random",
        activation_checkpointing=False,  # enabled on the model in loading.py (non-reentrant)
        torch_compile=cfg.torch_compile,
        disable_tqdm=False,
        ddp_timeout=600,
        logging_first_step=True,
        include_num_input_tokens_seen="no",
    )
    if cfg.trains_by_steps:
        kwargs["max_steps"] = cfg.train_steps
    else:
        kwargs["num_train_epochs"] = cfg.num_train_epochs
    return TrainingArguments(**kwargs)


def training_length_note(cfg: TrainConfig, max_steps: int) -> str:
    """Which setting decides how long the run is (both are always in the form)."""
    if cfg.trains_by_steps:
        return f"[dllm] length: train_steps {cfg.train_steps} (num_train_epochs is 0) = {max_steps} optimizer steps"
    return (f"[dllm] length: num_train_epochs {cfg.num_train_epochs} = {max_steps} optimizer steps; train_steps "
            f"({cfg.train_steps}) is not used (it applies only when num_train_epochs is 0)")


def _length_note_callback(cfg: TrainConfig, log):
    """Logs training_length_note once the Trainer knows the number of optimizer steps."""
    from transformers import TrainerCallback

    class LengthNote(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                log(training_length_note(cfg, state.max_steps))

    return LengthNote()


def run_training(cfg: TrainConfig, *, log=print, extra_callbacks=()) -> TrainResult:
    from .callbacks import EventCallback, SampleCallback, StopFileCallback
    from .collator import DiffusionCollator
    from ..data import build_datasets, plan_datasets
    from .loading import load_for_training, max_length_note, resolve_max_length
    from .noise import NoiseSchedule
    from .packing import packing_active, packing_note
    from .trainer import DiffusionSettings, MDLMTrainer

    from .checkpoints import check_checkpoint_fits, refuse_fresh_run_over, run_record
    from .events import STOP_FILE, events_enabled

    main_worker = _is_main_worker()
    quiet = lambda *_: None  # noqa: E731 - the other ranks say nothing the main one says
    os.makedirs(cfg.output_dir, exist_ok=True)
    stop_file = os.path.join(cfg.output_dir, STOP_FILE)
    if os.path.exists(stop_file):
        os.remove(stop_file)  # a stale request from an earlier run must not stop this one
    if main_worker:  # a run killed while saving leaves a .tmp-checkpoint-N folder (checkpoints.py)
        from .checkpoints import remove_stale_staging

        remove_stale_staging(cfg.output_dir, log=log)
    resume = find_resume_checkpoint(cfg, log=log if main_worker else quiet)
    if resume:
        # launched by the app, it already printed the notes (preflight); the errors are checked again
        check_checkpoint_fits(resume, cfg, log=log if main_worker and not events_enabled() else None)
        if main_worker:
            log(f"[dllm] resuming from {resume}")
    else:
        refuse_fresh_run_over(cfg.output_dir)

    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA and fresh output heads are initialised from the seed: runs are reproducible
    import torch

    if cfg.train_device == "cpu" or not torch.cuda.is_available():
        # Oversubscribed OpenMP threads cost several-fold on busy machines (default_cpu_threads).
        torch.set_num_threads(default_cpu_threads())
        if _is_main_worker():
            log(f"[dllm] CPU training with {torch.get_num_threads()} thread(s) per worker (DLLM_CPU_THREADS overrides)")
    # The dataset is found and checked before the (slow) model load: a missing or malformed
    # dataset fails in seconds, with the file and line of the row at fault.
    data_plan = plan_datasets(
        cfg.dataset_name,
        input_template=cfg.input_template or None,
        output_template=cfg.output_template or None,
        instruction_template=cfg.instruction_template or None,
        seed=cfg.seed,
        split=cfg.dataset_split or None,
        evaluation=cfg.eval_strategy != "no",
        token=os.environ.get("HF_TOKEN"),
    )
    from .distributed import fsdp_requested, start_process_group

    if fsdp_requested():  # before loading: with fsdp_cpu_ram_efficient_loading only rank 0 reads the weights
        start_process_group(cfg)
    loaded = load_for_training(cfg, log=log)
    family, tokenizer = loaded.family, loaded.tokenizer
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    if resume:
        check_checkpoint_fits(resume, cfg, trainable_parameters=trainable)
    max_length = resolve_max_length(cfg, loaded.model.config)
    note = max_length_note(cfg, max_length, loaded.model.config)
    if note and _is_main_worker():
        log(note)
    cfg = cfg.replace(max_length=max_length)
    prepared = build_datasets(
        cfg.dataset_name,
        tokenizer,
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        mask_prompt_loss=cfg.mask_prompt_loss,
        input_template=cfg.input_template or None,
        output_template=cfg.output_template or None,
        instruction_template=cfg.instruction_template or None,
        system_prompt=cfg.system_prompt or None,
        num_proc=cfg.num_proc,
        plan=data_plan,
        log=log,
    )
    weight_kind, geo_p = cfg.loss_weight
    settings = DiffusionSettings(
        family=family,
        mask_token_id=loaded.mask_token_id,
        schedule=NoiseSchedule(cfg.noise_eps, cfg.min_mask_ratio, cfg.max_mask_ratio),
        weight_kind=weight_kind,
        geo_p=geo_p,
        normalization=cfg.loss_normalization,
        seed=cfg.seed,
        ce_chunk_size=cfg.ce_chunk_size,
        nonfinite_loss=cfg.nonfinite_loss,
        elbo_samples=cfg.eval_elbo_samples,
        elbo_rows=cfg.eval_elbo_rows,
    )
    collator = DiffusionCollator(
        family=family,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
        perbatch_cutoff=cfg.perbatch_cutoff,
        resp_cutoff_ratio=cfg.resp_cutoff_ratio,
        seed=cfg.seed,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
        # Padding-free packing into max_length sequences (packing.py); llada/dream only.
        pack_length=cfg.max_length if packing_active(cfg) else None,
    )
    if packing_note(cfg) and _is_main_worker():
        log(packing_note(cfg))
    args = build_training_args(cfg, loaded.torch_dtype, has_eval=prepared.eval is not None)
    stopper = StopFileCallback(cfg.output_dir)
    callbacks = [EventCallback(), stopper, _length_note_callback(cfg, log), *extra_callbacks]
    sampler_cb = None
    prompts = [p.strip() for p in cfg.sample_prompts.splitlines() if p.strip()]
    if prompts:
        sampler_cb = SampleCallback(prompts, tokenizer, every=cfg.sample_every_steps, gen_length=cfg.sample_gen_length,
                                    steps=cfg.sample_steps, log_dir=os.path.join(cfg.output_dir, "samples"),
                                    stopper=stopper)
        callbacks.append(sampler_cb)
    trainer = MDLMTrainer(
        model=loaded.model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        diffusion=settings,
    )
    trainer.export_base, trainer.export_trust_remote_code = cfg.model_name, cfg.trust_remote_code
    # HF's bars stay; HF's printed log dicts go (EventCallback writes one line per logging step)
    from transformers.trainer_callback import ProgressCallback

    from .callbacks import ConsoleProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ConsoleProgressCallback())
    trainer.run_record = run_record(cfg, trainable_parameters=trainable)  # kept in every checkpoint's manifest
    log(f"[dllm] training {cfg.training_method} on {len(prepared.train)} rows"
        f"{f' (eval {len(prepared.eval)})' if prepared.eval is not None else ''}; output in {cfg.output_dir}")
    if resume:
        from .checkpoints import skipped_steps_in

        trainer.skipped_steps = skipped_steps_in(resume)
    start_step = _checkpoint_step(resume) if resume else 0
    from .events import CtrlCStops

    def ctrl_c() -> None:  # the first Ctrl-C: like the STOP file (a second one stops at once)
        with open(stop_file, "w") as fh:
            fh.write("Ctrl-C\n")
        if main_worker:
            print("[dllm] Ctrl-C: stopping after the step in progress and saving a checkpoint "
                  "(Ctrl-C again to stop at once, without one)", file=sys.stderr, flush=True)

    with CtrlCStops(ctrl_c) as interrupt:
        train_out = trainer.train(resume_from_checkpoint=resume)
    if interrupt.pressed and os.path.exists(stop_file):
        os.remove(stop_file)  # ours, not a request for the next run
    metrics = {k: v for k, v in train_out.metrics.items() if isinstance(v, (int, float))}
    if trainer.state.global_step <= start_step:
        # Resumed at the last step: no step ran, and HF's train_loss (0 / 0 steps) would read 0.
        metrics.pop("train_loss", None)
    if prepared.eval is not None and not stopper.stopped:
        metrics.update(_final_eval(trainer, cfg))
    for entry in reversed(trainer.state.log_history):  # the last logged training metrics
        if "loss" in entry:
            metrics.setdefault("loss", entry["loss"])
            for k in ("masked_accuracy", "mask_ratio", "tokens_per_second", "grad_norm", "learning_rate"):
                if k in entry:
                    metrics.setdefault(k, entry[k])
            break
    metrics["global_step"] = trainer.state.global_step
    if trainer.skipped_steps:
        metrics["skipped_nonfinite_steps"] = trainer.skipped_steps

    result = TrainResult(output_dir=cfg.output_dir, final_model_dir=None, adaptor_dir=None, metrics=metrics,
                         stopped=stopper.stopped, global_step=trainer.state.global_step,
                         samples=list(sampler_cb.history) if sampler_cb else [])
    if stopper.stopped:
        log(f"[dllm] stop requested: stopped at step {trainer.state.global_step}; the checkpoint is kept in {cfg.output_dir}")
    else:
        from .checkpoints import disk_errors
        from .distributed import save_full_model  # gathered from the shards under FSDP / ZeRO-3

        if cfg.lora:
            result.adaptor_dir = adaptor_dir_for(cfg)
            with disk_errors("the LoRA adaptor", result.adaptor_dir, cfg.output_dir):
                save_full_model(trainer, result.adaptor_dir)
        else:
            result.final_model_dir = final_model_dir_for(cfg)
            with disk_errors("the final model", result.final_model_dir, cfg.output_dir):
                save_full_model(trainer, result.final_model_dir)
        if trainer.is_world_process_zero():
            from .file_modes import apply_default_modes

            apply_default_modes(result.adaptor_dir or result.final_model_dir)  # safetensors writes 0600
    if trainer.is_world_process_zero():
        with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        from .events import emit_event

        if events_enabled():
            emit_event("result", stopped=result.stopped, adaptor_dir=result.adaptor_dir,
                       final_model_dir=result.final_model_dir, metrics=metrics)
    return result


def _final_eval(trainer, cfg: TrainConfig) -> dict:
    """The eval metrics of the last step: HF's Trainer already evaluates at the last step (steps
    and epoch strategies), so that evaluation is reused instead of run a second time; only a run
    that did not evaluate there (e.g. a resume of a finished run) evaluates now."""
    if cfg.eval_strategy == "no":
        return {}
    step = trainer.state.global_step
    found: dict = {}
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") != step:
            break
        found.update({k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))})
    if "eval_loss" in found:
        return found
    return {k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}


def leave_out_bitsandbytes(cfg: TrainConfig) -> None:
    """Without 4-bit loading nothing here needs bitsandbytes, yet peft (which transformers' Trainer
    imports) imports it when it is installed, and it imports torch's compiler stack: 50-115 MiB
    more resident memory in every worker. Marked absent before those imports, it stays out
    (``importlib.util.find_spec`` then answers None, so peft and transformers see no bitsandbytes)."""
    if not cfg.load_in_4bit and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of one accelerate worker."""
    ap = argparse.ArgumentParser(prog="python -m dllm_trainer.training.train")
    ap.add_argument("--config-json", required=True, help="the validated job config as JSON")
    args = ap.parse_args(argv)
    from ..errors import report_unexpected_error, report_user_error
    from .callbacks import STOP_ON_SIGTERM_ENV, stop_on_sigterm

    if os.environ.get(STOP_ON_SIGTERM_ENV) == "1":
        stop_on_sigterm()
    from .events import enable_events

    enable_events()  # this process is a launched worker: the launcher reads its events

    cfg = None
    try:
        with open(args.config_json) as fh:
            cfg = TrainConfig.from_dict(json.load(fh), strict=False)
        leave_out_bitsandbytes(cfg)
        run_training(cfg)
        from .distributed import leave_process_group

        leave_process_group()
        return 0
    except UserError as e:
        return report_user_error(e)
    except KeyboardInterrupt:
        print("[dllm] interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the traceback goes to debug.log, one line to the console
        return report_unexpected_error(e, cfg.output_dir if cfg else None)


if __name__ == "__main__":
    raise SystemExit(worker_main())
