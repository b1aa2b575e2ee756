"""index.json: a valid Transformer Lab plugin manifest whose form schema agrees with config.py."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_trainer.config import TrainConfig, form_fields, manifest_parameters
from dllm_trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
INDEX = REPO / "index.json"
BASE = {"model_name": "some/model", "dataset_name": "some/data"}

# The fields of the published plugin's form (Transformer Lab users' saved templates use them).
PUBLISHED_FIELDS = [
    "train_device", "gpu_ids", "training_method", "batch_size", "gradient_accumulation_steps", "max_length",
    "dtype", "load_in_4bit", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "learning_rate", "learning_rate_schedule", "warmup_ratio", "weight_decay", "max_grad_norm",
    "num_train_epochs", "train_steps", "logging_steps", "eval_steps", "save_steps", "seed", "mask_prompt_loss",
    "perbatch_cutoff", "resp_cutoff_ratio", "loss_weight_type", "adaptor_name", "log_to_wandb", "eval_strategy",
    "num_proc", "truncation", "noise_eps",
]

# Keywords React JSON Schema Form + AJV (draft-07, strict mode) understand on these properties.
ALLOWED_KEYWORDS = {"title", "description", "type", "default", "enum", "minimum", "maximum", "exclusiveMinimum",
                    "exclusiveMaximum", "multipleOf", "pattern"}
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(INDEX.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def params(manifest) -> dict:
    return manifest["parameters"]


@pytest.fixture(scope="module")
def validator(params):
    jsonschema = pytest.importorskip(
        "jsonschema", reason="the jsonschema package is not installed in this environment (pip install jsonschema)"
    )
    schema = {"type": "object", "properties": params}
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def defaults(params) -> dict:
    return {k: p["default"] for k, p in params.items()}


def gui_string(value) -> str:
    """How the Transformer Lab form sends a value back: strings, booleans as "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ------------------------------------------------------------------------------ plugin metadata


def test_plugin_identity(manifest):
    assert manifest["name"] == "Diffusion LLM Trainer"
    assert manifest["uniqueId"] == "dllm_trainer"
    assert manifest["type"] == "trainer"
    assert manifest["plugin-format"] == "python"
    assert manifest["training_template_format"] == "alpaca"
    assert isinstance(manifest["description"], str) and manifest["description"].strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"])


def test_model_architectures(manifest):
    archs = manifest["model_architectures"]
    for a in ("BertForMaskedLM", "ModernBertForMaskedLM", "LLaDAModelLM", "DreamModel", "BertModel",
              "RobertaForMaskedLM", "Qwen2ForCausalLM", "LlamaForCausalLM"):
        assert a in archs
    assert len(set(archs)) == len(archs)
    from dllm_trainer.config import model_architectures

    assert archs == model_architectures()  # generated from families.py: `dllm-trainer manifest --manifest index.json`


def test_files_and_setup_script_exist(manifest):
    assert manifest["setup-script"] in manifest["files"]
    assert (REPO / manifest["setup-script"]).is_file()
    assert "main.py" in manifest["files"]
    for f in manifest["files"]:
        path = REPO / f
        assert path.is_dir() if f.endswith("/") else path.is_file(), f"{f} listed in index.json but missing"


def test_parameters_ui_present_with_help(manifest, params):
    ui = manifest["parameters_ui"]
    assert set(ui) == set(params)
    for name in params:
        help_text = ui[name].get("ui:help")
        assert isinstance(help_text, str) and len(help_text.strip()) > 10, name
        assert params[name]["title"].strip(), name


# ------------------------------------------------------------------------------ JSON schema


def test_property_schemas_are_plain(params):
    for name, p in params.items():
        assert set(p) <= ALLOWED_KEYWORDS, (name, set(p) - ALLOWED_KEYWORDS)
        assert "required" not in p, name  # `"required": true` inside a property is invalid JSON Schema
        assert p["type"] in JSON_TYPES, name
        d = p["default"]
        assert isinstance(d, JSON_TYPES[p["type"]]), (name, d)
        if p["type"] in ("integer", "number"):
            assert not isinstance(d, bool), name
        if "pattern" in p:
            re.compile(p["pattern"])
            assert "(?P" not in p["pattern"], name  # Python-only syntax, AJV would reject it
        if "enum" in p:
            assert p["enum"] and len(set(p["enum"])) == len(p["enum"]), name
            assert all(isinstance(v, JSON_TYPES[p["type"]]) for v in p["enum"]), name


def test_defaults_validate(validator, params):
    errors = list(validator.iter_errors(defaults(params)))
    assert not errors, [e.message for e in errors]


def _bad_values(p) -> list:
    """Values that violate the property's constraints (one constraint each)."""
    out = []
    t = p["type"]
    if "enum" in p:
        out.append("not-an-option")
    if "minimum" in p:
        out.append(p["minimum"] - (1 if t == "integer" else 0.001))
    if "exclusiveMinimum" in p:
        out.append(p["exclusiveMinimum"])
    if "maximum" in p:
        out.append(p["maximum"] + (p.get("multipleOf", 1) if t == "integer" else 0.001))
    if "multipleOf" in p:
        out.append(p["default"] + 1)
    if "pattern" in p:
        out += ["", "a/b", "..", " bad value "]
    if t == "integer":
        out += [1.5, "8", True]
    elif t == "number":
        out += ["0.5", None]
    elif t == "boolean":
        out += ["true", 1]
    elif t == "string":
        out += [3, ["x"]]
    return out


def test_schema_rejects_bad_values(validator, params):
    checked = 0
    for name, p in params.items():
        for bad in _bad_values(p):
            inst = {**defaults(params), name: bad}
            assert not validator.is_valid(inst), f"{name}={bad!r} should be rejected by the form schema"
            checked += 1
    assert checked > 3 * len(params)


@pytest.mark.parametrize("name,good,bad", [
    ("training_method", ["bert", "llada", "dream"], ["gpt", "BERT"]),
    ("lora_r", [4, 8, 1024], [6, 0, 1028, 2]),
    ("lora_alpha", [4, 16, 4096], [10, 4100]),
    ("gpu_ids", ["auto", "0", "0,2", "0, 1"], ["gpu0", "", "0;1", "auto,0"]),
    ("adaptor_name", ["dllm-adaptor", "x.y_z"], ["", "/", "..", "a/b", "-a"]),
    ("loss_weight_type", ["auto", "scheduler", "uniform", "cart[geo_p:0.3]", "cart[geo_p:1]"],
     ["cart", "cart[geo_p:-1]", "inverse"]),
    ("learning_rate", [1e-4, 1.0], [0, -1e-4, 1.5]),
    ("logging_steps", [0.1, 10], [0, -1]),
    ("batch_size", [1, 4096], [0, 4097]),
    ("noise_eps", [0.0, 0.5], [-0.1, 0.6]),
])
def test_schema_examples(validator, params, name, good, bad):
    base = defaults(params)
    for v in good:
        assert validator.is_valid({**base, name: v}), (name, v)
    for v in bad:
        assert not validator.is_valid({**base, name: v}), (name, v)


# ------------------------------------------------------------------------------ manifest <-> config


def test_published_fields_present(params):
    missing = [f for f in PUBLISHED_FIELDS if f not in params]
    assert not missing, f"fields of the published plugin missing from index.json: {missing}"


def test_manifest_fields_are_config_fields(params):
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(params) <= config_fields
    assert {f.name for f in form_fields()} == set(params)


def _alternative(name: str, p: dict):
    """A valid value different from the default (to show from_dict consumes the field)."""
    d, t = p["default"], p["type"]
    if "enum" in p:
        return next(v for v in p["enum"] if v != d)
    if t == "boolean":
        return not d
    if t == "integer":
        step = p.get("multipleOf", 1)
        return d + step if d + step <= p["maximum"] else d - step
    if t == "number":  # whole numbers stay whole (the *_steps fields), fractions stay fractions
        if d >= 1 and d + 1 <= p["maximum"]:
            return d + 1
        return d + 0.01 if d + 0.01 <= p["maximum"] else d - 0.01
    return {"gpu_ids": "0,1", "adaptor_name": "other-name", "loss_weight_type": "uniform",
            "lora_target_modules": "q_proj,v_proj"}.get(name, "something")


# Values of other fields that a non-default value needs to be valid on its own.
_NEEDS = {"machine_rank": {"num_machines": 2, "main_process_ip": "10.0.0.1"},
          "num_machines": {"main_process_ip": "10.0.0.1"},
          "load_in_4bit": {"lora": True, "train_device": "cuda"}}


def test_every_manifest_field_is_consumed_by_from_dict(params):
    for name, p in params.items():
        alt = _alternative(name, p)
        cfg = TrainConfig.from_dict({**BASE, **_NEEDS.get(name, {}), name: alt})
        got = getattr(cfg, name)
        assert got == pytest.approx(alt) if isinstance(alt, float) else got == alt, (name, alt, got)
        assert got != p["default"], name
        # and sent as a GUI string
        cfg = TrainConfig.from_dict({**BASE, **_NEEDS.get(name, {}), name: gui_string(alt)})
        got = getattr(cfg, name)
        assert got == pytest.approx(alt) if isinstance(alt, float) else got == alt, (name, alt, got)


def test_manifest_defaults_are_config_defaults(params):
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, p in params.items():
        assert p["default"] == fields[name].default, name


def test_manifest_defaults_as_gui_strings_give_a_valid_config(params):
    raw = {k: gui_string(v) for k, v in defaults(params).items()}
    assert all(isinstance(v, str) for v in raw.values())
    from_strings = TrainConfig.from_dict({**BASE, **raw})
    from_natives = TrainConfig.from_dict({**BASE, **defaults(params)})
    assert from_strings == from_natives
    for name in params:
        assert getattr(from_strings, name) == params[name]["default"], name
    # and as a Transformer Lab job config: app keys beside the form values
    job = {**BASE, **raw, "job_id": "3", "template_name": "t", "model_architecture": "LLaDAModelLM",
           "experiment_name": "e", "type": "trainer"}
    assert TrainConfig.from_dict(job) == from_strings


def test_values_the_schema_rejects_are_rejected_by_the_config(params):
    """Config validation is at least as strict as the form (same constraints in both places)."""
    for name, p in params.items():
        for bad in _bad_values(p):
            if p["type"] in ("integer", "number") and isinstance(bad, str):
                continue  # GUI strings of numbers are fine for the config
            if p["type"] == "boolean" and bad in ("true", 1):
                continue  # likewise "true" / 1 for booleans
            if p["type"] == "string" and isinstance(bad, (int, float)) and not isinstance(bad, bool):
                continue  # the config stringifies numbers given for string fields
            if bad is None:
                continue  # null means "the default" in a job config
            with pytest.raises(ConfigError, match=re.escape(name)):
                TrainConfig.from_dict({**BASE, name: bad})


def test_committed_manifest_matches_generated(manifest, capsys):
    from dllm_trainer.config import _main  # what `python -m dllm_trainer.config` runs

    assert _main([]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["parameters"] == manifest["parameters"], "index.json is stale: run python -m dllm_trainer.config --manifest index.json"
    assert generated["parameters_ui"] == manifest["parameters_ui"]
    params, ui = manifest_parameters()
    assert json.loads(json.dumps(params)) == manifest["parameters"] and ui == manifest["parameters_ui"]


def test_manifest_writer_keeps_the_rest_of_the_file(tmp_path, manifest):
    copy = tmp_path / "index.json"
    stale = {**manifest, "parameters": {"x": {"type": "string", "default": ""}}, "parameters_ui": {}}
    copy.write_text(json.dumps(stale, indent=2) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "dllm_trainer.config", "--manifest", str(copy)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(copy.read_text(encoding="utf-8")) == manifest
    assert copy.read_text(encoding="utf-8") == INDEX.read_text(encoding="utf-8")
