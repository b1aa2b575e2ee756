"""Outputs that load anywhere (training/export.py): fused models and saved checkpoints load without
dllm_trainer, with transformers 4.57 (a second venv, tests/compat_env.py) and 5.x, through
AutoTokenizer / AutoModel(trust_remote_code=True), with our model's logits; and the model card.

Bases, built here from the tiny parity fixtures:
- "hub": laid out like a published checkpoint in the Hugging Face cache
  (models--GSAI-ML--LLaDA-tiny/snapshots/<rev>/): the fixture weights, a tokenizer saved by
  transformers 4.57, remote-code files (tests/assets/hub_code: the published file and class names),
  a generation_config.json and a model card with a license;
- "plain": the fixture weights and the same tokenizer, no code (our own model file must come along).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dllm_trainer  # noqa: F401  (registers LLaDA / Dream: "our model")
from compat_env import REPO, CompatEnvError, clean_env, compat_python
from dllm_trainer.config import TrainConfig
from dllm_trainer.data import asset_path
from dllm_trainer.training import export

TESTS = Path(__file__).resolve().parent
MODELS_SRC = REPO / "src" / "dllm_trainer" / "models"
HUB_IDS = {"llada": "GSAI-ML/LLaDA-tiny", "dream": "Dream-org/Dream-tiny"}
FIXTURE = {"llada": "llada-tiny", "llada_moe": "llada-moe-tiny", "dream": "dream-tiny"}
METHOD = {"llada": "llada", "llada_moe": "llada", "dream": "dream"}
# Our files a folder without the base's code gets, by architecture (models.REMOTE_CODE).
OUR_FILES = {"llada": ("llada.py", "llada_moe.py"), "llada_moe": ("llada_moe.py",), "dream": ("dream.py",)}
CODE_FILES = {"llada": ("configuration_llada.py", "modeling_llada.py"),
              "dream": ("configuration_dream.py", "modeling_dream.py")}  # tests/assets/hub_code
SHARED = ("kv_cache.py", "output_head.py", "serialization.py", "swiglu.py")
TEXT = "Hi, mask <|mdm_mask|> and end<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------
# fast: Hub id, model card
# ---------------------------------------------------------------------------------------------
def test_hub_id_of_a_base_model(tmp_path):
    assert export.hub_id("GSAI-ML/LLaDA-8B-Instruct") == "GSAI-ML/LLaDA-8B-Instruct"
    assert export.hub_id("TransformerLab/my-model") is None  # a workspace id, not a Hub repository
    cache = tmp_path / "hub" / "models--Dream-org--Dream-v0-Base-7B" / "snapshots" / "0123abcd"
    cache.mkdir(parents=True)
    assert export.hub_id(str(cache)) == "Dream-org/Dream-v0-Base-7B"
    ws = tmp_path / "workspace" / "models" / "GSAI-ML_LLaDA-8B-Instruct"
    ws.mkdir(parents=True)
    (ws / "index.json").write_text(json.dumps({"model_id": "GSAI-ML/LLaDA-8B-Instruct",
                                               "json_data": {"huggingface_repo": "GSAI-ML/LLaDA-8B-Instruct"}}))
    assert export.hub_id("GSAI-ML/LLaDA-8B-Instruct", str(ws)) == "GSAI-ML/LLaDA-8B-Instruct"
    (ws / "index.json").write_text(json.dumps({"model_id": "mine", "json_data": {"huggingface_repo": ""}}))
    assert export.hub_id("mine", str(ws)) is None  # a model trained here: no Hub id
    local = tmp_path / "copy"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "GSAI-ML/LLaDA-8B-Base"}))
    assert export.hub_id(str(local)) == "GSAI-ML/LLaDA-8B-Base"
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert export.hub_id(str(local)) is None


@pytest.mark.parametrize("method", ["bert", "llada", "dream", "a2d"])
def test_model_card_names_the_hub_base_and_only_the_methods_settings(tmp_path, method):
    data = tmp_path / "chats.jsonl"
    if method in ("llada", "dream"):  # the folder carries remote code (make_portable)
        (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": f"{method}.Model"}}))
    cfg = TrainConfig.from_dict({"model_name": str(tmp_path / "base"), "dataset_name": str(data),
                                 "training_method": method, "lora": True})
    meta = export.training_metadata(cfg, {"loss": 0.5, "global_step": 7}, base_model=str(tmp_path / "base"),
                                    adaptor_dir=None, base_hub_id="org/base-model", license_id="apache-2.0")
    export.write_model_card(str(tmp_path), meta, name="my-model")
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: org/base-model" in front and "library_name: transformers" in front
    assert "license: apache-2.0" in front
    assert f"pipeline_tag: {'fill-mask' if method == 'bert' else 'text-generation'}" in front
    assert str(tmp_path) not in card and str(tmp_path) not in json.dumps(meta)  # no local paths
    own = {"dream_padding": "dream", "perbatch_cutoff": "dream", "resp_cutoff_ratio": "dream",
           "a2d_shift_logits": "a2d"}
    for key, owner in own.items():
        assert (f"| {key} |" in card) == (method == owner), key
        assert (key in meta) == (method == owner), key
    if method == "bert":
        assert "AutoModelForMaskedLM.from_pretrained" in card and "trust_remote_code" not in card
    elif method == "a2d":  # the base causal LM's own class, no remote code
        assert "AutoModelForCausalLM.from_pretrained" in card and "trust_remote_code" not in card
    else:  # how to load it with and without our package
        assert "AutoModel.from_pretrained" in card and "trust_remote_code=True" in card
        assert "import dllm_trainer" in card
    # without a Hub id, no base_model in the front matter (never a local path)
    meta = export.training_metadata(cfg, {}, base_model=str(tmp_path / "base"), adaptor_dir=None)
    export.write_model_card(str(tmp_path), meta, name="my-model")
    card = (tmp_path / "README.md").read_text()
    assert "base_model:" not in card.split("---")[1] and str(tmp_path) not in card


def test_license_from_the_base_model_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# LLaDA\n")
    assert export.base_license(str(tmp_path)) == "mit"
    (tmp_path / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert export.base_license(str(tmp_path)) is None
    assert export.base_license(None) is None


# ---------------------------------------------------------------------------------------------
# slow: load in transformers 4.57 (second venv) and 5.x without dllm_trainer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def compat_py() -> Path:
    try:
        return compat_python()
    except CompatEnvError as e:
        pytest.fail(f"the transformers 4.57 test environment could not be built: {e}")


def _run_script(python, args, *, cwd, timeout=900, **env):
    proc = subprocess.run([str(python), "-I", *map(str, args)], cwd=str(cwd), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout,
                          env=clean_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _make_base(kind: str, family: str, root: Path, compat_py: Path, fixtures_dir: Path) -> Path:
    if kind == "hub":
        org, name = HUB_IDS[family].split("/")
        base = root / "hf" / "hub" / f"models--{org}--{name}" / "snapshots" / "0123456789abcdef"
    else:
        base = root / f"{family}-plain"
    base.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (fixtures_dir / FIXTURE[family] / f).exists():
            shutil.copy2(fixtures_dir / FIXTURE[family] / f, base)
    # The tokenizer as a transformers 4 user saved it (the format published checkpoints carry).
    tok4 = root / "tokenizer-saved-by-transformers-4"
    if not tok4.exists():
        _run_script(compat_py, ["-c", "import sys; sys.path.insert(0, sys.argv[1]); from tiny_tokenizer import "
                                "make_tiny_tokenizer as m; m().save_pretrained(sys.argv[2])", TESTS, tok4], cwd=root)
    for f in tok4.iterdir():
        shutil.copy2(f, base)
    if kind == "hub":
        for f in CODE_FILES[family]:
            shutil.copy2(TESTS / "assets" / "hub_code" / family / f, base)
        for f in (*OUR_FILES[family], *SHARED):
            shutil.copy2(MODELS_SRC / f, base)
        if not (base / "generation_config.json").exists():
            (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 2}) + "\n")
        (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return base


def _random_adaptor(base: Path, family: str, out: Path) -> Path:
    """A LoRA adaptor with non-zero updates (as after training), saved as the trainer saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "ff_out" if family == "llada" else "lm_head"]  # a head too
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    export.make_portable(str(out), str(base))
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, compat_py, fixtures_dir):
    """name -> (folder, base, family): fused models from both kinds of base, and the checkpoint and
    final model of a short full fine-tune."""
    from dllm_trainer.training.train import run_training

    root = tmp_path_factory.mktemp("portable")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for family, kind in (("llada", "hub"), ("llada", "plain"), ("dream", "hub"), ("dream", "plain"),
                             ("llada_moe", "plain")):
            base = _make_base(kind, family, root, compat_py, fixtures_dir)
            adaptor = _random_adaptor(base, family, root / f"{family}-{kind}-adaptor")
            fused = root / f"{family}-{kind}-fused"
            export.fuse_adaptor(str(base), str(adaptor), str(fused), family_name=METHOD[family], log=lambda *a: None)
            out[f"{family}-{kind}-fused"] = (fused, base, family)
        base = out["dream-hub-fused"][1]
        job = TrainConfig.from_dict(dict(
            model_name=str(base), dataset_name=str(asset_path("chat_small.jsonl")), output_dir=str(root / "run"),
            training_method="dream", train_device="cpu", max_length=48, batch_size=4, num_train_epochs=0,
            train_steps=2, save_steps=1, logging_steps=1, eval_strategy="no", lora=False, learning_rate=1e-3))
        result = run_training(job, log=lambda *a: None)
        out["dream-hub-checkpoint"] = (root / "run" / "checkpoint-2", base, "dream")
        out["dream-hub-final"] = (Path(result.final_model_dir), base, "dream")
        # A base whose tokenizer (saved by transformers 5) has no mask token: training adds one, so
        # the saved tokenizer is a changed one, written for transformers 4 by make_portable.
        from core_helpers import tiny_tokenizer_without_mask

        base = root / "llada-nomask"
        base.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy2(fixtures_dir / "llada-tiny" / f, base)
        config = json.loads((base / "config.json").read_text())
        config.pop("mask_token_id", None)
        (base / "config.json").write_text(json.dumps(config))
        tiny_tokenizer_without_mask().save_pretrained(base)
        job = job.replace(model_name=str(base), output_dir=str(root / "run-nomask"), training_method="llada",
                          save_steps=1000)
        result = run_training(job, log=lambda *a: None)
        out["llada-nomask-final"] = (Path(result.final_model_dir), base, "llada")
    finally:
        torch.set_num_threads(threads)
    return out


def _our_logits_and_spec(outputs, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    g = torch.Generator().manual_seed(0)
    spec, ours = {"text": TEXT, "models": []}, {}
    for name, (folder, _, _) in outputs.items():
        ids = torch.randint(3, 499, (2, 11), generator=g)
        ids[:, 3] = 500  # a mask token
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()  # our implementation
        with torch.no_grad():
            ours[name] = model(input_ids=ids).logits
        tok = AutoTokenizer.from_pretrained(folder)
        ours[name + ":ids"], ours[name + ":mask"] = tok(TEXT)["input_ids"], tok.mask_token_id
        spec["models"].append({"name": name, "folder": str(folder), "auto_class": "AutoModel",
                               "input_ids": ids.tolist()})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return ours


def _load_elsewhere(python, tmp_path, label) -> tuple[dict, Path]:
    out = tmp_path / label
    out.mkdir()
    # -I and a working directory outside the repository: our sources are not on the path.
    _run_script(python, [TESTS / "portable_load.py", tmp_path / "spec.json", out], cwd=out, HF_HOME=str(out / "hf"))
    return json.loads((out / "result.json").read_text()), out


@pytest.mark.slow
def test_outputs_load_without_our_package_in_transformers_4_and_5(outputs, compat_py, tmp_path):
    ours = _our_logits_and_spec(outputs, tmp_path)
    for python, label, major in ((compat_py, "tf4", "4.57."), (Path(sys.executable), "tf5", "5.")):
        result, out = _load_elsewhere(python, tmp_path, label)
        assert result["transformers"].startswith(major), result["transformers"]
        assert not result["dllm_trainer_imported"]
        if label == "tf4":
            assert not result["dllm_trainer_installed"]  # a plain environment
        for name, (folder, base, family) in outputs.items():
            got = result["models"][name]
            logits = load_file(str(out / f"{name}.safetensors"))["logits"]
            diff = (logits - ours[name]).abs().max().item()
            assert diff <= 1e-4, (label, name, diff)
            assert got["ids"] == ours[name + ":ids"] and got["mask_token_id"] == ours[name + ":mask"], (label, name)
            # The remote code that ran is the base's published code when it has some, else ours.
            ran = {m.rsplit(".", 1)[-1] for m in got["new_modules"] if m.startswith("transformers_modules.")}
            assert family in ran and got["model_module"].startswith("transformers_modules."), (label, name, ran)
            assert (f"modeling_{family}" in ran) == ("-hub-" in name), (label, name, ran)
        assert result["models"]["llada-nomask-final"]["mask_token_id"] == 512  # the token training added


@pytest.mark.slow
def test_output_folders_keep_the_bases_files(outputs):
    for name, (folder, base, family) in outputs.items():
        config = json.loads((folder / "config.json").read_text())
        if name == "llada-nomask-final":
            assert config["auto_map"]["AutoModel"] == "llada.LLaDAModelLM" and config["mask_token_id"] == 512
        elif "-hub-" in name:
            assert config["auto_map"] == json.loads((base / "config.json").read_text())["auto_map"]
            for f in (*CODE_FILES[family], *OUR_FILES[family], *SHARED):
                assert (folder / f).read_bytes() == (base / f).read_bytes(), (name, f)
            assert (folder / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
        else:
            assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel"}
            assert all(v.startswith(family + ".") for v in config["auto_map"].values()), config["auto_map"]
            for f in (*OUR_FILES[family], *SHARED):
                assert (folder / f).read_bytes() == (MODELS_SRC / f).read_bytes(), (name, f)
            assert sorted(p.name for p in folder.glob("*.py")) == sorted((*OUR_FILES[family], *SHARED))
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        assert tokenizer_config["tokenizer_class"] != "TokenizersBackend"
        if name == "llada-nomask-final":  # changed: written for transformers 4 (see the next test)
            assert tokenizer_config["mask_token"] and (folder / "special_tokens_map.json").is_file()
            continue
        # the tokenizer was not changed: the base's own (transformers 4 written) files, byte for byte
        for f in TOKENIZER_FILES:
            assert (folder / f).read_bytes() == (base / f).read_bytes(), (name, f)


def test_changed_tokenizer_is_written_for_transformers_4(tmp_path):
    """A tokenizer we changed (here: a pad token added) is saved by transformers 5, then renamed to
    a class transformers 4 knows, with its special tokens map."""
    sys.path.insert(0, str(TESTS))
    from tiny_tokenizer import make_tiny_tokenizer

    base = tmp_path / "base"
    make_tiny_tokenizer().save_pretrained(base)
    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    out = tmp_path / "out"
    tok.save_pretrained(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    export.make_portable(str(out), str(base))
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["additional_special_tokens"] == ["<|extra|>"] and "extra_special_tokens" not in config
    specials = json.loads((out / "special_tokens_map.json").read_text())
    assert specials["mask_token"] == "<|mdm_mask|>" and specials["additional_special_tokens"] == ["<|extra|>"]
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(out)
    assert again("<|extra|>a")["input_ids"] == tok("<|extra|>a")["input_ids"]
