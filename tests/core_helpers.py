"""Small helpers shared by the core tests (config/noise/training/families)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback


def tiny_bert(vocab_size: int = 40, seed: int = 0):
    """A randomly initialised 1-layer BertForMaskedLM without dropout (deterministic forward)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg)


class LogRecorder(TrainerCallback):
    """Keeps every `logs` dict the Trainer emits and lets a test look at the model at the end."""

    def __init__(self, on_end=None):
        self.logs: list[dict] = []
        self.on_end = on_end

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.logs.append(dict(logs, step=state.global_step))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.on_end is not None:
            self.on_end(model)

    def train_losses(self) -> list[float]:
        return [e["loss"] for e in self.logs if "loss" in e and "eval_loss" not in e]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def copy_with_tokenizer(src: Path, dst: Path, tokenizer) -> Path:
    """A copy of a fixture checkpoint with a tokenizer saved beside it."""
    shutil.copytree(src, dst)
    tokenizer.save_pretrained(dst)
    return dst


def tiny_tokenizer_without_mask(vocab_size: int = 512):
    """The tests' tiny tokenizer with its mask token replaced by an ordinary reserved token: same
    size (so a new mask token needs a bigger embedding matrix) and no ``mask_token``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tiny_tokenizer import BOS, CHAT_TEMPLATE, EOS, MASK, ROLE_TOKENS, UNK, make_tiny_tokenizer

    vocab = dict(make_tiny_tokenizer(vocab_size=vocab_size).get_vocab())
    vocab["<|reserved_no_mask|>"] = vocab.pop(MASK)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([UNK, BOS, EOS, *ROLE_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                 model_max_length=4096)
    hf.chat_template = CHAT_TEMPLATE
    assert hf.mask_token_id is None and len(hf) == vocab_size
    return hf
