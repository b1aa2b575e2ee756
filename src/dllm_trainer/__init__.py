"""Diffusion LLM Trainer: masked-diffusion LM training for BERT, LLaDA and Dream.

Importing the package registers our LLaDA and Dream implementations with transformers' Auto
classes, so published checkpoints load without ``trust_remote_code``.
"""

__version__ = "0.1.0"

from . import models as _models  # noqa: F401  (registration side effect)
