"""Output head at selected positions, and chunked cross-entropy that never keeps full logits.

With a 126k-152k vocabulary the output head dominates activation memory: for N supervised
tokens the logits are ``N x V`` and their float32 copy for the loss is twice that again. In
masked diffusion training only the masked positions carry a loss, so both models

1. gather the final hidden states at ``output_positions`` (flat indices into ``B * L``) before
   the head, so the head never runs on unmasked tokens; the LAST block already computes only
   those rows (``QueryRows``: its keys/values still come from every position, but its queries,
   attention output, residual and MLP only from the selected ones: nothing after it reads the
   other rows), and
2. with ``target_ids``, run (head + cross-entropy) over chunks of rows, each chunk under
   ``torch.utils.checkpoint``: backward recomputes that chunk's logits instead of storing them,
   so at most one ``chunk x V`` block of logits exists at any time;
3. with ``target_weights`` too (training: the loss is ``sum_i w_i * CE_i``) and a plain linear
   head (``LinearHead``), run the fused linear cross-entropy instead: each chunk's logits are
   turned into the loss AND its gradients (``softmax - onehot``, times ``w_i``) right away, so
   backward only scales the stored gradients. Same mathematics, but three head matmuls per
   token instead of four (no recomputation) and no second pass of the cross-entropy.

Rows per chunk: at most ``ce_chunk_size``, and at most ``LOGITS_CHUNK_BYTES`` of float32 logits
(a 4096-row chunk at a 126k vocabulary would be 2 GB).

``DiffusionLMOutput`` is the return type of both models' ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

IGNORE_INDEX = -100
# Cap on one chunk's float32 logits. Every chunk reads the [V, D] head weight twice and updates its
# gradient once, so fewer, bigger chunks are faster (at a 126k vocabulary, 340 rows on one CPU
# thread: 1.04 s with 256 MiB chunks, 1.12 s with 128 MiB, 1.2 s with 64 MiB).
LOGITS_CHUNK_BYTES = 256 * 2**20


def chunk_rows(chunk_size: int | None, n: int, vocab: int) -> int:
    """Rows per head chunk: ``chunk_size`` (<= 0 or None: all ``n``), capped by ``LOGITS_CHUNK_BYTES``."""
    rows = int(chunk_size) if chunk_size and chunk_size > 0 else max(int(n), 1)
    return max(1, min(rows, LOGITS_CHUNK_BYTES // (4 * max(int(vocab), 1))))


@dataclass(frozen=True)
class LinearHead:
    """An output head of the form ``scale * (norm(x) @ weight.T + bias)``: what the fused loss needs.

    ``norm`` runs under autograd as usual; ``weight`` / ``bias`` are the projection's parameters
    (for tied embeddings, the embedding matrix); ``scale`` None means 1.
    """

    norm: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: Optional[float] = None


def linear_head_of(norm, projection, scale=None) -> Optional[LinearHead]:
    """``LinearHead`` for a plain ``nn.Linear`` / ``nn.Embedding`` projection; None for anything else
    (a peft/LoRA- or quantisation-wrapped head keeps the generic chunked path, which calls it)."""
    if type(projection) is torch.nn.Linear:
        return LinearHead(norm, projection.weight, projection.bias, scale)
    if type(projection) is torch.nn.Embedding:
        return LinearHead(norm, projection.weight, None, scale)
    return None


@dataclass
class DiffusionLMOutput(ModelOutput):
    """Output of our LLaDA and Dream models (see docs/ARCHITECTURE.md, "Model API").

    logits: ``[B, L, V]``, or ``[N, V]`` with ``output_positions``, or ``None`` with ``target_ids``.
    weighted_loss: with ``target_weights``: ``sum_i w_i * token_loss_i`` (float32 scalar), the one
        output gradients flow through (``token_loss`` is then detached).
    token_loss: ``[N]`` float32 cross-entropy per selected position (``target_ids`` given).
    token_correct: ``[N]`` bool, argmax == target (``target_ids`` given).
    past_key_values: the ``BlockKVCache`` filled (``use_cache=True``) or read (``cache_start``).
        Stored in the field ``cache`` (transformers 5 renamed the ModelOutput field and maps the
        old name); ``out.past_key_values`` reads it without the deprecation warning.
    hidden_states: with ``output_hidden_states=True``, the input of every block plus the final
        normalised hidden state, each ``[B, L, D]``.
    """

    logits: Optional[torch.Tensor] = None
    weighted_loss: Optional[torch.Tensor] = None
    token_loss: Optional[torch.Tensor] = None
    token_correct: Optional[torch.Tensor] = None
    cache: Optional[object] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None

    @property
    def past_key_values(self):
        return self.cache


def _head_and_ce(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()
    loss = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)
    correct = logits.argmax(dim=-1) == targets
    return loss, correct


def chunked_head_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float32 CE and argmax-correctness of ``head(hidden)`` against ``targets``.

    ``hidden``: ``[N, D]``; ``targets``: ``[N]`` (``-100`` rows give loss 0, correct False).
    Rows are processed ``chunk_size`` at a time; when gradients are needed each chunk is
    checkpointed so its ``chunk x V`` logits are freed right after the forward.
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected hidden [N, D] and targets [N], got {list(hidden.shape)} and {list(targets.shape)}"
        )
    targets = targets.to(device=hidden.device, dtype=torch.long)
    n = hidden.shape[0]
    chunk_size = chunk_rows(chunk_size, n, vocab_size or 1)
    # Under no_grad nothing is saved for backward, so plain chunking already bounds memory.
    needs_grad = torch.is_grad_enabled()
    losses, corrects = [], []
    # One chunk needs no Python loop over n: torch.compile then keeps one graph for every batch
    # instead of specialising (and recompiling) on the masked-token count.
    for start in [0] if n <= chunk_size else range(0, n, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if needs_grad and n > 0:
            # The RNG state is irrelevant here (no dropout in the head), so skip saving it.
            loss, correct = checkpoint(_head_and_ce, head, h, t, use_reentrant=False, preserve_rng_state=False)
        else:
            loss, correct = _head_and_ce(head, h, t)
        losses.append(loss)
        corrects.append(correct)
    if len(losses) == 1:
        return losses[0], corrects[0]
    return torch.cat(losses), torch.cat(corrects)


def _fused_chunk(h, weight, bias, targets, valid, row_weights, scale, need):
    """One chunk: (per-row CE, correct, d/dlogits times the row weights, or None).

    Few passes over the ``rows x V`` logits, in place: max (with argmax), subtract, exp, sum, and
    for the gradient one multiply (softmax = exp / sum, folded into the row factor)."""
    logits = F.linear(h, weight, bias)
    if scale is not None:
        logits = logits * scale
    compute_dtype = logits.dtype
    lf = logits.float()
    top, top_index = lf.max(dim=-1)
    correct = (top_index == targets) & valid
    lf.sub_(top[:, None])  # in place: this chunk's logits are not needed any more
    shifted_target = lf.gather(1, targets[:, None])[:, 0]
    sum_exp = lf.exp_().sum(dim=-1)
    log_sum = sum_exp.log()
    loss = torch.where(valid, log_sum - shifted_target, 0.0)  # = logsumexp(logits) - logits[target]
    if not need:
        return loss, correct, None
    # d CE / d logits = softmax - onehot, times the row's weight (0 for ignored rows) and the scale
    coef = torch.where(valid, row_weights.float(), 0.0)
    if scale is not None:
        coef = coef * scale
    g = lf.mul_((coef / sum_exp)[:, None])
    g.scatter_add_(1, targets[:, None], -coef[:, None])
    return loss, correct, g.to(compute_dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i w_i * CE(scale * (h_i @ W.T + b), y_i)`` with its gradients computed chunk by chunk
    in forward (the loss is linear in the per-token CE, so backward only needs the upstream scalar)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, row_weights, scale, rows, grads):
        n = h.shape[0]
        need_h, need_w = grads and h.requires_grad, grads and weight.requires_grad
        need_b = grads and bias is not None and bias.requires_grad
        need = need_h or need_w or need_b
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        grad_h = grad_w = grad_b = None
        if n <= rows:  # one chunk, no Python loop over n: torch.compile keeps one graph for every n
            losses, correct, g = _fused_chunk(h, weight, bias, safe_targets, valid, row_weights, scale, need)
            if need_h:
                grad_h = (g @ weight.to(g.dtype)).to(h.dtype)
            if need_w:
                grad_w = (g.t() @ h.to(g.dtype)).float()
            if need_b:
                grad_b = g.float().sum(0)
        else:
            losses = torch.empty(n, dtype=torch.float32, device=h.device)
            correct = torch.empty(n, dtype=torch.bool, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            for start in range(0, n, rows):
                end = min(start + rows, n)
                hc = h[start:end]
                losses[start:end], correct[start:end], g = _fused_chunk(
                    hc, weight, bias, safe_targets[start:end], valid[start:end], row_weights[start:end], scale, need)
                if need_h:
                    grad_h[start:end] = (g @ weight.to(g.dtype)).to(h.dtype)
                if need_w:
                    if g.dtype == grad_w.dtype:
                        grad_w.addmm_(g.t(), hc)  # accumulate in place: no [V, D] temporary per chunk
                    else:
                        grad_w += (g.t() @ hc.to(g.dtype)).float()
                if need_b:
                    grad_b += g.float().sum(0)
        weighted = (losses * torch.where(valid, row_weights.float(), 0.0)).sum()
        ctx.mark_non_differentiable(losses, correct)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return weighted, losses, correct

    @staticmethod
    def backward(ctx, d_weighted, _d_losses, _d_correct):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = d_weighted.to(torch.float32)
        out_h = grad_h.mul_(scale.to(grad_h.dtype)) if grad_h is not None else None
        out_w = grad_w.mul_(scale).to(ctx.param_dtypes[0]) if grad_w is not None else None
        out_b = grad_b.mul_(scale).to(ctx.param_dtypes[1]) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    head: LinearHead,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``sum_i w_i * CE_i`` with gradients, detached per-row CE, argmax-correct) of the head on
    ``hidden`` ``[N, D]`` (before the head's norm). Rows with target ``-100`` give CE 0 and do not count."""
    targets = targets.to(device=hidden.device, dtype=torch.long)
    row_weights = row_weights.to(device=hidden.device)
    if row_weights.shape != targets.shape:
        raise ValueError(f"target_weights {list(row_weights.shape)} must have the shape of target_ids {list(targets.shape)}")
    normed = head.norm(hidden)
    rows = chunk_rows(chunk_size, normed.shape[0], head.weight.shape[0])
    grads = torch.is_grad_enabled()
    return _FusedLinearCrossEntropy.apply(normed, head.weight, head.bias, targets, row_weights, head.scale, rows, grads)


class QueryRows:
    """Sorted unique flat positions (into ``B * L``) laid out per sequence for attention queries.

    ``col`` / ``valid`` are ``[B, C]`` (C = the most positions in one sequence; shorter rows are
    padded with column 0, ``valid`` False), so a block can run its queries as ``[B, H, C, hd]``
    against all ``L`` keys. ``output_index`` maps each requested output position to its row in
    the ``[U, D]`` result (duplicates allowed, e.g. Dream's shifted positions).
    """

    def __init__(self, output_positions: torch.Tensor, batch_size: int, seq_len: int):
        check_positions(output_positions)
        output_positions = output_positions.long()
        flat, self.output_index = torch.unique(output_positions, sorted=True, return_inverse=True)
        row, col = flat // seq_len, flat % seq_len
        counts = torch.bincount(row, minlength=batch_size)
        width = int(counts.max())
        rank = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[row]
        self.flat = flat
        self.col = torch.zeros(batch_size, width, dtype=torch.long, device=flat.device).index_put_((row, rank), col)
        self.valid = torch.zeros(batch_size, width, dtype=torch.bool, device=flat.device).index_put_(
            (row, rank), torch.ones_like(col, dtype=torch.bool))
        self.batch = torch.arange(batch_size, device=flat.device)[:, None].expand(batch_size, width)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` -> ``[U, D]`` at the positions."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.flat)

    def per_row(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, C, D]`` (padding rows: column 0)."""
        return x[self.batch, self.col]

    def per_row_heads(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[B or 1, 1 or H, L, X]`` (rotary tables, 4-D masks) -> ``[B, 1 or H, C, X]``; a tensor
        that does not vary along L (``size(-2) == 1``, e.g. a key padding mask) is returned as is."""
        if t is None or t.shape[-2] == 1:
            return t
        t = t.expand(self.batch.shape[0], *t.shape[1:]).transpose(1, 2)  # [B, L, h, X]
        return t[self.batch, self.col].transpose(1, 2)

    def gather_output(self, att: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, H, C, hd]`` -> ``[U, H * hd]`` (valid rows, in position order)."""
        att = att.transpose(1, 2)[self.valid]
        return att.reshape(att.shape[0], -1)


def prunes_last_block(output_positions, past_key_values, use_cache, output_hidden_states) -> bool:
    """May the last block compute only the rows at ``output_positions`` (``QueryRows``)? Not with a
    KV cache (every row's K/V is stored), hidden states requested, or no positions; and not under
    torch.compile (the per-sequence query width is data-dependent and would split the graph;
    compiled models keep one graph for every batch)."""
    return (output_positions is not None and past_key_values is None and not use_cache
            and not output_hidden_states and output_positions.numel() > 0
            and not torch.compiler.is_compiling())


def select_positions(hidden: torch.Tensor, output_positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` (``[B, L, D]``) at flat indices ``output_positions`` (into ``B * L``) -> ``[N, D]``."""
    check_positions(output_positions)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, output_positions.to(device=hidden.device, dtype=torch.long))


def check_positions(output_positions: torch.Tensor) -> None:
    if output_positions.dim() != 1:
        raise ValueError(
            f"output_positions must be a 1-D tensor of flat indices into B*L, got {list(output_positions.shape)}"
        )
    if output_positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"output_positions must be an integer tensor, got {output_positions.dtype}")


def output_head_fields(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    output_positions: Optional[torch.Tensor] = None,
    target_ids: Optional[torch.Tensor] = None,
    ce_chunk_size: int = 4096,
    target_weights: Optional[torch.Tensor] = None,
    linear_head: Optional[LinearHead] = None,
    vocab_size: Optional[int] = None,
    preselected: bool = False,
) -> dict[str, Optional[torch.Tensor]]:
    """Shared tail of both models' forward: the ``DiffusionLMOutput`` fields ``logits``,
    ``weighted_loss``, ``token_loss``, ``token_correct``.

    ``head`` maps final hidden states (before the final norm) to logits; it must act row-wise
    so that it can be applied to a gathered subset. ``linear_head`` is the same head in parts
    (None when it is not a plain linear layer); with ``target_weights`` it selects the fused loss.
    ``vocab_size`` (the head's output size) caps the rows per chunk (``chunk_rows``).
    ``preselected``: ``hidden`` is already ``[N, D]``, the rows at ``output_positions`` (``QueryRows``).
    """
    out = dict(logits=None, weighted_loss=None, token_loss=None, token_correct=None)
    if target_weights is not None and target_ids is None:
        raise ValueError("target_weights requires target_ids (and output_positions).")
    if output_positions is None:
        if target_ids is not None:
            raise ValueError("target_ids requires output_positions (the flat positions the targets belong to).")
        out["logits"] = head(hidden)
        return out
    selected = hidden if preselected else select_positions(hidden, output_positions)
    if target_ids is None:
        out["logits"] = head(selected)
        return out
    if target_ids.shape != output_positions.shape:
        raise ValueError(
            f"target_ids {list(target_ids.shape)} must have the same shape as "
            f"output_positions {list(output_positions.shape)}"
        )
    if target_weights is not None and linear_head is not None:
        out["weighted_loss"], out["token_loss"], out["token_correct"] = fused_linear_cross_entropy(
            selected, linear_head, target_ids, target_weights, ce_chunk_size)
        return out
    loss, out["token_correct"] = chunked_head_cross_entropy(head, selected, target_ids, ce_chunk_size, vocab_size)
    out["token_loss"] = loss
    if target_weights is not None:
        out["weighted_loss"] = (loss * target_weights.to(loss.device, torch.float32)).sum()
        out["token_loss"] = loss.detach()
    return out


# token_type_ids: transformers 4 fast tokenizers return them by default; these models have no token types.
_IGNORED_KWARGS = {"num_items_in_batch", "token_type_ids"}


def check_forward_kwargs(labels, output_attentions, kwargs) -> None:
    """Shared guard for arguments transformers/peft may pass that these models do not use."""
    if labels is not None:
        raise ValueError(
            "labels are not supported: masked-diffusion losses are computed from output_positions + "
            "target_ids (per-token CE), weighted by the trainer."
        )
    if output_attentions:
        raise ValueError("output_attentions is not supported (attention runs in fused SDPA kernels).")
    unexpected = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS)
    if unexpected:
        raise TypeError(f"unexpected forward arguments: {unexpected}")
