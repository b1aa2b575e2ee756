"""The form's defaults train every supported architecture as they are; what a job saves is shared
with the group and, for a BERT whose decoder is tied to its embeddings, stays tied after LoRA."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dllm_trainer.config import MAX_LENGTH_AUTO_CAP, TrainConfig
from dllm_trainer.errors import ConfigError
from dllm_trainer.families import FAMILIES
from rel_helpers import CHAT, FIXTURES, make_llada_dir

REPO = Path(__file__).resolve().parents[1]


def form_defaults() -> dict:
    """The manifest's defaults, sent back as the form sends them (strings)."""
    params = json.loads((REPO / "index.json").read_text())["parameters"]
    return {k: ("true" if p["default"] is True else "false" if p["default"] is False else str(p["default"]))
            for k, p in params.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm):
    """One checkpoint per supported architecture: (folder, training_method, maximum positions)."""
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertModel

    root = tmp_path_factory.mktemp("arch")
    out = {"BertModel (MiniLM)": (minilm, "bert", 512)}
    tok = AutoTokenizer.from_pretrained(str(minilm))
    torch.manual_seed(0)
    mb = ModernBertModel(ModernBertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                                          bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                          cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id))
    mb.save_pretrained(str(root / "modernbert"))
    tok.save_pretrained(str(root / "modernbert"))
    out["ModernBertModel"] = (root / "modernbert", "bert", 2048)
    out["LLaDAModelLM"] = (make_llada_dir(root / "llada"), "llada", 256)
    dream = root / "dream"
    dream.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (FIXTURES / "dream-tiny" / f).exists():
            shutil.copyfile(FIXTURES / "dream-tiny" / f, dream / f)
    from tiny_tokenizer import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(str(dream))
    out["DreamModel"] = (dream, "dream", 256)
    return out


def test_manifest_lists_every_architecture_we_train(models):
    archs = json.loads((REPO / "index.json").read_text())["model_architectures"]
    assert archs == [a for fam in FAMILIES.values() for a in fam.architectures]
    for name, (path, method, _) in models.items():
        arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
        assert arch in archs and arch in FAMILIES[method].architectures, name
    assert {"BertModel", "ModernBertModel"} <= set(archs)


@pytest.mark.parametrize("arch", ["BertModel (MiniLM)", "ModernBertModel", "LLaDAModelLM", "DreamModel"])
def test_form_defaults_fit_every_architecture(arch, models, tmp_path, one_thread):
    from dllm_trainer.data import build_datasets
    from dllm_trainer.preflight import run_preflight
    from dllm_trainer.training.loading import load_for_training, resolve_max_length

    path, method, positions = models[arch]
    raw = {**form_defaults(), "model_name": str(path), "dataset_name": str(CHAT), "output_dir": str(tmp_path / "out"),
           "training_method": method, "train_device": "cpu"}
    cfg = TrainConfig.from_dict(raw)
    assert cfg.max_length == 0  # the default: the model's own limit
    model_config = run_preflight(cfg, log=lambda m: None)  # the dataset is tokenised with it too
    want = min(positions, MAX_LENGTH_AUTO_CAP)
    assert resolve_max_length(cfg, model_config) == want
    loaded = load_for_training(cfg, log=lambda m: None)
    data = build_datasets(str(CHAT), loaded.tokenizer, max_length=want, log=None)
    row = torch.tensor([data.train[0]["input_ids"]])
    with torch.no_grad():
        out = loaded.model(input_ids=row)
    assert out.logits.shape[:2] == row.shape and torch.isfinite(out.logits).all()
    # an explicit value beyond the model's positions stays an error naming max_length
    with pytest.raises(ConfigError, match=rf"max_length \({positions + 8}\) exceeds the model's maximum positions \({positions}\)"):
        run_preflight(cfg.replace(max_length=positions + 8), log=lambda m: None)


def test_max_length_note_and_explicit_values():
    from types import SimpleNamespace

    from dllm_trainer.training.loading import max_length_note, resolve_max_length

    base = TrainConfig.from_dict({"model_name": "m", "dataset_name": "d"})
    assert resolve_max_length(base, SimpleNamespace(max_position_embeddings=8192)) == MAX_LENGTH_AUTO_CAP
    assert resolve_max_length(base, SimpleNamespace(max_sequence_length=256)) == 256
    assert resolve_max_length(base, SimpleNamespace()) == MAX_LENGTH_AUTO_CAP
    assert resolve_max_length(base.replace(max_length=64), SimpleNamespace(max_position_embeddings=512)) == 64
    assert max_length_note(base, 512, SimpleNamespace(max_position_embeddings=512)) == (
        "[dllm] max_length 0 (auto): 512 tokens (the model's maximum positions are 512; auto is at most 1024)")
    assert max_length_note(base.replace(max_length=64), 64, SimpleNamespace()) is None


def test_length_note_says_which_setting_wins():
    from dllm_trainer.training.train import training_length_note

    cfg = TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", "num_train_epochs": 1, "train_steps": 500})
    assert training_length_note(cfg, 37) == ("[dllm] length: num_train_epochs 1 = 37 optimizer steps; train_steps (500) "
                                             "is not used (it applies only when num_train_epochs is 0)")
    assert training_length_note(cfg.replace(num_train_epochs=0), 500) == (
        "[dllm] length: train_steps 500 (num_train_epochs is 0) = 500 optimizer steps")


# ---------------------------------------------------------------------------------------------
# What is saved
# ---------------------------------------------------------------------------------------------


def test_fused_bert_keeps_its_decoder_tied_to_the_embeddings(tmp_path, minilm, one_thread):
    """MiniLM is a plain BertModel: the MLM head is new and trained (modules_to_save). Its decoder
    must stay the (frozen) word embeddings during LoRA training, and the fused model must be tied
    again (the base's size, not +vocab x hidden) with the logits of base + adaptor."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from dllm_trainer.training import export
    from dllm_trainer.training.loading import load_for_training

    cfg = TrainConfig.from_dict({"model_name": str(minilm), "dataset_name": "d", "train_device": "cpu",
                                 "lora_r": 8, "lora_alpha": 16})
    loaded = load_for_training(cfg, log=lambda m: None)
    model = loaded.model
    assert loaded.new_head
    emb = model.get_input_embeddings().weight
    head = model.base_model.model.cls.modules_to_save["default"]
    assert head.predictions.decoder.weight is emb and not emb.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable and not any("decoder.weight" in n for n in trainable)
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(tmp_path / "adaptor"))
    loaded.tokenizer.save_pretrained(str(tmp_path / "adaptor"))
    export.fuse_adaptor(str(minilm), str(tmp_path / "adaptor"), str(tmp_path / "fused"), family_name="bert", log=lambda m: None)

    fused = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "fused")).eval()
    assert fused.config.tie_word_embeddings
    assert fused.cls.predictions.decoder.weight is fused.bert.embeddings.word_embeddings.weight
    size, base_size = (tmp_path / "fused" / "model.safetensors").stat().st_size, (minilm / "model.safetensors").stat().st_size
    assert size < 1.05 * base_size, (size, base_size)  # was 138 MB against the base's 91 MB
    tok = AutoTokenizer.from_pretrained(str(minilm))
    batch = tok(["the river [MASK] the sea", "a b c"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_models_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    """safetensors writes 0600 and mkdtemp 0700; a saved model gets what the umask allows."""
    from transformers import BertConfig, BertForMaskedLM

    from dllm_trainer.training.export import save_model_atomic
    from dllm_trainer.training.file_modes import apply_default_modes

    model = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=8))
    old = os.umask(umask)
    try:
        save_model_atomic(model, None, str(tmp_path / "model"))
        script = tmp_path / "run.sh"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o700)
        apply_default_modes(str(script))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "model").st_mode & 0o777 == dir_mode
    files = list((tmp_path / "model").iterdir())
    assert any(f.name == "model.safetensors" for f in files)
    for f in files:
        assert f.stat().st_mode & 0o777 == file_mode, f
    assert script.stat().st_mode & 0o777 == dir_mode  # execute bits kept where the file had them
