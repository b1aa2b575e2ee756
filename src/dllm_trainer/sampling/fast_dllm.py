"""Model calls for the samplers, including Fast-dLLM's block KV caching.

``ModelCaller`` turns "I need predictions for these columns" into one model forward:

- it computes the output head only where needed (``output_positions`` on our LLaDA/Dream
  models; HF models such as BERT return full logits that are gathered), and applies the
  family's alignment (Dream: the prediction for token ``i`` is output ``i - 1``, token 0 uses
  output 0);
- classifier-free guidance doubles the batch with an unconditional copy (prompt tokens replaced
  by the mask) and mixes ``uncond + (cfg + 1) * (cond - uncond)``;
- left padding: a key padding mask plus ``position_ids = cumsum(mask) - 1`` so that a padded row
  sees the same positions as the unpadded sequence;
- caching (Fast-dLLM, arXiv:2505.22618): ``fill_cache=True`` runs the full sequence with
  ``use_cache=True`` and returns the cache (done at every block boundary = refresh). Later
  calls pass ``cache`` and a window ``[start, end)``: the model computes fresh K/V for the
  window and reuses the cached K/V elsewhere (prefix cache: window = block start .. end of
  sequence; dual cache: window = the block only). For Dream the window starts one position
  earlier, because the first token of a block is predicted by the output before it.

A cache is an approximation by design: bidirectional attention makes the cached K/V of the
other positions depend on tokens revealed since the refresh. See tests/test_sampling.py for
the measured agreement with the uncached sampler.
"""
from __future__ import annotations

import torch

CACHE_MODES = (None, "prefix", "dual")


class ModelCaller:
    def __init__(
        self,
        model,
        family,
        *,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        mask_token_id: int,
        cfg_scale: float = 0.0,
        uncond_index: torch.Tensor | None = None,
        stats: dict | None = None,
    ):
        self.model = model
        self.family = family
        self.attention_mask = attention_mask
        self.position_ids = position_ids
        self.mask_token_id = mask_token_id
        self.cfg_scale = cfg_scale
        self.uncond_index = uncond_index
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("nfe", 0)
        self.stats.setdefault("forward_tokens", 0)

    def _double(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or self.cfg_scale <= 0:
            return t
        return torch.cat([t, t], dim=0)

    def output_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """Columns of the model output that predict the tokens at ``cols``."""
        return (cols - 1).clamp(min=0) if self.family.shift_logits else cols

    def window_start(self, first_col: int) -> int:
        """First input column a cached forward needs in order to predict ``first_col`` onwards."""
        return int(self.output_columns(torch.tensor([first_col]))[0])

    def __call__(
        self,
        x: torch.Tensor,
        cols: torch.Tensor,
        *,
        start: int = 0,
        end: int | None = None,
        cache=None,
        fill_cache: bool = False,
    ):
        """Logits [B, len(cols), V] predicting the tokens at absolute ``cols`` of ``x``.

        Returns ``(logits, cache)``; ``cache`` is the freshly filled cache when ``fill_cache``.
        """
        batch, total = x.shape
        end = total if end is None else end
        inp = x[:, start:end]
        if self.cfg_scale > 0:
            uncond = x.masked_fill(self.uncond_index, self.mask_token_id)[:, start:end]
            inp = torch.cat([inp, uncond], dim=0)
        rel = self.output_columns(cols) - start
        if rel.numel() and (int(rel.min()) < 0 or int(rel.max()) >= end - start):
            raise RuntimeError("internal error: requested columns outside the forward window")
        n_rows, width = inp.shape
        attn = self._double(self.attention_mask)
        pos = self._double(self.position_ids)
        if pos is not None:
            pos = pos[:, start:end]
        new_cache = None
        if self.family.native_masked_head:
            kwargs = {}
            if attn is not None:
                kwargs["attention_mask"] = attn if cache is not None else attn[:, start:end]
            if pos is not None:
                kwargs["position_ids"] = pos
            if cache is not None:
                kwargs["past_key_values"] = cache
                kwargs["cache_start"] = start
            if fill_cache:
                kwargs["use_cache"] = True
            flat = (torch.arange(n_rows, device=x.device).unsqueeze(1) * width + rel.unsqueeze(0)).reshape(-1)
            out = self.model(input_ids=inp, output_positions=flat, **kwargs)
            logits = out.logits.reshape(n_rows, rel.numel(), -1)
            if fill_cache:
                new_cache = out.past_key_values
        else:
            if cache is not None or fill_cache:
                raise ValueError("KV caching needs one of our LLaDA/Dream models")
            kwargs = {}
            if attn is not None:
                kwargs["attention_mask"] = attn[:, start:end]
            if pos is not None:
                kwargs["position_ids"] = pos
            logits = self.family.logits_at(self.model, inp, rel, **kwargs)
        self.stats["nfe"] += 1
        self.stats["forward_tokens"] += int(inp.numel())
        if self.cfg_scale > 0:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        return logits, new_cache
