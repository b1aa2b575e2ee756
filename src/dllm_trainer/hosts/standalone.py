"""The host of a job run outside Transformer Lab: everything goes to stdout, the final model stays
under <output_dir>/models/<name>/. Every host adapter (hosts/) offers the same methods."""
from __future__ import annotations

import os
from typing import Any, Callable

from ..config import TrainConfig
from ..errors import ConfigError


class StandaloneReporter:
    """Outside Transformer Lab: everything goes to stdout; the model stays under output_dir."""

    name = "standalone"

    def __init__(self, log: Callable[[str], Any] = print):
        self.log = log
        self._root: str | None = None

    def progress(self, percent: float) -> None:
        pass  # the metrics lines already show step/max_steps

    def metrics(self, metrics: dict) -> None:
        pass

    def training_started(self, cfg: TrainConfig) -> None:
        self._root = cfg.output_dir
        self.log(f"[dllm] TensorBoard: tensorboard --logdir {cfg.output_dir}")

    def should_stop(self) -> bool:
        return False  # Ctrl-C, or create <output_dir>/STOP for a clean stop with a checkpoint

    def checkpoint(self, path: str, step: int) -> None:
        pass

    def checkpoint_to_resume(self) -> str | None:
        return None

    def secret(self, name: str) -> str | None:
        return None

    def resolve_model(self, name: str) -> str | None:
        return None

    def resolve_dataset(self, name: str) -> str | None:
        return None

    def model_location(self, model_id: str, output_dir: str | None = None) -> str:
        return os.path.join(output_dir or self._root or ".", "models", model_id)

    def run_dir(self, output_dir: str) -> str:
        return output_dir

    def earlier_run_dirs(self, run_dir: str) -> list[str]:
        return []

    def missing_dataset_hint(self, name: str) -> str | None:
        return None

    def model_exists(self, model_id: str, output_dir: str | None = None) -> bool:
        return os.path.lexists(self.model_location(model_id, output_dir))

    def register_model(self, staging_dir: str, model_id: str, **_: Any) -> str:
        final = self.model_location(model_id)
        if os.path.lexists(final):  # the caller picked a free name; never overwrite
            raise ConfigError(f"a model named '{model_id}' already exists at {final}")
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(staging_dir, final)
        return final

    def complete(self, message: str, score: dict) -> None:
        self.log(f"[dllm] done: {message}")

    def fail(self, reason: str) -> None:
        pass  # the error line itself is printed by the caller

    def stopped(self, message: str) -> None:
        self.log(f"[dllm] stopped: {message}")
