"""How our LLaDA/Dream configs are written, so that the published remote code reads them too.

Shared by llada.py and dream.py; like them it imports nothing from dllm_trainer, because
export.py copies these files beside saved weights as remote code.
"""
from __future__ import annotations


def full_diff_dict(config, diff: dict, keys) -> dict:
    """``diff`` plus every architecture key in ``keys``, ``architectures``/``auto_map``, and a
    ``torch_dtype`` mirror of ``dtype``.

    The official configuration classes have other defaults than ours (LLaDA's are GPT-2 sized),
    so a diff against OUR defaults would not reload the same there.
    """
    full = config.to_dict()
    out = dict(diff)
    for name in keys:
        if name in full:
            out[name] = full[name]
    for name in ("architectures", "auto_map"):
        if full.get(name) is not None:
            out[name] = full[name]
    dtype = out.get("dtype") or full.get("dtype") or full.get("torch_dtype")
    if dtype is not None:
        out.setdefault("torch_dtype", dtype)  # the key transformers 4 (and the official code) read
    return dict(sorted(out.items()))
