"""Sampling from masked diffusion LMs: ``generate(model, prompt_ids, gen_length=, steps=, ...)``.

The family (``families.get_family(model)``) picks the sampler; ``strategy=None`` means the
family default (``low_confidence`` for LLaDA/BERT, ``maskgit_plus`` for Dream).

LLaDA / BERT (``low_confidence`` | ``random``), after LLaDA's ``generate.py``:
    semi-autoregressive blocks of ``block_length`` (default ``gen_length``); ``steps`` split
    evenly over blocks (must divide); per block the masked count is spread evenly over its steps
    (remainder to the earliest steps); tokens by argmax, or Gumbel-max in float64 when
    ``temperature > 0``; reveal the most confident (or random) masked positions of the current
    block; ``cfg_scale`` = classifier-free guidance with the prompt replaced by the mask.

Dream (``origin`` | ``maskgit_plus`` | ``topk_margin`` | ``entropy``), after Dream's
``diffusion_generate``: timesteps ``linspace(1, eps, steps + 1)``, ``int(n * (1 - s/t))``
tokens per step (all remaining at the last), logits shifted right by one; options
``alg_temp``, ``top_p``, ``top_k``, ``eps``. Blocks work as for LLaDA (default: one block).

Fast-dLLM: ``threshold=`` reveals every masked position of the block whose proposal probability
exceeds it (at least the best-scoring one per step; the step schedule is then not used) and
``cache="prefix" | "dual"`` reuses K/V outside the block, refreshed at every block boundary.

Infilling: mask tokens in ``prompt_ids`` are decoded (with the first block), the rest is kept;
``gen_length=0`` is allowed. ``stop_at_eos=True``: everything after the first generated EOS
becomes EOS (and later blocks are skipped once every row has one). Left-padded batches: pass
``attention_mask`` (1 = token); positions are renumbered so a padded row matches its unpadded
run. Randomness (``random``, ``temperature > 0``, ``origin``, ``alg_temp``) uses ``seed=`` /
``generator=`` when given, else torch's global RNG.

Live view / trace: ``callback=fn`` calls ``fn(StepEvent)`` after every step that reveals tokens
(the canvas and the positions just revealed); the playground (`dllm-trainer playground`) uses it.
"""
from .core import STRATEGIES, GenerateOptions, StepEvent, generate
from .schedule import dream_num_transfer_tokens, dream_timesteps, llada_num_transfer_tokens

__all__ = [
    "generate",
    "GenerateOptions",
    "StepEvent",
    "STRATEGIES",
    "llada_num_transfer_tokens",
    "dream_timesteps",
    "dream_num_transfer_tokens",
]
