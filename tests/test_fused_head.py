"""The fused linear cross-entropy (output_head.py) equals the plain computation, gradients included.

The fused path computes ``sum_i w_i * CE_i`` and its gradients in forward, chunk by chunk; these
tests hold it to full logits + ``F.cross_entropy`` on the same numbers, with a bias, a logit
scale, ignored rows (-100), several chunks, frozen parameters, and no_grad.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dllm_trainer.models import output_head
from dllm_trainer.models.output_head import (
    LinearHead,
    chunk_rows,
    fused_linear_cross_entropy,
    linear_head_of,
    output_head_fields,
)

pytestmark = pytest.mark.usefixtures("single_thread_module")

N, D, V = 37, 16, 50


def setup(bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(D)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=g))
    proj = torch.nn.Linear(D, V, bias=bias)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[3, 10, 11]] = -100
    weights = torch.rand(N, generator=g) * 3
    return norm, proj, hidden, targets, weights


def reference(norm, proj, hidden, targets, weights, scale):
    logits = proj(norm(hidden)) * (scale or 1.0)
    ce = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=-100)
    return (ce * weights).sum(), ce, logits.argmax(-1) == targets


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [None, 0.25])
@pytest.mark.parametrize("chunk", [4096, 8, 1])
def test_fused_equals_full_logits(bias, scale, chunk):
    norm, proj, hidden, targets, weights = setup(bias)
    params = [hidden, norm.weight, proj.weight] + ([proj.bias] if bias else [])
    ref, ref_ce, ref_correct = reference(norm, proj, hidden, targets, weights, scale)
    ref_grads = grads_of(ref * 0.7, params)  # an upstream factor, as the trainer's normalisation

    head = LinearHead(norm, proj.weight, proj.bias, scale)
    ours, ce, correct = fused_linear_cross_entropy(hidden, head, targets, weights, chunk_size=chunk)
    our_grads = grads_of(ours * 0.7, params)

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    assert torch.equal(correct, ref_correct)
    assert not ce.requires_grad and not correct.requires_grad
    assert ce[[3, 10, 11]].eq(0).all() and not correct[[3, 10, 11]].any()
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_projection_gets_no_gradient_and_others_still_do():
    norm, proj, hidden, targets, weights = setup()
    proj.weight.requires_grad_(False)
    proj.bias.requires_grad_(False)
    ref, _, _ = reference(norm, proj, hidden, targets, weights, None)
    ref_grads = grads_of(ref, [hidden, norm.weight])
    ours, _, _ = fused_linear_cross_entropy(hidden, LinearHead(norm, proj.weight, proj.bias), targets, weights, 8)
    for a, b in zip(grads_of(ours, [hidden, norm.weight]), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_grad_computes_loss_only():
    norm, proj, hidden, targets, weights = setup()
    with torch.no_grad():
        ours, ce, _ = fused_linear_cross_entropy(hidden, LinearHead(norm, proj.weight, proj.bias), targets, weights, 8)
        ref, ref_ce, _ = reference(norm, proj, hidden, targets, weights, None)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)


def test_output_head_fields_fused_and_generic_paths_agree():
    """The model-facing entry: with target_weights and a linear head the fused path, without a
    linear head (e.g. a LoRA-wrapped projection) the checkpointed chunks; same loss and gradients."""
    norm, proj, hidden, targets, weights = setup()
    hidden3 = hidden.detach().view(1, N, D).requires_grad_(True)
    positions = torch.arange(N)

    def head(x):
        return proj(norm(x))

    results = []
    for lin in (linear_head_of(norm, proj), None):
        f = output_head_fields(hidden3, head, positions, targets, 8, target_weights=weights, linear_head=lin)
        assert f["logits"] is None and not f["token_loss"].requires_grad
        results.append((f["weighted_loss"], *grads_of(f["weighted_loss"], [hidden3, proj.weight, norm.weight])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # without weights: per-token losses that carry the gradient (the ELBO / eval path)
    f = output_head_fields(hidden3, head, positions, targets, 8)
    assert f["weighted_loss"] is None and f["token_loss"].requires_grad
    with pytest.raises(ValueError, match="target_weights requires target_ids"):
        output_head_fields(hidden3, head, positions, None, 8, target_weights=weights)


def test_linear_head_of_only_accepts_plain_layers():
    norm = torch.nn.Identity()
    assert linear_head_of(norm, torch.nn.Linear(4, 6)) is not None
    assert linear_head_of(norm, torch.nn.Embedding(6, 4)).bias is None

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA or quantised layer: its forward is not weight @ x
        pass

    assert linear_head_of(norm, Wrapped(4, 6)) is None


def test_chunk_rows_caps_the_logits_bytes(monkeypatch):
    monkeypatch.setattr(output_head, "LOGITS_CHUNK_BYTES", 4 * 1000 * 100)
    assert chunk_rows(4096, 5000, 1000) == 100  # capped: 100 rows x 1000 logits x 4 bytes
    assert chunk_rows(64, 5000, 1000) == 64  # the configured size when smaller
    assert chunk_rows(0, 30, 10) == 30  # 0: everything in one chunk (within the cap)
    assert chunk_rows(4096, 5000, 10**9) == 1  # at least one row


# ---- the last block computes only the selected rows (QueryRows) ----------------------------------
def _model(path):
    from transformers import AutoModel

    import dllm_trainer.models  # noqa: F401

    return AutoModel.from_pretrained(path, dtype=torch.float32).train()


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("layout", ["padded", "packed", "one_row", "checkpointed"])
def test_selected_rows_equal_full_forward(family, layout, llada_tiny, dream_tiny):
    from dllm_trainer.training.packing import block_diagonal_mask

    model = _model(llada_tiny if family == "llada" else dream_tiny)
    g = torch.Generator().manual_seed(1)
    B, L = 3, 20
    ids = torch.randint(3, 400, (B, L), generator=g)
    kwargs = {}
    if layout == "packed":  # two segments per row, block-diagonal 4-D mask, restarting positions
        seg = torch.tensor([0] * 8 + [1] * 12).repeat(B, 1)
        kwargs = dict(attention_mask=block_diagonal_mask(seg),
                      position_ids=torch.cat([torch.arange(8), torch.arange(12)]).repeat(B, 1))
    else:
        am = torch.ones(B, L, dtype=torch.long)
        am[1, 14:] = 0  # a right-padded row
        kwargs = dict(attention_mask=am)
    if layout == "one_row":
        pos = torch.tensor([0, 3, 4, 5, 19])  # all in the first sequence
    else:
        pos = torch.tensor([0, 1, 1, 7, 21, 22, 30, 45, 59, 58])  # unsorted, with a duplicate
    if layout == "checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    w = torch.randn(pos.numel(), model.config.vocab_size, generator=g)

    picked = model(input_ids=ids, output_positions=pos, **kwargs).logits
    full = model(input_ids=ids, **kwargs).logits.flatten(0, 1)[pos]
    torch.testing.assert_close(picked, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(model, (picked * w).sum()), _grads(model, (full * w).sum())):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # summation order differs
