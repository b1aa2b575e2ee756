"""Measure the peak memory of the training steps of one job on CPU (run as a subprocess by
tests/test_memory_plan.py): `python memory_probe.py JOB.json` prints one JSON line.

baseline: resident memory right before the model is loaded (Python, torch, the data).
peak: the process's peak resident memory during `trainer.train()` (Linux VmHWM, reset to the
current resident size when training starts, through /proc/self/clear_refs), so loading and the
final save are not part of it. Checkpoint writing is switched off: the estimate is about the
training steps. The caller sets MALLOC_MMAP_THRESHOLD_ so freed tensors go back to the system
and the resident size follows the live tensors instead of the allocator's cached free memory.
"""
from __future__ import annotations

import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def main(path: str) -> None:
    import torch

    torch.set_num_threads(1)
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.training import loading, train
    from dllm_trainer.training.trainer import MDLMTrainer

    cfg = TrainConfig.from_dict(json.load(open(path)))
    seen: dict[str, int] = {}
    load = loading.load_for_training

    def load_and_mark(*a, **kw):
        seen["baseline"] = _status("VmRSS")
        return load(*a, **kw)

    loading.load_for_training = load_and_mark
    fit = MDLMTrainer.train

    def train_and_measure(self, *a, **kw):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident size to the current one
        out = fit(self, *a, **kw)
        seen["peak"] = _status("VmHWM")
        return out

    MDLMTrainer.train = train_and_measure
    MDLMTrainer._save_checkpoint = lambda self, model, trial: None
    train.run_training(cfg, log=lambda *_: None)
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
