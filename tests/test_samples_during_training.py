"""Sample prompts are generated during training (every N steps and at the end) and logged."""
import pytest

from core_helpers import copy_with_tokenizer
from tiny_tokenizer import make_tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_samples_logged_to_log_and_tensorboard(tmp_path, llada_tiny, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dllm_trainer.config import TrainConfig
    from dllm_trainer.data import asset_path
    from dllm_trainer.training.train import run_training

    model_dir = copy_with_tokenizer(llada_tiny, tmp_path / "model", make_tiny_tokenizer())
    cfg = TrainConfig.from_dict(dict(
        model_name=str(model_dir), dataset_name=str(asset_path("chat_small.jsonl")), output_dir=str(tmp_path / "out"),
        training_method="llada", train_device="cpu", lora=False, num_train_epochs=0, train_steps=6, batch_size=8,
        max_length=64, logging_steps=3, eval_strategy="no", save_steps=6,
        sample_prompts="What is 3 plus 4?\nWhat comes after 8?", sample_every_steps=3, sample_gen_length=8, sample_steps=8,
    ))
    result = run_training(cfg, log=lambda *a: None)
    steps = sorted({s for s, _, _ in result.samples})
    assert steps == [3, 6]
    assert len(result.samples) == 4 and all(isinstance(text, str) for _, _, text in result.samples)
    assert "sample @ step 3: 'What is 3 plus 4?'" in capsys.readouterr().out
    acc = EventAccumulator(str(tmp_path / "out" / "samples"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "samples/text_summary" in acc.Tags()["tensors"]
    assert len(acc.Tensors("samples/text_summary")) == 4
