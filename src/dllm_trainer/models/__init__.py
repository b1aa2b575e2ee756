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
]
