"""End-to-end BERT training on the real pretrained all-MiniLM-L6-v2 (a sentence-embedding BERT without
an MLM head): full fine-tuning and LoRA through train.run_training, then the saved / fused models."""
from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest
import torch

from core_helpers import LogRecorder, write_jsonl
from dllm_trainer.training.callbacks import parse_event
from dllm_trainer.config import TrainConfig
from dllm_trainer.training.export import fuse_adaptor
from dllm_trainer.training.train import run_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

COLORS = ["red", "blue", "green", "yellow", "black", "white"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    rows = [{"prompt": f"What color is item {i}?",
             "completion": f"The item {i} is {COLORS[i % 6]} and it is very {COLORS[i % 6]}."} for i in range(80)]
    return write_jsonl(tmp_path_factory.mktemp("bert_data") / "colors.jsonl", rows)


@pytest.fixture(scope="module")
def probe(minilm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm))
    return dict(tok(["What color is item 3? The item 3 is [MASK] and it is very [MASK]."], return_tensors="pt"))


def config(minilm, dataset, out, **kw) -> TrainConfig:
    raw = dict(model_name=str(minilm), dataset_name=str(dataset), output_dir=str(out), training_method="bert",
               train_device="cpu", max_length=32, batch_size=8, num_train_epochs=0, train_steps=16, logging_steps=1,
               eval_strategy="no", save_steps=1000, warmup_ratio=0, learning_rate_schedule="constant", seed=1)
    raw.update(kw)
    return TrainConfig.from_dict({k: str(v) if not isinstance(v, str) else v for k, v in raw.items()})


def logits_at_end(probe):
    """A callback that records the in-memory model's logits on ``probe`` when training ends."""
    seen = {}

    def grab(model):
        was = model.training
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(**probe).logits.detach().clone()
        model.train(was)

    return LogRecorder(on_end=grab), seen


def assert_loss_decreased(losses: list[float], k: int = 4):
    assert len(losses) >= 2 * k and all(math.isfinite(x) for x in losses), losses
    early, late = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert late < 0.6 * early, f"loss did not decrease: first {losses[:k]}, last {losses[-k:]}"


def check_metrics(out: Path, result, steps: int):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == steps == result.global_step
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["train_loss"])
    assert 0.0 <= metrics["masked_accuracy"] <= 1.0 and 0.0 < metrics["mask_ratio"] <= 1.0
    assert "eval_loss" not in metrics  # eval_strategy "no": no row held out, nothing evaluated
    assert metrics == pytest.approx(result.metrics)
    assert glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True), "no TensorBoard events written"


def test_full_finetune_bert(minilm, dataset, probe, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "out"
    cfg = config(minilm, dataset, out, lora=False, learning_rate=2e-4)
    rec, seen = logits_at_end(probe)
    lines: list[str] = []
    result = run_training(cfg, log=lines.append, extra_callbacks=[rec])

    assert any("has no masked-LM head in its checkpoint" in ln and "trained in full" in ln for ln in lines), lines
    assert any("80 rows -> train 80, eval 0 (none (evaluation off))" in ln for ln in lines), lines
    assert_loss_decreased(rec.train_losses())
    check_metrics(out, result, 16)
    assert result.adaptor_dir is None and result.final_model_dir == str(out / "final_model")

    # the saved model loads completely and gives the trained model's logits
    model, info = AutoModelForMaskedLM.from_pretrained(result.final_model_dir, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    model.eval()
    with torch.no_grad():
        logits = model(**probe).logits
    assert torch.allclose(logits, seen["logits"], atol=1e-4), (logits - seen["logits"]).abs().max()
    tok = AutoTokenizer.from_pretrained(result.final_model_dir)
    assert tok.mask_token_id == model.config.mask_token_id == 103

    # run in-process, a person reads the output: one line per logging step, no machine events
    out = capsys.readouterr().out
    assert not [e for e in map(parse_event, out.splitlines()) if e]
    assert "[dllm] training started: 16 optimizer steps" in out and "[dllm] step 16/16: loss " in out


def test_lora_bert_fuses_into_a_loadable_model(minilm, dataset, probe, tmp_path):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "out"
    cfg = config(minilm, dataset, out, lora=True, lora_r=8, lora_alpha=16, learning_rate=1e-3, train_steps=12,
                 adaptor_name="colors-lora")
    rec, seen = logits_at_end(probe)
    lines: list[str] = []
    result = run_training(cfg, log=lines.append, extra_callbacks=[rec])

    assert any("has no masked-LM head in its checkpoint" in ln for ln in lines), lines
    assert any("LoRA r=8 alpha=16" in ln for ln in lines), lines
    assert_loss_decreased(rec.train_losses(), k=3)
    check_metrics(out, result, 12)
    adaptor = Path(result.adaptor_dir)
    assert result.final_model_dir is None and adaptor == out / "adaptors" / "colors-lora"
    assert (adaptor / "adapter_config.json").is_file() and (adaptor / "adapter_model.safetensors").is_file()
    assert not (out / "final_model").exists()

    fused_dir = tmp_path / "fused"
    fuse_adaptor(str(minilm), str(adaptor), str(fused_dir), family_name="bert", log=lambda *a: None)
    model, info = AutoModelForMaskedLM.from_pretrained(str(fused_dir), output_loading_info=True)
    model.eval()
    with torch.no_grad():
        fused_logits = model(**probe).logits
    # the fused model reproduces the adaptor-wrapped model it came from (trained head included)
    assert torch.allclose(fused_logits, seen["logits"], atol=1e-3), (fused_logits - seen["logits"]).abs().max()
    assert not info["missing_keys"], info["missing_keys"]
    assert not any("lora" in k for k in model.state_dict())
    # and it is not the base model: the base has no trained head
    base = AutoModelForMaskedLM.from_pretrained(str(minilm))
    base.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        base_logits = base(**probe).logits
    assert not torch.allclose(base_logits, fused_logits, atol=1e-2)
