"""Fitting a tiny model with a few Adam steps of the masked-diffusion loss (shared by sampler tests)."""
import torch
import torch.nn.functional as F

from dllm_trainer.families import get_family


def fit_mdlm(model, make_batch, *, steps, lr=3e-3, seed=0, mask_id=500):
    """``make_batch(generator) -> LongTensor[n, L]`` draws each step's clean batch; the loss is
    the CE at masked positions weighted by 1/t, over n*L tokens."""
    fam = get_family(model)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x = make_batch(g)
        t = 0.05 + 0.95 * torch.rand(x.shape[0], 1, generator=g)
        masked = torch.rand(x.shape, generator=g) < t
        logits = fam.align_logits(model(input_ids=x.masked_fill(masked, mask_id)).logits)
        ce = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x)
        loss = (ce * masked / t).sum() / x.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
