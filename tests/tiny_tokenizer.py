"""A tiny character-level tokenizer built locally (no Hub access) for tests.

Its special ids match the parity fixtures in tests/fixtures (LLaDA-tiny / Dream-tiny):
vocab 512, mask id 500 (``<|mdm_mask|>``), eos = pad = id 2 (``<|endoftext|>``); every id is
< ``vocab_size``. Ordinary text is split into single characters (printable ASCII, newline, tab);
anything else maps to ``<unk>``. No special tokens are added by ``tokenizer(text)``: like the
LLaDA/Dream tokenizers, the BOS and turn markers come from the chat template.

Layout (defaults): 0 ``<unk>``, 1 ``<|startoftext|>`` (bos), 2 ``<|endoftext|>`` (eos/pad),
then ``<|system|>``, ``<|user|>``, ``<|assistant|>``, then the characters, then
``<|reserved_N|>`` fillers, with ``<|mdm_mask|>`` at ``mask_id``.

Chat template (when ``with_chat_template``)::

    <|startoftext|><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}<|endoftext|>

i.e. every turn is ``<|role|>\\n{content}`` followed by ``\\n``, except that an assistant turn ends
with the eos token instead; ``add_generation_prompt`` appends ``<|assistant|>\\n``.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD, MASK = "<unk>", "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|mdm_mask|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]  # 95 printable + \t + \n

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def make_tiny_tokenizer(
    vocab_size: int = 512,
    mask_id: int = 500,
    eos_id: int = 2,
    pad_id: int = 2,
    with_chat_template: bool = True,
) -> PreTrainedTokenizerFast:
    """Build the tiny tokenizer in-process. Special ids are placed exactly where asked."""
    fixed: dict[int, str] = {mask_id: MASK, eos_id: EOS}
    if pad_id != eos_id:
        fixed[pad_id] = PAD
    if mask_id in (eos_id, pad_id):
        raise ValueError("mask_id, eos_id and pad_id must differ (pad_id may equal eos_id)")
    rest = [UNK, BOS, *ROLE_TOKENS, *CHARS]
    if any(i < 0 or i >= vocab_size for i in fixed) or len(fixed) + len(rest) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} too small for the special ids / characters")
    id_to_tok: dict[int, str] = dict(fixed)
    free = (i for i in range(vocab_size) if i not in fixed)
    for tok in rest:
        id_to_tok[next(free)] = tok
    for n, i in enumerate(free):
        id_to_tok[i] = f"<|reserved_{n}|>"
    vocab = {tok: i for i, tok in id_to_tok.items()}
    assert len(vocab) == vocab_size

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    specials = [UNK, BOS, EOS, MASK, *ROLE_TOKENS] + ([PAD] if pad_id != eos_id else [])
    tok.add_special_tokens(specials)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS if pad_id == eos_id else PAD,
        mask_token=MASK,
        model_max_length=4096,
    )
    if with_chat_template:
        hf.chat_template = CHAT_TEMPLATE
    assert hf.mask_token_id == mask_id and hf.eos_token_id == eos_id and hf.pad_token_id == pad_id
    return hf
