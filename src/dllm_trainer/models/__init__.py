"""Our LLaDA, LLaDA-MoE and Dream implementations, registered with transformers' Auto classes.

Published LLaDA/LLaDA-MoE/Dream checkpoints ship ``auto_map`` entries pointing at remote code.
Once their ``model_type`` ("llada", "lladamoe", "Dream") is registered here, transformers
resolves them to these local classes: ``trust_remote_code`` is resolved to False without
prompting (local code wins), so loading works offline, in CI without stdin, and without
executing downloaded code. The inclusionAI LLaDA-MoE release says ``model_type: llada``;
``LLaDAConfig.from_dict`` recognises its MoE keys and returns a ``LLaDAMoEConfig``.

LLaDA 2.x configs (``llada2_moe``) are registered only to fail with a clear "not supported yet"
message instead of a prompt or an obscure error.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .dream import DreamConfig, DreamModel
from .kv_cache import BlockKVCache
from .llada import LLADA2_MOE_ERROR, LLaDA2MoeConfig, LLaDAConfig, LLaDAModelLM
from .llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM
from .output_head import DiffusionLMOutput

# Our model files double as remote code. For a saved model whose base ships no code of its own,
# export.py copies the files named here for its architecture, plus REMOTE_CODE_SHARED_FILES, beside
# the weights and points auto_map at them. They import only torch, transformers and each other
# (llada.py hands LLaDA-MoE configs to llada_moe.py, so that one travels with it), and work with
# transformers 4.57 and 5.x.
REMOTE_CODE = {
    "LLaDAModelLM": (
        {"AutoConfig": "llada.LLaDAConfig", "AutoModel": "llada.LLaDAModelLM",
         "AutoModelForCausalLM": "llada.LLaDAModelLM"},
        ("llada.py", "llada_moe.py"),
    ),
    "LLaDAMoEModelLM": (
        {"AutoConfig": "llada_moe.LLaDAMoEConfig", "AutoModel": "llada_moe.LLaDAMoEModelLM",
         "AutoModelForCausalLM": "llada_moe.LLaDAMoEModelLM"},
        ("llada_moe.py",),
    ),
    "DreamModel": ({"AutoConfig": "dream.DreamConfig", "AutoModel": "dream.DreamModel"}, ("dream.py",)),
}
REMOTE_CODE_SHARED_FILES = ("kv_cache.py", "output_head.py", "serialization.py", "swiglu.py")

AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

AutoConfig.register(LLaDAMoEConfig.model_type, LLaDAMoEConfig, exist_ok=True)
AutoModel.register(LLaDAMoEConfig, LLaDAMoEModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDAMoEConfig, LLaDAMoEModelLM, exist_ok=True)

AutoConfig.register(DreamConfig.model_type, DreamConfig, exist_ok=True)
AutoModel.register(DreamConfig, DreamModel, exist_ok=True)

AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig, exist_ok=True)

__all__ = [
    "BlockKVCache",
    "DiffusionLMOutput",
    "DreamConfig",
    "DreamModel",
    "LLADA2_MOE_ERROR",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LLaDAMoEConfig",
    "LLaDAMoEModelLM",
    "REMOTE_CODE",
    "REMOTE_CODE_SHARED_FILES",
]
