"""Stand-in for a published modeling_dream.py (see ../README.md)."""
from .dream import DreamModel  # noqa: F401

# transformers 4 copies only the direct relative imports of a local module: name them all here.
from .kv_cache import BlockKVCache  # noqa: F401,E402
from .output_head import DiffusionLMOutput  # noqa: F401,E402
from .serialization import full_diff_dict  # noqa: F401,E402
from .swiglu import swiglu  # noqa: F401,E402
