"""Load saved model folders the way a user without dllm_trainer does (run as a script, by
test_portable_outputs.py, under transformers 4.57 or 5.x).

    python portable_load.py SPEC.json OUT_DIR

SPEC: {"text": str, "models": [{"name", "folder", "auto_class", "input_ids": [[...]]}, ...]}.
For each model: AutoTokenizer.from_pretrained(folder) encodes ``text``; the Auto class loads the
model with trust_remote_code=True; its logits on ``input_ids`` go to OUT_DIR/<name>.safetensors.
OUT_DIR/result.json records the versions, the tokenizer class and ids, and the modules each load
imported. dllm_trainer is blocked: importing it anywhere fails.
"""
import importlib.util
import json
import os
import sys

sys.modules["dllm_trainer"] = None  # any `import dllm_trainer` now raises ImportError

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def main(spec_path: str, out_dir: str) -> None:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    result = {"transformers": transformers.__version__, "torch": torch.__version__,
              "dllm_trainer_installed": _installed("dllm_trainer"), "models": {}}
    for item in spec["models"]:
        folder = item["folder"]
        before = set(sys.modules)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model_cls = getattr(transformers, item["auto_class"])
        model = model_cls.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(item["input_ids"])).logits
        save_file({"logits": logits.float().contiguous()}, os.path.join(out_dir, item["name"] + ".safetensors"))
        result["models"][item["name"]] = {
            "tokenizer_class": type(tok).__name__,
            "ids": tok(spec["text"])["input_ids"],
            "mask_token_id": tok.mask_token_id,
            "model_module": type(model).__module__,
            "config_module": type(model.config).__module__,
            "new_modules": sorted(set(sys.modules) - before),  # the remote code this load ran
        }
    result["dllm_trainer_imported"] = sys.modules.get("dllm_trainer") is not None
    with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)


def _installed(name: str) -> bool:
    """Whether the package is on this interpreter's path (sys.modules blocks the import, not the search)."""
    saved = sys.modules.pop(name)
    try:
        return importlib.util.find_spec(name) is not None
    finally:
        sys.modules[name] = saved


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
