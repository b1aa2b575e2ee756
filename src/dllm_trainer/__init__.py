"""Diffusion LLM Trainer: masked-diffusion LM training for BERT, LLaDA and Dream.

Importing the package registers our LLaDA and Dream implementations with transformers' Auto
classes, so published checkpoints load without ``trust_remote_code``.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft) warns at import, on CPUs with AVX512-BF16, that it cannot fetch
# an optional CPU 4-bit kernel from the Hub. Our 4-bit path is CUDA-only (config.py), so the
# warning is noise in every worker's log.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from . import models as _models  # noqa: E402,F401  (registration side effect)
