"""MDLMTrainer: HF Trainer with the masked-diffusion loss.

A training step, top to bottom (`compute_loss`):
1. draw per-sample mask ratios t and masks from (seed, epoch, sample_index)      -> noise.py
   (per packed segment when the batch is packed)                                  -> packing.py
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
from dataclasses import dataclass

import torch
from transformers import Trainer

from ..errors import UserError
from ..families import FamilyStrategy
from .loss_weights import token_weights
from .noise import EVAL_STREAM, TRAIN_STREAM, NoiseSchedule, draw_masks
from .packing import is_packed, packed_masked_token_loss, packed_noise_and_weights


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
    elbo_samples: int = 0  # Monte-Carlo samples per row for the eval likelihood bound (0: off)
    elbo_rows: int = 32
    max_consecutive_skips: int = 10


class _Stats:
    """Sums between two log lines (per worker; reduced over workers when logged).

    Kept as one small tensor on the device and added to without reading it back: a float() per
    micro-batch would make the host wait for the device at every step just for numbers that are
    only printed every logging_steps. Reading an attribute (``.masked``) does sync.
    """

    FIELDS = ("correct", "masked", "trainable", "mask_ratio", "samples")

    def __init__(self):
        self.sums: torch.Tensor | None = None
        self.since = time.perf_counter()

    def add(self, correct, masked, trainable, mask_ratio_sum, samples):
        """Each value a number or a 0-d tensor (on the training device)."""
        vals = [correct, masked, trainable, mask_ratio_sum, samples]
        device = next((v.device for v in vals if isinstance(v, torch.Tensor)), torch.device("cpu"))
        row = torch.stack([torch.as_tensor(v, device=device).to(torch.float64) for v in vals])
        self.sums = row if self.sums is None else self.sums.add_(row.to(self.sums.device))

    def values(self) -> list[float]:
        return [0.0] * 5 if self.sums is None else self.sums.tolist()

    def __getattr__(self, name):
        if name in _Stats.FIELDS:
            return self.values()[_Stats.FIELDS.index(name)]
        raise AttributeError(name)

    def reset(self):
        self.__init__()


def _zero_loss(model) -> torch.Tensor:
    """A loss of exactly 0 that still touches every trainable parameter (so distributed workers
    stay in step) and gives them zero gradients, unlike multiplying a NaN loss by 0."""
    return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)


class EpochSeededSampler(torch.utils.data.Sampler):
    """A random order of the rows seeded by (seed, epoch) only, optionally length-grouped like
    HF's LengthGroupedSampler (megabatches of `group_size` rows sorted by length). The epoch comes
    from `set_epoch` (HF/accelerate call it each epoch), else from `epoch_fn`."""

    def __init__(self, num_rows: int, seed: int, *, lengths=None, group_size: int = 1, epoch_fn=None):
        self.num_rows = num_rows
        self.seed = int(seed)
        self.lengths = list(lengths) if lengths is not None else None
        self.group_size = max(1, int(group_size))
        self.epoch_fn = epoch_fn
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        import numpy as np
        from transformers.trainer_pt_utils import get_length_grouped_indices

        epoch = self.epoch if self.epoch is not None else (self.epoch_fn() if self.epoch_fn else 0)
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, 0x5EED, epoch]).generate_state(1, np.uint64)[0] >> 1))
        if self.lengths is None:
            return iter(torch.randperm(self.num_rows, generator=g).tolist())
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))


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
        epoch = int(self.state.epoch or 0) if training else 0
        stream = TRAIN_STREAM if training else EVAL_STREAM
        # Padding-free packed batch (packing.py): noise and loss weights are drawn per original row
        # and scattered into the packed layout, so each segment gets exactly its unpacked noise.
        packed = is_packed(inputs)
        if packed:
            masked, t, packed_weights = packed_noise_and_weights(
                inputs, schedule=d.schedule, seed=d.seed, epoch=epoch, stream=stream,
                weight_kind=d.weight_kind, geo_p=d.geo_p,
            )
        else:
            masked, t = draw_masks(
                labels, inputs["sample_index"], schedule=d.schedule, seed=d.seed, epoch=epoch, stream=stream
            )
        noisy = torch.where(masked, torch.full_like(input_ids, d.mask_token_id), input_ids)
        positions = masked.flatten().nonzero().squeeze(1)
        targets = labels.flatten()[positions]

        if positions.numel() > 0:
            # The weights go into the model's head: with them it computes sum_i w_i * CE_i and its
            # gradients in one fused pass (output_head.py) instead of per-token losses.
            if packed:  # block-diagonal attention, per-segment positions and Dream shift
                weights = packed_weights
                weighted_sum, correct = packed_masked_token_loss(
                    d.family, model, noisy, inputs["segment_ids"], inputs["position_ids"], positions, targets,
                    d.ce_chunk_size, target_weights=weights.flatten()[positions],
                )
            else:
                padding = d.family.padding  # trained Dream padding: isolated in attention, clean CART context
                weights = token_weights(d.weight_kind, masked, t, geo_p=d.geo_p,
                                        attention_mask=padding.context_mask(attention_mask))
                weighted_sum, correct = d.family.masked_token_loss(
                    model, noisy, padding.model_attention_mask(attention_mask), inputs.get("position_ids"),
                    positions, targets, d.ce_chunk_size, target_weights=weights.flatten()[positions],
                )
        else:
            # No masked token in this micro-batch (tiny t): a zero loss that still touches every
            # parameter, so distributed workers stay in step.
            weighted_sum = _zero_loss(model)
            correct = torch.zeros(0, dtype=torch.bool, device=input_ids.device)

        trainable = (labels != -100).sum()
        if d.normalization == "masked_tokens":
            ga = getattr(self, "current_gradient_accumulation_steps", 1) if training else 1
            loss = weighted_sum / (masked.sum().clamp(min=1) * ga)
        else:
            denom = num_items_in_batch if num_items_in_batch is not None else trainable
            loss = weighted_sum / torch.as_tensor(denom, device=weighted_sum.device).clamp(min=1)
            if training and self.args.average_tokens_across_devices:
                # DDP averages gradients over workers; the denominator is already global.
                loss = loss * self.accelerator.num_processes

        stats = self._train_stats if training else self._eval_stats
        stats.add(correct.sum(), positions.numel(), trainable, t.sum(), t.numel())
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

    # ---- exact resume: data order and atomic checkpoints (reliability; see checkpoints.py) -------
    _checkpoint_staging_root: str | None = None  # set while AtomicCheckpointWriter saves

    def _get_train_sampler(self, train_dataset=None):
        """HF's random / length-grouped order, but drawn from (data_seed, epoch) alone: HF's
        LengthGroupedSampler draws from the global torch RNG, so a run resumed into a later epoch
        would see another order than the uninterrupted run."""
        sampler = super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = self.args.train_sampling_strategy
        if sampler is None or not (strategy == "group_by_length" or type(sampler) is torch.utils.data.RandomSampler):
            return sampler
        lengths = getattr(sampler, "lengths", None) if strategy == "group_by_length" else None
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSeededSampler(len(dataset), seed, lengths=lengths,
                                  group_size=self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                  epoch_fn=lambda: int(self.state.epoch or 0))

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial):
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is not None and self.state.global_step >= max_steps:
            # The checkpoint already holds the last step: HF would train one step more.
            return num_train_epochs, 0
        return epochs_trained, steps_in_epoch

    def _get_output_dir(self, trial):
        # While a checkpoint is saved, HF's own checkpoint code writes into the staging folder.
        return self._checkpoint_staging_root or super()._get_output_dir(trial)

    # ---- saved folders load anywhere (export.make_portable): checkpoints and the final model --------
    export_base: str | None = None  # the base model (path or Hub id) the saved folders take files from
    export_trust_remote_code: bool = False

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.export_base is not None and self.args.should_save:  # FSDP/DeepSpeed call _save on every worker
            from .export import make_portable

            make_portable(output_dir or self.args.output_dir, self.export_base,
                          trust_remote_code=self.export_trust_remote_code)

    def _save_checkpoint(self, model, trial):
        """HF's checkpoint, written to a staging folder and renamed into place (checkpoints.py)."""
        from .checkpoints import AtomicCheckpointWriter

        if self.is_fsdp_enabled:  # after an evaluation or samples: save from the sharded parameters
            from .distributed import reshard_fsdp

            reshard_fsdp(self.model)
        writer = AtomicCheckpointWriter(self, super()._get_output_dir(trial))
        writer.save(model, lambda: Trainer._save_checkpoint(self, model, trial))

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """HF's eval loss (fixed noise) plus, when enabled, the Monte-Carlo ELBO likelihood bound."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.diffusion.elbo_samples > 0 and dataset is not None and len(dataset) > 0:
            extra = self._elbo_metrics(dataset, metric_key_prefix)
            self.log(extra)
            metrics.update(extra)
        return metrics

    def _elbo_metrics(self, dataset, prefix: str) -> dict[str, float]:
        from ..evaluation.elbo import corpus_elbo

        d = self.diffusion
        rows = dataset.select(range(min(d.elbo_rows, len(dataset))))
        pairs = [(r["input_ids"][: r["prompt_len"]], r["input_ids"][r["prompt_len"]:]) for r in rows]
        pairs = [p for p in pairs if len(p[1]) > 0]
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                res = corpus_elbo(model, pairs, mc_num=d.elbo_samples, batch_size=min(16, d.elbo_samples),
                                  seed=d.seed, mask_token_id=d.mask_token_id)
        finally:
            model.train(was_training)
        return {f"{prefix}_nll_bound": res["nll_per_token"], f"{prefix}_perplexity_bound": res["perplexity_bound"]}

    # ---- logging --------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._reduce_stats(self._train_stats, prefix=""))
        if any(k.startswith("eval_") for k in logs) and self._eval_stats.samples:
            logs.update(self._reduce_stats(self._eval_stats, prefix="eval_"))
        super().log(logs, start_time)

    def _reduce_stats(self, s: _Stats, prefix: str) -> dict[str, float]:
        elapsed = max(time.perf_counter() - s.since, 1e-9)
        vals = torch.tensor(s.values(), dtype=torch.float64)
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
