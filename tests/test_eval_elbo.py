"""The periodic eval reports the Monte-Carlo ELBO likelihood bound (eval NLL + perplexity bound)."""
import math

import pytest

from core_helpers import copy_with_tokenizer
from tiny_tokenizer import make_tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_reports_elbo_bound_that_falls_with_training(tmp_path, llada_tiny):
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.data import asset_path
    from dllm_trainer.training.train import run_training

    model_dir = copy_with_tokenizer(llada_tiny, tmp_path / "model", make_tiny_tokenizer())
    cfg = TrainConfig.from_dict(dict(
        model_name=str(model_dir), dataset_name=str(asset_path("chat_small.jsonl")), output_dir=str(tmp_path / "out"),
        training_method="llada", train_device="cpu", lora=False, num_train_epochs=0, train_steps=30, batch_size=8,
        learning_rate=3e-3, max_length=64, logging_steps=10, eval_steps=10, save_steps=30, eval_elbo_samples=8,
        eval_elbo_rows=8,
    ))
    result = run_training(cfg, log=lambda *a: None)
    import json

    state = json.loads((tmp_path / "out" / "checkpoint-30" / "trainer_state.json").read_text())
    bounds = [h["eval_nll_bound"] for h in state["log_history"] if "eval_nll_bound" in h]
    assert len(bounds) >= 3, bounds
    assert bounds[-1] < bounds[0] - 0.2, bounds  # the model fits the task: the bound improves
    assert result.metrics["eval_perplexity_bound"] == pytest.approx(math.exp(result.metrics["eval_nll_bound"]))
