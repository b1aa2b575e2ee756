"""MDLMTrainer: HF Trainer with the masked-diffusion loss.

A training step, top to bottom (`compute_loss`):
1. draw per-sample mask ratios t and masks from (seed, epoch, sample_index)      -> noise.py
2. replace masked tokens with the mask token; prompt tokens stay visible
3. run the model, computing the output head only at masked positions              -> families.py
4. weight each masked token's cross-entropy (1/t, uniform or CART)                 -> loss_weights.py
5. divide by the number of trainable tokens of the whole optimizer step, over every
   gradient-accumulation micro-batch and every worker (HF's `num_items_in_batch`), so the loss
   does not depend on how a batch is split.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import Trainer

from .errors import UserError
from .families import FamilyStrategy
from .loss_weights import token_weights
from .noise import EVAL_STREAM, TRAIN_STREAM, NoiseSchedule, draw_masks


class NonFiniteLossError(UserError):
    pass


@dataclass(frozen=True)
class DiffusionSettings:
    family: FamilyStrategy
    mask_token_id: int
    schedule: NoiseSchedule = NoiseSchedule()
    weight_kind: str = "scheduler"
    geo_p: float | None = None
    normalization: str = "trainable_tokens"  # or "masked_tokens"
    seed: int = 42
    ce_chunk_size: int = 4096
    nonfinite_loss: str = "stop"  # or "skip"
    max_consecutive_skips: int = 10


@dataclass
class _Stats:
    """Sums between two log lines (per worker; reduced over workers when logged)."""

    correct: float = 0.0
    masked: float = 0.0
    trainable: float = 0.0
    mask_ratio: float = 0.0
    samples: float = 0.0
    since: float = field(default_factory=time.perf_counter)

    def add(self, correct, masked, trainable, mask_ratio_sum, samples):
        self.correct += correct
        self.masked += masked
        self.trainable += trainable
        self.mask_ratio += mask_ratio_sum
        self.samples += samples

    def reset(self):
        self.__init__()


def _zero_loss(model) -> torch.Tensor:
    """A loss of exactly 0 that still touches every trainable parameter (so distributed workers
    stay in step) and gives them zero gradients, unlike multiplying a NaN loss by 0."""
    return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)


class MDLMTrainer(Trainer):
    # Our loss is already divided by the step's trainable-token count: no extra 1/GA scaling.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, diffusion: DiffusionSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.diffusion = diffusion
        # Makes HF count labels != -100 over all micro-batches of a step (and across workers)
        # and hand it to compute_loss as num_items_in_batch.
        self.model_accepts_loss_kwargs = True
        self._train_stats = _Stats()
        self._eval_stats = _Stats()
        self._consecutive_skips = 0
        self.skipped_steps = 0

    # ---- the loss ----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        d = self.diffusion
        input_ids = inputs["input_ids"]
        labels = inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        training = model.training
        masked, t = draw_masks(
            labels,
            inputs["sample_index"],
            schedule=d.schedule,
            seed=d.seed,
            epoch=int(self.state.epoch or 0) if training else 0,
            stream=TRAIN_STREAM if training else EVAL_STREAM,
        )
        noisy = torch.where(masked, torch.full_like(input_ids, d.mask_token_id), input_ids)
        positions = masked.flatten().nonzero().squeeze(1)
        targets = labels.flatten()[positions]

        if positions.numel() > 0:
            token_loss, correct = d.family.masked_token_loss(
                model, noisy, attention_mask, inputs.get("position_ids"), positions, targets, d.ce_chunk_size
            )
            weights = token_weights(d.weight_kind, masked, t, geo_p=d.geo_p, attention_mask=attention_mask)
            weighted_sum = (token_loss * weights.flatten()[positions]).sum()
        else:
            # No masked token in this micro-batch (tiny t): a zero loss that still touches every
            # parameter, so distributed workers stay in step.
            weighted_sum = _zero_loss(model)
            correct = torch.zeros(0, dtype=torch.bool, device=input_ids.device)

        trainable = (labels != -100).sum()
        if d.normalization == "masked_tokens":
            ga = self.current_gradient_accumulation_steps if training else 1
            loss = weighted_sum / (masked.sum().clamp(min=1) * ga)
        else:
            denom = num_items_in_batch if num_items_in_batch is not None else trainable
            loss = weighted_sum / torch.as_tensor(denom, device=weighted_sum.device).clamp(min=1)
            if training and self.args.average_tokens_across_devices:
                # DDP averages gradients over workers; the denominator is already global.
                loss = loss * self.accelerator.num_processes

        stats = self._train_stats if training else self._eval_stats
        stats.add(
            float(correct.sum()), float(positions.numel()), float(trainable), float(t.sum()), float(t.numel())
        )
        if training:
            loss = self._check_finite(loss, model)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def _check_finite(self, loss: torch.Tensor, model) -> torch.Tensor:
        if torch.isfinite(loss):
            self._consecutive_skips = 0
            return loss
        step = self.state.global_step + 1
        if self.diffusion.nonfinite_loss == "skip" and self._consecutive_skips < self.diffusion.max_consecutive_skips:
            self._consecutive_skips += 1
            self.skipped_steps += 1
            print(f"[dllm] warning: non-finite loss at step {step}; skipping this micro-batch ({self.skipped_steps} skipped so far)", flush=True)
            return _zero_loss(model)
        raise NonFiniteLossError(
            f"the training loss became non-finite ({loss.item()}) at step {step}; stopping. "
            "Lower learning_rate, check the data, or set nonfinite_loss: skip. The last saved checkpoint is kept."
        )

    # ---- logging --------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._reduce_stats(self._train_stats, prefix=""))
        if any(k.startswith("eval_") for k in logs) and self._eval_stats.samples:
            logs.update(self._reduce_stats(self._eval_stats, prefix="eval_"))
        super().log(logs, start_time)

    def _reduce_stats(self, s: _Stats, prefix: str) -> dict[str, float]:
        elapsed = max(time.perf_counter() - s.since, 1e-9)
        vals = torch.tensor([s.correct, s.masked, s.trainable, s.mask_ratio, s.samples], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            vals = self.accelerator.reduce(vals.to(self.accelerator.device), reduction="sum").cpu()
        correct, masked, trainable, ratio, samples = vals.tolist()
        s.reset()
        out = {
            f"{prefix}masked_accuracy": correct / masked if masked else math.nan,
            f"{prefix}mask_ratio": ratio / samples if samples else math.nan,
            f"{prefix}masked_tokens": masked,
        }
        if not prefix:
            out["tokens_per_second"] = trainable / elapsed
        return out
