"""a2d: causal LMs turned into masked diffusion LMs (bidirectional attention through transformers'
config.is_causal switch, a mask token, the Dream-style logits shift, EOS padding), on tiny random
checkpoints of several architectures built here."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import dllm_trainer  # noqa: F401
from core_helpers import LogRecorder, tiny_tokenizer_without_mask
from dllm_trainer.config import TrainConfig
from dllm_trainer.data import asset_path
from dllm_trainer.errors import ConfigError, ModelError
from dllm_trainer.families import A2D, get_family
from dllm_trainer.models.a2d import MARKER_KEY, check_bidirectional
from dllm_trainer.training.collator import DiffusionCollator
from dllm_trainer.training.loading import MASK_TOKEN_ADDED

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 2
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.05, bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS)
# model_type -> (config class, extra config) for every architecture the a2d family lists
ARCHS = {
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "layer_types": ["full_attention"] * 2}),
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None}),
    "smollm3": ("SmolLM3Config", {}),
    "phi3": ("Phi3Config", {}),
}


def tiny_causal_lm(model_type: str, seed: int = 0, **changes):
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, extra = ARCHS[model_type]
    kwargs = {**SMALL, **extra, **changes}
    kwargs = {k: v for k, v in kwargs.items() if not (k == "num_key_value_heads" and v is None)}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs)).eval()


def save_causal_lm(path: Path, model_type: str, tokenizer=None, **changes) -> Path:
    tiny_causal_lm(model_type, **changes).save_pretrained(path)
    (tokenizer or tiny_tokenizer_without_mask()).save_pretrained(path)
    return path


def later_token_effect(model, ids: torch.Tensor) -> torch.Tensor:
    """Per position, how much the logits change when only the LAST token changes."""
    other = ids.clone()
    other[:, -1] = (ids[:, -1] + 7) % 400
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=other).logits
    return (a - b).abs().amax(-1)[0, :-1]


def safetensor_keys(folder: Path) -> set[str]:
    keys = set()
    for f in folder.glob("model*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


# ------------------------------------------------------------------------------ bidirectionality


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_adapt_makes_every_listed_architecture_bidirectional(tmp_path, model_type):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    assert model_type in A2D.model_types
    model = tiny_causal_lm(model_type)
    ids = torch.randint(3, 400, (1, 10), generator=torch.Generator().manual_seed(1))
    assert later_token_effect(model, ids).max() == 0  # causal: no position sees the last token
    with pytest.raises(ModelError, match="still attends causally"):
        check_bidirectional(model)
    lines = []
    A2D.adapt(model, 500, log=lines.append)
    assert any("bidirectional" in ln and "500" in ln for ln in lines), lines
    assert (later_token_effect(model, ids) > 1e-5).all()  # every earlier position sees it now
    # survives save/reload with plain transformers (config.json carries is_causal=false) ...
    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["is_causal"] is False and conf[MARKER_KEY] == {"mask_token_id": 500, "shift_logits": True}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (later_token_effect(reloaded, ids) > 1e-5).all()
    assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    # ... and a peft wrapper
    peft_model = get_peft_model(reloaded, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    assert (later_token_effect(peft_model, ids) > 1e-5).all()


def test_other_causal_lms_are_tried_and_refused_if_they_stay_causal():
    from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

    from dllm_trainer.families import BERT, family_of_model_type

    assert "gpt2" not in A2D.model_types and family_of_model_type("gpt2") is A2D
    assert family_of_model_type("roberta") is BERT and family_of_model_type("camembert") is None  # encoders
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    A2D.adapt(gpt2, 5, log=lambda *a: None)
    assert (later_token_effect(gpt2, torch.randint(3, 400, (1, 8))) > 1e-5).all()
    # a recurrent model has no attention to switch: refused with a clear message
    assert family_of_model_type("mamba") is A2D
    mamba = MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=16, state_size=4, num_hidden_layers=1)).eval()
    with pytest.raises(ModelError, match="still attends causally"):
        A2D.adapt(mamba, 5, log=lambda *a: None)


def test_padding_is_still_masked_and_eager_matches_sdpa():
    model = tiny_causal_lm("qwen2")
    A2D.adapt(model, 500, log=lambda *a: None)
    ids = torch.randint(3, 400, (1, 8), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.full((1, 3), EOS)], dim=1)
    attn = torch.cat([torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    other = padded.clone()
    other[0, -1] = 300  # a change under the padding mask is invisible
    with torch.no_grad():
        a = model(input_ids=padded, attention_mask=attn).logits[:, :8]
        b = model(input_ids=other, attention_mask=attn).logits[:, :8]
        c = model(input_ids=ids).logits
        model.set_attn_implementation("eager")
        d = model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-5)  # padded row == the unpadded sequence
    assert torch.allclose(c, d, atol=1e-5)  # the switch is the same in eager attention


# ------------------------------------------------------------------------------ logits shift


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no-shift"])
def test_masked_token_loss_uses_output_i_minus_1_with_the_shift(shift):
    model = tiny_causal_lm("llama")
    fam = A2D.configured(TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", "training_method": "a2d",
                                                "a2d_shift_logits": shift}))
    fam.adapt(model, 500, log=lambda *a: None)
    assert get_family(model) == fam and get_family(model).shift_logits is shift  # read back from the marker
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (2, 12), generator=g)
    positions = torch.tensor([0, 3, 7, 12, 13, 23])  # 12: first position of row 1
    ids.view(-1)[positions] = 500
    targets = torch.randint(3, 400, (6,), generator=g)
    with torch.no_grad():
        loss, correct = fam.masked_token_loss(model, ids, torch.ones_like(ids), None, positions, targets)
        logits = model(input_ids=ids).logits
    # which output predicts each token, written out by hand: (row, output index)
    src = ([(0, 0), (0, 2), (0, 6), (1, 0), (1, 0), (1, 10)] if shift
           else [(0, 0), (0, 3), (0, 7), (1, 0), (1, 1), (1, 11)])
    picked = torch.stack([logits[b, i] for b, i in src])
    assert torch.allclose(loss, F.cross_entropy(picked, targets, reduction="none"), atol=1e-5)
    assert torch.equal(correct, picked.argmax(-1) == targets)
    # the samplers ask for the same outputs
    from dllm_trainer.sampling.fast_dllm import ModelCaller

    caller = ModelCaller(model, fam, attention_mask=None, position_ids=None, mask_token_id=500)
    cols = torch.tensor([1, 5, 11])
    with torch.no_grad():
        got, _ = caller(ids, cols)
    want = logits[:, cols - 1] if shift else logits[:, cols]
    assert torch.allclose(got, want, atol=1e-5)


def test_the_shift_carries_the_causal_heads_knowledge_over():
    """A tiny Llama trained autoregressively on stepping character cycles, then converted: with the
    shift its masked tokens are predicted well from the start; without it they are not."""
    import dataclasses

    model = tiny_causal_lm("llama").train()
    g = torch.Generator().manual_seed(0)

    def cycles(n, length=16):
        start, step = torch.randint(0, 8, (n, 1), generator=g), torch.randint(1, 3, (n, 1), generator=g)
        return 10 + (start + step * torch.arange(length)) % 8

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        x = cycles(8)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    A2D.adapt(model, 500, log=lambda *a: None)
    x = cycles(64)
    masked = torch.rand(x.shape, generator=g) < 0.15
    masked[:, :2] = False
    positions = masked.flatten().nonzero().squeeze(1)
    acc = {}
    with torch.no_grad():
        for shift in (True, False):
            fam = dataclasses.replace(A2D, shift_logits=shift)
            _, correct = fam.masked_token_loss(model, x.masked_fill(masked, 500), None, None, positions,
                                               x.flatten()[positions])
            acc[shift] = correct.float().mean().item()
    assert acc[True] > 0.6 and acc[False] < 0.4, acc


def test_a2d_pads_with_trainable_eos_and_defaults():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "prompt_len": 2, "sample_index": 0},
            {"input_ids": [5, 6, 9], "labels": [-100, -100, 9], "prompt_len": 2, "sample_index": 1}]
    batch = DiffusionCollator(family=A2D, pad_token_id=EOS, eos_token_id=EOS)(rows)
    assert batch["input_ids"][1].tolist() == [5, 6, 9, EOS] and batch["labels"][1].tolist() == [-100, -100, 9, EOS]
    assert (batch["attention_mask"] == 1).all()
    cfg = TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", "training_method": "a2d"})
    assert cfg.a2d_shift_logits is True and cfg.loss_weight == ("scheduler", None)
    cart = cfg.replace(loss_weight_type="cart[geo_p:0.3]")
    assert cart.loss_weight == ("cart", 0.3)


# ------------------------------------------------------------------------------ wrong models / methods


def test_method_and_model_mismatches_are_clear(tmp_path, llada_tiny):
    from dllm_trainer.sampling.chat import load_session
    from dllm_trainer.training.loading import check_family, load_model_config

    qwen = save_causal_lm(tmp_path / "qwen", "qwen2")
    conf = load_model_config(str(qwen))
    base = {"model_name": str(qwen), "dataset_name": "d", "max_length": 64}
    with pytest.raises(ConfigError, match="use training_method 'a2d'"):
        check_family(conf, TrainConfig.from_dict({**base, "training_method": "llada"}))
    assert check_family(conf, TrainConfig.from_dict({**base, "training_method": "a2d"})) is A2D
    with pytest.raises(ConfigError, match="use training_method 'llada'"):
        check_family(load_model_config(str(llada_tiny)), TrainConfig.from_dict({**base, "training_method": "a2d"}))
    # an unconverted causal LM is not a diffusion LM: sampling it says how to convert it
    with pytest.raises(ModelError, match="training_method 'a2d'"):
        load_session(str(qwen), device="cpu")


# ------------------------------------------------------------------------------ LoRA fuse, tied embeddings


def test_lora_fuse_of_tied_qwen2_keeps_the_trained_mask_row(tmp_path):
    """LoRA + the trainable mask-token row on a tied-embedding Qwen2 (mask token added, embeddings
    resized), fused into the base: the fused model computes what the trained adaptor did."""
    from dllm_trainer.sampling.chat import load_session
    from dllm_trainer.training.export import fuse_adaptor
    from dllm_trainer.training.loading import load_for_training

    model_dir = save_causal_lm(tmp_path / "model", "qwen2")
    cfg = TrainConfig.from_dict({"model_name": str(model_dir), "dataset_name": "d", "training_method": "a2d",
                                 "train_device": "cpu", "max_length": 64, "lora": True, "lora_r": 4, "lora_alpha": 8})
    loaded = load_for_training(cfg, log=lambda *a: None)
    assert loaded.mask_token_id == 512
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands in for training: every trainable tensor moves
        for name, p in loaded.model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    trained = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens" in n for n in trained) and any("lora_B" in n for n in trained)
    probe = torch.tensor([[1, 20, 512, 512, 21, 512]])
    with torch.no_grad():
        want = loaded.model.eval()(input_ids=probe).logits
    loaded.model.save_pretrained(tmp_path / "adaptor")
    loaded.tokenizer.save_pretrained(tmp_path / "adaptor")
    fuse_adaptor(str(model_dir), str(tmp_path / "adaptor"), str(tmp_path / "fused"), family_name="a2d",
                 log=lambda *a: None)
    sess = load_session(str(tmp_path / "fused"), device="cpu")
    assert sess.model.config.tie_word_embeddings and sess.mask_id == 512
    with torch.no_grad():
        got = sess.model(input_ids=probe).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


# ------------------------------------------------------------------------------ end to end


# LoRA on a tiny random model learns little through a frozen random output head: the untied Llama
# also adapts lm_head (the tied Qwen2 is trained in full; its LoRA fuse is tested above).
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"


@pytest.mark.slow
@pytest.mark.parametrize("model_type,lora,shift", [("llama", True, True), ("qwen2", False, False)],
                         ids=["llama-lora-shift", "qwen2-full-noshift"])
def test_train_fuse_reload_sample(tmp_path, model_type, lora, shift):
    from transformers import AutoModelForCausalLM

    from dllm_trainer.sampling import chat, generate
    from dllm_trainer.training.export import fuse_adaptor
    from dllm_trainer.training.train import run_training

    model_dir = save_causal_lm(tmp_path / "model", model_type)
    raw = dict(model_name=str(model_dir), dataset_name=str(asset_path("chat_small.jsonl")),
               output_dir=str(tmp_path / "out"), training_method="a2d", a2d_shift_logits=shift, train_device="cpu",
               max_length=64, batch_size=8, num_train_epochs=0, train_steps=40, logging_steps=1,
               eval_strategy="steps", eval_steps=10, save_steps=1000, warmup_ratio=0, learning_rate_schedule="constant",
               seed=3, lora=lora, learning_rate=1e-2 if lora else 3e-3, lora_r=8, lora_alpha=16,
               lora_target_modules=LORA_TARGETS)
    cfg = TrainConfig.from_dict(raw)
    probe = torch.tensor([[1, 20, 21, 22, 512, 512, 512, 23]])
    seen = {}

    def grab(model):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=probe).logits.detach().clone()

    rec = LogRecorder(on_end=grab)
    lines: list[str] = []
    result = run_training(cfg, log=lines.append, extra_callbacks=[rec])

    # the tokenizer had no mask token: one was added (id 512, after the 512-token vocabulary) and logged
    assert any(MASK_TOKEN_ADDED in ln and "512" in ln and "resized" in ln for ln in lines), lines
    assert any("a2d:" in ln and "bidirectional" in ln for ln in lines), lines
    losses = rec.train_losses()
    assert len(losses) >= 40 and all(math.isfinite(x) for x in losses)
    early, late = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert late < 0.75 * early, losses
    evals = [e["eval_loss"] for e in rec.logs if "eval_loss" in e]
    assert len(evals) >= 4 and min(evals[1:]) < evals[0], evals

    if lora:
        saved = tmp_path / "fused"
        fuse_adaptor(str(model_dir), result.adaptor_dir, str(saved), family_name="a2d",
                     family=A2D.configured(cfg), log=lambda *a: None)
    else:
        saved = Path(result.final_model_dir)
    # the base's own format (class, weight names) plus the marker
    conf = json.loads((saved / "config.json").read_text())
    assert conf["architectures"] == json.loads((model_dir / "config.json").read_text())["architectures"]
    assert conf[MARKER_KEY] == {"mask_token_id": 512, "shift_logits": shift} and conf["is_causal"] is False
    assert safetensor_keys(saved) == safetensor_keys(model_dir)

    # reload as our samplers do: same logits as the trained model, bidirectional, shift from the marker
    sess = chat.load_session(str(saved), device="cpu")
    assert sess.family.name == "a2d" and sess.family.shift_logits is shift and sess.mask_id == 512
    with torch.no_grad():
        after = sess.model(input_ids=probe).logits
    assert torch.allclose(after, seen["logits"], atol=1e-4), (after - seen["logits"]).abs().max()
    assert (later_token_effect(sess.model, probe) > 1e-6).all()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=probe[:, :4]).logits, after[:, :4, :512], atol=1e-3)  # it trained

    # sample: the library and the CLI
    prompt = sess.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 5?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
    out = generate(sess.model, torch.tensor(prompt), gen_length=8, steps=8)
    assert out.shape == (len(prompt) + 8,) and not (out == 512).any() and out[:len(prompt)].tolist() == prompt
    o, e = io.StringIO(), io.StringIO()
    args = chat.build_parser().parse_args(["generate", "--model", str(saved), "--prompt", "What is 2 plus 5?",
                                           "--gen-length", "8", "--steps", "8", "--device", "cpu"])
    assert chat.run_generate(args, stdout=o, stderr=e) == 0, e.getvalue()
