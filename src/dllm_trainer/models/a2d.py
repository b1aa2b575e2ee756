"""Autoregressive -> diffusion (a2d): a Hugging Face causal LM turned into a masked diffusion LM
without copying its architecture.

Bidirectional attention comes from transformers' own switch: ``config.is_causal = False``. In
transformers 5.x the base model's forward (``merge_with_config_defaults``) passes it to every
attention call as ``is_causal=False`` (SDPA, eager and flash attention then use no causal
mask) and ``create_causal_mask`` / ``create_sliding_window_causal_mask`` build a
bidirectional (padding-only, or windowed in both directions) mask instead. Because the flag is
part of the config it is saved in ``config.json``, shared by a peft wrapper with its base
model, and seen by gradient checkpointing; a 4-D mask passed by the caller is still used as is.
``check_bidirectional`` proves the switch took on the loaded model (a later token must change
an earlier position's logits), so an architecture that ignores it fails loudly.

The converted model is saved in the base's own format (same class, same weight names) with a
small marker in its config, ``"dllm_a2d": {"mask_token_id": N, "shift_logits": true}``, from
which our loaders re-apply all of this (families.A2D). ``shift_logits`` is the Dream-style
alignment: token i is predicted by output i-1, where the autoregressive head already predicts
the next token.
"""
from __future__ import annotations

import torch

from ..errors import ModelError

MARKER_KEY = "dllm_a2d"


def read_marker(config) -> dict | None:
    marker = getattr(config, MARKER_KEY, None)
    return dict(marker) if isinstance(marker, dict) else None


def make_diffusion_lm(model, mask_token_id: int, *, shift_logits: bool) -> None:
    """Switch ``model`` (a causal LM, possibly peft-wrapped) to bidirectional attention and write the marker."""
    config = model.config
    config.is_causal = False
    config.mask_token_id = int(mask_token_id)
    setattr(config, MARKER_KEY, {"mask_token_id": int(mask_token_id), "shift_logits": bool(shift_logits)})
    # Generation-time K/V caches make no sense for a model that re-reads the whole sequence.
    if hasattr(config, "use_cache"):
        config.use_cache = False


def _zero3_partitioned() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())
    except Exception:  # noqa: BLE001 - no deepspeed integration: nothing is partitioned
        return False


@torch.no_grad()
def check_bidirectional(model, *, name: str = "the model") -> None:
    """Raise ModelError unless a later token changes position 0's logits (one 2x3-token forward)."""
    if _zero3_partitioned():  # parameters are gathered only inside the DeepSpeed engine
        return
    try:
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[0, 1 % vocab, 2 % vocab], [0, 1 % vocab, 3 % vocab]], device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    first = logits[:, 0]
    change = (first[0] - first[1]).abs().max().item()
    # A causal model computes position 0 identically in both rows (difference exactly 0).
    if not change > 4 * torch.finfo(logits.dtype).eps * (1.0 + first.abs().max().item()):
        arch = ", ".join(getattr(model.config, "architectures", None) or [str(getattr(model.config, "model_type", "?"))])
        raise ModelError(
            f"{name} ({arch}) still attends causally after setting config.is_causal=False: this architecture "
            "does not support bidirectional attention in the installed transformers, so a2d cannot convert it"
        )
