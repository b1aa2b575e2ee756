"""The bert method on every masked-LM encoder family: tiny random checkpoints of each architecture,
as *ForMaskedLM and as the plain encoder (*Model, whose MLM head is added), built here with the
tests' tiny tokenizer; a few LoRA steps, fuse, reload and sample."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

import dllm_trainer  # noqa: F401
from core_helpers import LogRecorder
from dllm_trainer.config import TrainConfig
from dllm_trainer.data import asset_path
from dllm_trainer.families import BERT, get_family
from tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = 500
BERTLIKE = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=128, pad_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# model_type -> (config class, config kwargs, masked-LM class, plain encoder class)
ENCODERS = {
    "bert": ("BertConfig", BERTLIKE, "BertForMaskedLM", "BertModel"),
    "roberta": ("RobertaConfig", {**BERTLIKE, "bos_token_id": 1, "eos_token_id": 2}, "RobertaForMaskedLM",
                "RobertaModel"),
    "xlm-roberta": ("XLMRobertaConfig", {**BERTLIKE, "bos_token_id": 1, "eos_token_id": 2},
                    "XLMRobertaForMaskedLM", "XLMRobertaModel"),
    "distilbert": ("DistilBertConfig", dict(vocab_size=512, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=128, pad_token_id=2, dropout=0.0,
                                            attention_dropout=0.0), "DistilBertForMaskedLM", "DistilBertModel"),
    "deberta-v2": ("DebertaV2Config", {**BERTLIKE, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                       "position_biased_input": False, "position_buckets": 16},
                   "DebertaV2ForMaskedLM", "DebertaV2Model"),
    "electra": ("ElectraConfig", {**BERTLIKE, "embedding_size": 16}, "ElectraForMaskedLM", "ElectraModel"),
    "modernbert": ("ModernBertConfig", dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=128, pad_token_id=2,
                                            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
                   "ModernBertForMaskedLM", "ModernBertModel"),
}
CASES = [(mt, variant) for mt in ENCODERS for variant in ("mlm", "encoder")]


def build_encoder(path: Path, model_type: str, variant: str) -> Path:
    import transformers

    cfg_cls, kwargs, mlm_cls, base_cls = ENCODERS[model_type]
    torch.manual_seed(0)
    model = getattr(transformers, mlm_cls if variant == "mlm" else base_cls)(getattr(transformers, cfg_cls)(**kwargs))
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_the_bert_family_lists_every_encoder():
    for model_type, (_, _, mlm_cls, base_cls) in ENCODERS.items():
        assert model_type in BERT.model_types
        assert mlm_cls in BERT.architectures and base_cls in BERT.architectures


@pytest.mark.slow
@pytest.mark.parametrize("model_type,variant", CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_train_fuse_reload_sample(tmp_path, model_type, variant):
    from dllm_trainer.sampling import chat, generate
    from dllm_trainer.training.export import fuse_adaptor
    from dllm_trainer.training.train import run_training

    model_dir = build_encoder(tmp_path / "model", model_type, variant)
    cfg = TrainConfig.from_dict(dict(
        model_name=str(model_dir), dataset_name=str(asset_path("chat_small.jsonl")), output_dir=str(tmp_path / "out"),
        training_method="bert", train_device="cpu", max_length=64, batch_size=8, num_train_epochs=0, train_steps=6,
        logging_steps=1, eval_strategy="no", save_steps=1000, warmup_ratio=0, seed=3, lora=True, lora_r=4,
        lora_alpha=8, learning_rate=1e-2))
    probe = torch.tensor([[20, 21, MASK, MASK, 22, MASK, 23]])
    seen = {}

    def grab(model):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=probe).logits.detach().clone()

    rec = LogRecorder(on_end=grab)
    lines: list[str] = []
    result = run_training(cfg, log=lines.append, extra_callbacks=[rec])
    losses = rec.train_losses()
    assert len(losses) >= 6 and all(math.isfinite(x) for x in losses)
    new_head = any("has no masked-LM head in its checkpoint" in ln for ln in lines)
    assert new_head == (variant == "encoder"), lines  # the plain encoder gets an MLM head, trained in full

    fused = tmp_path / "fused"
    fuse_adaptor(str(model_dir), result.adaptor_dir, str(fused), family_name="bert", log=lambda *a: None)
    conf = json.loads((fused / "config.json").read_text())
    assert conf["architectures"] == [ENCODERS[model_type][2]]  # saved as the masked-LM class
    sess = chat.load_session(str(fused), device="cpu")
    assert get_family(sess.model) is BERT and sess.mask_id == MASK
    with torch.no_grad():
        after = sess.model(input_ids=probe).logits
    assert torch.allclose(after, seen["logits"], atol=1e-4), (after - seen["logits"]).abs().max()

    out = generate(sess.model, torch.tensor([20, 21, 22]), gen_length=6, steps=6)
    assert out.shape == (9,) and not (out == MASK).any() and out[:3].tolist() == [20, 21, 22]
    o, e = io.StringIO(), io.StringIO()
    args = chat.build_parser().parse_args(["generate", "--model", str(fused), "--prompt", "What is 2 plus 5?",
                                           "--gen-length", "6", "--steps", "6", "--device", "cpu"])
    assert chat.run_generate(args, stdout=o, stderr=e) == 0, e.getvalue()
