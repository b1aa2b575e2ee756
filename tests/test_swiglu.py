"""The training SwiGLU (models/swiglu.py): same numbers as the plain expression, less kept for backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dllm_trainer.models.swiglu import swiglu


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_matches_plain_and_keeps_less(bias):
    torch.manual_seed(0)
    gate, up, down = nn.Linear(16, 48, bias=bias), nn.Linear(16, 48, bias=bias), nn.Linear(48, 16, bias=bias)
    x = torch.randn(2, 64, 16, requires_grad=True)
    params = [x, *gate.parameters(), *up.parameters(), *down.parameters()]
    weights = torch.randn(2, 64, 16)

    def grads(fn):
        for p in params:
            p.grad = None
        out, saved = _saved_bytes(fn)
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in params], saved

    ref, ref_grads, ref_saved = grads(lambda: down(F.silu(gate(x)) * up(x)))
    out, out_grads, saved = grads(lambda: swiglu(x, gate, up, down, nn.SiLU()))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for a, b in zip(out_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # plain: x, g, silu(g), u, silu(g)*u (+ weights); fused: x, g, u (+ weights)
    mlp_tensor = 2 * 64 * 48 * 4
    assert ref_saved - saved >= 2 * mlp_tensor


def test_swiglu_falls_back_for_other_heads_and_activations():
    torch.manual_seed(0)
    gate, up, down = nn.Linear(8, 24), nn.Linear(8, 24), nn.Linear(24, 8)
    x = torch.randn(3, 8)
    gelu = lambda t: F.gelu(t)  # noqa: E731 - not silu: the plain expression
    torch.testing.assert_close(swiglu(x, gate, up, down, gelu), down(F.gelu(gate(x)) * up(x)))
    with torch.no_grad():  # no gradients: nothing to save, the plain expression
        torch.testing.assert_close(swiglu(x, gate, up, down, F.silu), down(F.silu(gate(x)) * up(x)))
