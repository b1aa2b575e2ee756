"""Our `dream` loss equals dllm's Dream SFT recipe (examples/dream/sft.py at ca176752) on padded
batches, with the cutoffs, and `dream_padding: ignored` keeps the previous behaviour.

The expected batches are written out by hand, and the expected losses are computed here from the
recipe's definition, independently of our collator, noise, weights and trainer code:

- collator (DreamSFTCollator): per-batch cutoff trims every response longer than one response
  length drawn from the batch; else, with probability resp_cutoff_ratio, the padded batch loses
  c ~ U{1, .., min_response - 1} tail positions. Padding: input = pad, label = pad ("finetune on
  padded <eos_token>"), attention_mask = 0.
- model: a 2-D mask with zeros becomes the pairwise mask mask[i] & mask[j] (padded positions
  attend to nothing and are seen by nothing); logits are shifted right by one.
- loss (MDLMTrainer + DreamTrainer): maskable = labels != -100 (padding included); CE of the
  shifted logits against input_ids at masked positions, weighted by CART,
  w_i = sum over unmasked j != i of 1/2 p (1-p)^(|i-j|-1) (every unmasked position counts:
  prompt and padding too), divided by the number of maskable tokens.
The mask and t are forced on both sides.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, TrainingArguments

import dllm_trainer  # noqa: F401  (registers Dream with the Auto classes)
from dllm_trainer.families import get_family
from dllm_trainer.training import trainer as trainer_mod
from dllm_trainer.training.collator import DiffusionCollator
from dllm_trainer.training.trainer import DiffusionSettings, MDLMTrainer

P = 2  # pad = eos of the fixture
BOS = 1
MASK = 500
IGN = -100
GEO_P = 0.3
DREAM = get_family("dream")


def dream(padding_mode: str):
    """The dream strategy a run with that dream_padding uses."""
    from dllm_trainer.config import TrainConfig

    return DREAM.configured(TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", "training_method": "dream",
                                                   "dream_padding": padding_mode}))

# prompt, response
ROWS = [([11, 12, 13], [21, 22, 23, 24, 25]), ([31, 32], [41, 42]), ([51, 52, 53, 54], [61, 62, 63])]

pytestmark = pytest.mark.usefixtures("one_thread")


def features():
    return [{"input_ids": p + r, "labels": [IGN] * len(p) + r, "prompt_len": len(p), "sample_index": i}
            for i, (p, r) in enumerate(ROWS)]


# The batches the recipe makes, by hand.
# Per-batch cutoff with the third response's length (3) drawn: the first response loses 24, 25.
PERBATCH = dict(
    input_ids=[[11, 12, 13, 21, 22, 23, P],
               [31, 32, 41, 42, P, P, P],
               [51, 52, 53, 54, 61, 62, 63]],
    labels=[[IGN, IGN, IGN, 21, 22, 23, P],
            [IGN, IGN, 41, 42, P, P, P],
            [IGN, IGN, IGN, IGN, 61, 62, 63]],
    attention_mask=[[1, 1, 1, 1, 1, 1, 0],
                    [1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 1, 1, 1]],
)
# No per-batch cutoff, resp_cutoff_ratio 1: the shortest response has 2 tokens, so c = 1 and the
# padded length 8 becomes 7 (the first row loses 25).
RESP_CUT = dict(
    input_ids=[[11, 12, 13, 21, 22, 23, 24],
               [31, 32, 41, 42, P, P, P],
               [51, 52, 53, 54, 61, 62, 63]],
    labels=[[IGN, IGN, IGN, 21, 22, 23, 24],
            [IGN, IGN, 41, 42, P, P, P],
            [IGN, IGN, IGN, IGN, 61, 62, 63]],
    attention_mask=[[1, 1, 1, 1, 1, 1, 1],
                    [1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 1, 1, 1]],
)
# Forced noise: masked positions (only maskable ones), including padding whose predicting output
# is itself padding (row 1, positions 5 and 6).
MASKED = [[0, 0, 0, 1, 0, 1, 1],
          [0, 0, 1, 0, 0, 1, 1],
          [0, 0, 0, 0, 1, 1, 0]]
T = [0.45, 0.7, 0.35]


@pytest.fixture(scope="module")
def model(dream_tiny):
    return AutoModel.from_pretrained(dream_tiny, dtype=torch.float32).train()


def make_trainer(model, tmp_path, padding_mode):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3)
    settings = DiffusionSettings(family=dream(padding_mode), mask_token_id=MASK, weight_kind="cart", geo_p=GEO_P,
                                 seed=1)
    trainer = MDLMTrainer(model=model, args=args, diffusion=settings)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def forced_noise(masked):
    def draw(labels, sample_index, **kw):
        m = torch.tensor(masked, dtype=torch.bool)
        assert not (m & (labels == IGN)).any()  # the forced mask only touches maskable positions
        return m, torch.tensor(T)
    return draw


def collate_with_kept(family, kept_row0_len, feats=None):
    """The per-batch cutoff draws its response length from a seeded generator: find a seed that
    drew the wanted one (kept_row0_len = the first row's length after the cut)."""
    for seed in range(100):
        batch = DiffusionCollator(family=family, pad_token_id=P, eos_token_id=P, perbatch_cutoff=True,
                                  seed=seed, bos_token_id=BOS)(feats or features())
        if int(batch["attention_mask"][0].sum()) == kept_row0_len:
            return batch
    raise AssertionError("no seed drew that cutoff")


def cart(masked: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """CART weights written out position by position."""
    B, L = masked.shape
    w = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            if masked[b, i]:
                w[b, i] = sum(0.5 * GEO_P * (1 - GEO_P) ** (abs(i - j) - 1)
                              for j in range(L) if j != i and clean[b, j])
    return w


def reference_loss(model, batch, masked, *, padding_trained: bool, isolated: bool) -> torch.Tensor:
    ids = torch.tensor(batch["input_ids"])
    labels = torch.tensor(batch["labels"])
    attn = torch.tensor(batch["attention_mask"]).bool()
    masked = torch.tensor(masked, dtype=torch.bool)
    maskable = labels != IGN
    noised = torch.where(masked, torch.full_like(ids, MASK), ids)
    # isolated: the pairwise mask dllm's Dream forward builds; else a 2-D mask hiding padded keys only
    mask = (attn[:, None, :, None] & attn[:, None, None, :]) if isolated else attn.long()
    with torch.no_grad():
        logits = model(input_ids=noised, attention_mask=mask).logits
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    nll = F.cross_entropy(shifted.transpose(1, 2), ids, reduction="none").double()
    clean = ~masked if padding_trained else (~masked & attn)
    weights = cart(masked, clean)
    return (nll * weights * masked).sum() / maskable.sum()


def our_loss(trainer, batch, masked, monkeypatch):
    monkeypatch.setattr(trainer_mod, "draw_masks", forced_noise(masked))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).double()


@pytest.mark.parametrize("cutoff", ["perbatch", "resp_cutoff"])
def test_dream_loss_equals_the_reference_recipe_on_a_padded_batch(model, tmp_path, monkeypatch, cutoff):
    if cutoff == "perbatch":
        batch, expected = collate_with_kept(DREAM, kept_row0_len=6), PERBATCH
    else:
        batch = DiffusionCollator(family=DREAM, pad_token_id=P, eos_token_id=P, perbatch_cutoff=False,
                                  resp_cutoff_ratio=1.0)(features())
        expected = RESP_CUT
    for key, want in expected.items():
        assert batch[key].tolist() == want, key
    trainer = make_trainer(model, tmp_path, "eos_trained")
    ours = our_loss(trainer, batch, MASKED, monkeypatch)
    ref = reference_loss(model, expected, MASKED, padding_trained=True, isolated=True)
    torch.testing.assert_close(ours, ref, rtol=5e-6, atol=0)
    # Both halves of the attention handling matter on this batch: padded positions predicting
    # padding see nothing, and the padding is clean CART context.
    keys_only = reference_loss(model, expected, MASKED, padding_trained=True, isolated=False)
    assert abs(float(keys_only - ref)) > 1e-4 * float(ref)
    assert trainer._train_stats.trainable == sum(v != IGN for row in expected["labels"] for v in row)


# mask_prompt_loss off: every token is trained, so dllm's trainer puts a BOS (label -100) in front
# of every row (the first token must be predicted by an output before it). Per-batch cutoff as above.
NO_PROMPT_MASK = dict(
    input_ids=[[BOS, 11, 12, 13, 21, 22, 23, P],
               [BOS, 31, 32, 41, 42, P, P, P],
               [BOS, 51, 52, 53, 54, 61, 62, 63]],
    labels=[[IGN, 11, 12, 13, 21, 22, 23, P],
            [IGN, 31, 32, 41, 42, P, P, P],
            [IGN, 51, 52, 53, 54, 61, 62, 63]],
    attention_mask=[[1, 1, 1, 1, 1, 1, 1, 0],
                    [1, 1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 1, 1, 1, 1]],
)
MASKED_NO_PROMPT_MASK = [[0, 1, 0, 1, 0, 0, 1, 1],
                         [0, 1, 1, 0, 0, 0, 1, 1],
                         [0, 0, 1, 0, 0, 1, 1, 0]]


def test_dream_with_trained_first_tokens_gets_a_bos_as_the_reference(model, tmp_path, monkeypatch):
    feats = [{**f, "labels": list(f["input_ids"])} for f in features()]
    batch = collate_with_kept(DREAM, kept_row0_len=7, feats=feats)
    for key, want in NO_PROMPT_MASK.items():
        assert batch[key].tolist() == want, key
    trainer = make_trainer(model, tmp_path, "eos_trained")
    ours = our_loss(trainer, batch, MASKED_NO_PROMPT_MASK, monkeypatch)
    ref = reference_loss(model, NO_PROMPT_MASK, MASKED_NO_PROMPT_MASK, padding_trained=True, isolated=True)
    torch.testing.assert_close(ours, ref, rtol=5e-6, atol=0)
    # with a prompt in every row (the first label is -100) no BOS is added
    plain = collate_with_kept(DREAM, kept_row0_len=6)
    assert plain["input_ids"].tolist() == PERBATCH["input_ids"]


def test_dream_padding_ignored_keeps_the_previous_behaviour(model, tmp_path, monkeypatch):
    batch = collate_with_kept(dream("ignored"), kept_row0_len=6)
    labels = [[v if a else IGN for v, a in zip(row, att)]
              for row, att in zip(PERBATCH["labels"], PERBATCH["attention_mask"])]
    assert batch["labels"].tolist() == labels and batch["input_ids"].tolist() == PERBATCH["input_ids"]
    masked = [[m if lab != IGN else 0 for m, lab in zip(mr, lr)] for mr, lr in zip(MASKED, labels)]
    trainer = make_trainer(model, tmp_path, "ignored")
    ours = our_loss(trainer, batch, masked, monkeypatch)
    ref = reference_loss(model, dict(PERBATCH, labels=labels), masked, padding_trained=False, isolated=False)
    torch.testing.assert_close(ours, ref, rtol=5e-6, atol=0)
    trained = make_trainer(model, tmp_path, "eos_trained")
    default = our_loss(trained, collate_with_kept(DREAM, kept_row0_len=6), MASKED, monkeypatch)
    assert abs(float(default - ours)) > 0.02 * float(ours)  # the two recipes differ on padded batches


def test_dream_padding_config():
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.errors import ConfigError

    base = {"model_name": "m", "dataset_name": "d", "training_method": "dream"}
    assert TrainConfig.from_dict(base).dream_padding == "eos_trained"
    cfg = TrainConfig.from_dict({**base, "dream_padding": "ignored"})
    assert DREAM.configured(cfg).padding == DREAM.padding_option("ignored") != DREAM.padding
    assert DREAM.configured(TrainConfig.from_dict(base)).padding == DREAM.padding == DREAM.padding_option("eos_trained")
    with pytest.raises(ConfigError, match="dream_padding"):
        TrainConfig.from_dict({**base, "dream_padding": "eos"})
