"""Diffusion LLM Trainer: masked-diffusion LM training for BERT, LLaDA and Dream.

Importing the package is light: it imports neither torch nor transformers (the command line,
config validation and the launching process need neither; only the training workers do).

Our LLaDA and Dream implementations are registered with transformers' Auto classes
(AutoConfig, AutoModel, AutoModelForCausalLM), so published checkpoints load without
``trust_remote_code``:

- when ``dllm_trainer.models`` is imported (every function of ours that loads a model does), and
- once ``dllm_trainer`` is imported, as soon as transformers' Auto model classes are first used
  (the import of ``transformers.models.auto.modeling_auto``), so
  ``import dllm_trainer; AutoModel.from_pretrained("GSAI-ML/LLaDA-8B-Instruct")`` works.
  ``AutoConfig`` alone, without an Auto model class, needs ``import dllm_trainer.models`` first.

Our own command-line entry points (``dllm-trainer``, ``main.py``) switch the second way off: they
register where they load a LLaDA/Dream model, so checking a BERT job's config and tokenizer in the
launching process does not import transformers' model code.
"""

__version__ = "0.1.0"

import logging as _logging
import warnings as _warnings

# bitsandbytes (imported by peft) warns at import, on CPUs with AVX512-BF16, that it cannot fetch
# an optional CPU 4-bit kernel from the Hub. Our 4-bit path is CUDA-only (config.py), so the
# warning is noise in every worker's log.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# peft 0.17 asks every model `is_gradient_checkpointing`, which transformers 5 deprecates: a
# FutureWarning per LoRA model that no user can act on.
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _register_with_transformers_auto_models() -> None:
    """Import dllm_trainer.models (the registration) right after transformers' Auto model classes
    are first imported in this process, or now if they already are."""
    import sys

    target = "transformers.models.auto.modeling_auto"
    if target in sys.modules:
        from . import models  # noqa: F401
        return
    import importlib.abc
    import importlib.util

    class _AfterImport(importlib.abc.Loader):
        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            self.loader.exec_module(module)
            try:
                from . import models  # noqa: F401
            except Exception as e:  # noqa: BLE001 - transformers itself must keep working
                _warnings.warn(f"dllm_trainer could not register LLaDA/Dream with transformers: {e}", stacklevel=2)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target_=None):
            if name != target:
                return None
            sys.meta_path.remove(self)  # once; and so that the lookup below finds the real module
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                spec.loader = _AfterImport(spec.loader)
            return spec

    global _finder
    _finder = _Finder()
    sys.meta_path.insert(0, _finder)


_finder = None


def _stop_auto_registration() -> None:
    """For our own entry points (see the module docstring): they register explicitly."""
    import sys

    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


_register_with_transformers_auto_models()
