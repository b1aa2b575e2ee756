"""TrainConfig: parsing of GUI strings and JSON values, every validation path, config files."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from dllm_trainer.config import APP_KEYS, TrainConfig, form_fields, load_config_file
from dllm_trainer.errors import ConfigError

BASE = {"model_name": "some/model", "dataset_name": "some/data"}


def make(**kw) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **kw})


def reject(match: str | None = None, **kw) -> str:
    """The ConfigError message for these values (asserting that there is one)."""
    with pytest.raises(ConfigError) as ei:
        make(**kw)
    msg = str(ei.value)
    if match is not None:
        assert re.search(match, msg), f"{match!r} not in {msg!r}"
    return msg


def numbers_in(msg: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", msg)]


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SCHEMA = {name: f.metadata.get("schema", {}) for name, f in FIELDS.items()}
NUMERIC = [n for n, f in FIELDS.items() if f.type in ("int", "float", int, float)]
INTS = [n for n, f in FIELDS.items() if f.type in ("int", int)]
ENUMS = [n for n, s in SCHEMA.items() if "enum" in s]

# Fields whose bounds interact with another field: the context that makes the bound itself valid.
CONTEXT = {
    "machine_rank": {"num_machines": 1024, "main_process_ip": "10.0.0.1"},
    "num_machines": {"main_process_ip": "10.0.0.1"},
    "min_mask_ratio": {"max_mask_ratio": 1.0},
}


# ------------------------------------------------------------------------------ parsing


def test_gui_strings_are_parsed():
    cfg = make(
        lora="false", mask_prompt_loss="true", log_to_wandb="TRUE", perbatch_cutoff="0", group_by_length="on",
        warmup_ratio="0.25", batch_size="8", learning_rate="1e-4", max_length=" 64 ", gradient_accumulation_steps="2.0",
        logging_steps="0.5", eval_steps="20", noise_eps="0.01",
    )
    assert cfg.lora is False and cfg.mask_prompt_loss is True and cfg.log_to_wandb is True
    assert cfg.perbatch_cutoff is False and cfg.group_by_length is True
    assert cfg.warmup_ratio == 0.25 and isinstance(cfg.warmup_ratio, float)
    assert cfg.batch_size == 8 and type(cfg.batch_size) is int
    assert cfg.learning_rate == pytest.approx(1e-4)
    assert cfg.max_length == 64 and type(cfg.max_length) is int
    assert cfg.gradient_accumulation_steps == 2 and type(cfg.gradient_accumulation_steps) is int
    assert cfg.logging_steps == 0.5 and cfg.eval_steps == 20
    assert cfg.noise_eps == pytest.approx(0.01)


def test_json_natives_are_accepted():
    cfg = make(lora=False, mask_prompt_loss=1, warmup_ratio=0, batch_size=8, learning_rate=0.001,
               max_length=64.0, seed=7, training_method="llada", gpu_ids="0,1")
    assert cfg.lora is False and cfg.mask_prompt_loss is True
    assert cfg.warmup_ratio == 0.0 and isinstance(cfg.warmup_ratio, float)
    assert cfg.batch_size == 8 and cfg.max_length == 64 and type(cfg.max_length) is int
    assert cfg.learning_rate == 0.001 and cfg.seed == 7 and cfg.training_method == "llada"
    assert cfg.gpu_id_list == [0, 1]


def test_defaults_are_the_field_defaults():
    cfg = make()
    for name, f in FIELDS.items():
        if name in BASE:
            continue
        assert getattr(cfg, name) == f.default, name
    # documented defaults
    assert cfg.training_method == "bert" and cfg.lora is True and cfg.loss_weight == ("scheduler", None)
    assert cfg.gpu_id_list is None and cfg.trains_by_steps is False


def test_none_and_empty_numeric_string_give_the_default():
    cfg = make(batch_size=None, learning_rate="", seed="  ", training_method=None)
    assert cfg.batch_size == FIELDS["batch_size"].default
    assert cfg.learning_rate == FIELDS["learning_rate"].default
    assert cfg.seed == FIELDS["seed"].default
    assert cfg.training_method == FIELDS["training_method"].default


def test_numbers_passed_to_string_fields_become_strings():
    cfg = make(gpu_ids=0, adaptor_name=123)
    assert cfg.gpu_ids == "0" and cfg.gpu_id_list == [0]
    assert cfg.adaptor_name == "123"


@pytest.mark.parametrize("value", ["maybe", "2", [], {}, 0.5, 2])
def test_bad_booleans(value):
    msg = reject(lora=value)
    assert "lora" in msg and "true or false" in msg


def test_string_field_rejects_list():
    reject(r"model_name.*string", model_name=["a"])


def test_not_a_dict():
    with pytest.raises(ConfigError, match="JSON object"):
        TrainConfig.from_dict(["model_name", "x"])


def test_model_and_dataset_are_required():
    with pytest.raises(ConfigError, match="model_name is required"):
        TrainConfig.from_dict({"dataset_name": "d"})
    with pytest.raises(ConfigError, match="dataset_name is required"):
        TrainConfig.from_dict({"model_name": "m", "dataset_name": "   "})


def test_nul_in_paths_rejected():
    reject(r"output_dir.*NUL", output_dir="out\x00put")


# ------------------------------------------------------------------------------ enums


def test_every_enum_field_rejects_other_values_naming_the_allowed_ones():
    assert {"training_method", "train_device", "dtype", "truncation", "learning_rate_schedule",
            "eval_strategy"} <= set(ENUMS)
    for name in ENUMS:
        allowed = SCHEMA[name]["enum"]
        for value in allowed:
            assert getattr(make(**{name: value}), name) == value
        msg = reject(**{name: "definitely-not-allowed"})
        assert name in msg and "definitely-not-allowed" in msg
        for value in allowed:
            assert value in msg, (name, value, msg)


def test_enum_values_spelled_out():
    msg = reject(training_method="gpt")
    assert all(v in msg for v in ("bert", "llada", "dream"))
    msg = reject(dtype="fp8")
    assert all(v in msg for v in ("auto", "bfloat16", "float16", "float32"))
    reject(r"train_device.*cuda.*cpu.*tpu", train_device="mps")
    reject(r"truncation.*right.*filter", truncation="left")
    reject(r"eval_strategy.*steps.*epoch.*no", eval_strategy="always")
    reject(r"learning_rate_schedule.*constant.*linear.*cosine", learning_rate_schedule="polynomial")
    # enums are case-sensitive, as the form's select sends exact values
    reject("training_method", training_method="BERT")


# ------------------------------------------------------------------------------ numeric ranges


def _bounds(name):
    s = SCHEMA[name]
    return s.get("minimum"), s.get("exclusiveMinimum"), s.get("maximum")


def test_every_numeric_field_has_a_range():
    for name in NUMERIC:
        lo, xlo, hi = _bounds(name)
        assert (lo is not None or xlo is not None) and hi is not None, name


@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_range_bounds(name):
    lo, xlo, hi = _bounds(name)
    ctx = CONTEXT.get(name, {})
    step = SCHEMA[name].get("multipleOf", 1)
    is_int = name in INTS
    # the bounds themselves are accepted (where another field allows them)
    if lo is not None and not (name == "max_mask_ratio"):
        ctx_lo = {"max_mask_ratio": 1.0} if name == "min_mask_ratio" else ctx
        if name == "machine_rank":
            ctx_lo = {}
        assert getattr(make(**{name: lo}, **ctx_lo), name) == lo
    if xlo is not None:
        tiny = xlo + 1e-6
        assert getattr(make(**{name: tiny}, **ctx), name) == pytest.approx(tiny)
    if name != "min_mask_ratio":  # min_mask_ratio must stay below max_mask_ratio (<= 1)
        assert getattr(make(**{name: hi}, **ctx), name) == hi
    # just outside is rejected, and the message names the field and the violated bound
    below = (lo - step if is_int else lo - 0.01) if lo is not None else xlo
    msg = reject(**{name: below}, **ctx)
    assert msg.startswith(name + " "), msg
    bound = lo if lo is not None else xlo
    assert bound in numbers_in(msg), msg
    assert hi in numbers_in(msg), msg
    above = hi + step if is_int else hi + 0.01
    msg = reject(**{name: above}, **ctx)
    assert msg.startswith(name + " ") and hi in numbers_in(msg), msg
    # as GUI strings too
    reject(name, **{name: str(above)}, **ctx)


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", ["abc", "1,5", True, [1], {"a": 1}, "nan", "inf", float("nan")])
def test_numeric_fields_reject_wrong_types(name, value):
    msg = reject(**{name: value})
    assert msg.startswith(name + " ") and "number" in msg, msg


@pytest.mark.parametrize("name", INTS)
def test_integer_fields_reject_fractions(name):
    lo, xlo, hi = _bounds(name)
    value = (lo or 0) + 1.5
    msg = reject(**{name: value}, **CONTEXT.get(name, {}))
    assert msg.startswith(name + " ") and "whole number" in msg, msg
    reject(name, **{name: str(value)})


def test_specific_ranges_in_messages():
    msg = reject(batch_size=0)
    assert "batch_size" in msg and ">= 1" in msg and "<= 4096" in msg
    reject(r"learning_rate must be > 0", learning_rate=0)
    reject(r"learning_rate", learning_rate=-1e-4)
    reject(r"warmup_ratio.*<= 1", warmup_ratio="1.5")
    reject(r"noise_eps.*<= 0.5", noise_eps=0.6)
    reject(r"lora_dropout.*<= 0.9", lora_dropout=0.95)
    reject(r"max_length must be >= 0", max_length=-1)


@pytest.mark.parametrize("name,good,bad", [("lora_r", [4, 8, 64, "16"], [6, 30, "10"]),
                                           ("lora_alpha", [4, 12, 128], [2 + 4, 33, "66"])])
def test_lora_multiple_of_four(name, good, bad):
    for v in good:
        assert getattr(make(**{name: v}), name) == int(v)
    for v in bad:
        msg = reject(**{name: v})
        assert name in msg and "multiple of 4" in msg, msg


# ------------------------------------------------------------------------------ patterns


@pytest.mark.parametrize("value,expected", [("auto", None), ("0", [0]), ("0,2", [0, 2]), ("0, 2 ,3", [0, 2, 3]),
                                            ("12", [12])])
def test_gpu_ids_accepted(value, expected):
    assert make(gpu_ids=value).gpu_id_list == expected


@pytest.mark.parametrize("value", ["", "0\n", "auto\n", "gpu0", "0;1", "-1", "0,", ",0", "all", "0 1", "auto,0", "cuda:0"])
def test_gpu_ids_rejected(value):
    msg = reject(gpu_ids=value)
    assert "gpu_ids" in msg and "auto" in msg and "comma" in msg, msg


@pytest.mark.parametrize("value,expected", [
    ("auto", ("scheduler", None)), ("scheduler", ("scheduler", None)), ("uniform", ("uniform", None)),
    ("cart[geo_p:0.3]", ("cart", 0.3)), ("cart[geo_p:1]", ("cart", 1.0)), ("cart[geo_p:1.0]", ("cart", 1.0)),
    ("cart[geo_p:.05]", ("cart", 0.05)), ("cart[geo_p:0.001]", ("cart", 0.001)),
])
def test_loss_weight_type_accepted(value, expected):
    kind, p = make(loss_weight_type=value).loss_weight
    assert kind == expected[0]
    assert (p is None) if expected[1] is None else p == pytest.approx(expected[1])


@pytest.mark.parametrize("value", ["cart[geo_p:0]", "cart[geo_p:0.0]", "cart[geo_p:1.5]", "cart[geo_p:2]"])
def test_cart_geo_p_out_of_range(value):
    msg = reject(loss_weight_type=value)
    assert "loss_weight_type" in msg and "geo_p" in msg and "(0, 1]" in msg, msg


@pytest.mark.parametrize("value", ["cart", "cart[]", "cart[geo_p:]", "cart[geo_p:-0.1]", "cart[p:0.3]", "CART[geo_p:0.3]",
                                   "inverse", "", "scheduler ", "cart[geo_p:0.3]x"])
def test_loss_weight_type_rejected(value):
    msg = reject(loss_weight_type=value)
    assert "loss_weight_type" in msg
    for allowed in ("auto", "scheduler", "uniform", "cart[geo_p:P]"):
        assert allowed in msg, msg


def test_auto_loss_weight_follows_the_method():
    assert make(training_method="bert").loss_weight == ("scheduler", None)
    assert make(training_method="llada").loss_weight == ("scheduler", None)
    assert make(training_method="dream").loss_weight == ("cart", 0.3)
    assert make(training_method="dream", loss_weight_type="uniform").loss_weight == ("uniform", None)


@pytest.mark.parametrize("value", ["", "/", "..", ".", "a/b", "../x", "a\\b", " a", "-a", ".hidden", "a b", "x" * 101, "é",
                                   "a\n", "ok\n", "a\x00"])
def test_adaptor_name_unsafe(value):
    msg = reject(adaptor_name=value)
    assert "adaptor_name" in msg and "letters, digits" in msg, msg


@pytest.mark.parametrize("value", ["dllm-adaptor", "a", "My_Adaptor.v2", "x" * 100, "7b-lora"])
def test_adaptor_name_safe(value):
    assert make(adaptor_name=value).adaptor_name == value


def test_lora_target_modules():
    assert make(lora_target_modules="all-linear").lora_target_list == "all-linear"
    assert make(lora_target_modules="q_proj, v_proj,attn.out").lora_target_list == ["q_proj", "v_proj", "attn.out"]
    for bad in (",", "q proj", "q_proj;v_proj", "a/b"):
        msg = reject(lora_target_modules=bad)
        assert "lora_target_modules" in msg and "all-linear" in msg


# ------------------------------------------------------------------------------ step fields


@pytest.mark.parametrize("name", ["logging_steps", "eval_steps", "save_steps"])
def test_step_fields_fraction_or_whole(name):
    assert getattr(make(**{name: "0.5"}), name) == 0.5
    assert getattr(make(**{name: 0.999}), name) == 0.999
    assert getattr(make(**{name: 1}), name) == 1
    assert getattr(make(**{name: "25"}), name) == 25
    assert getattr(make(**{name: 25.0}), name) == 25
    for bad in (1.5, "2.5", 100.25):
        msg = reject(**{name: bad})
        assert name in msg and "whole number" in msg and "(0, 1)" in msg, msg
    for bad in (0, "0", -1, -0.5):
        msg = reject(**{name: bad})
        assert name in msg and "> 0" in msg, msg


@pytest.mark.parametrize("value,total,expected", [
    (0.25, 100, 25), (0.25, 10, 3), (0.25, 1, 1), (0.001, 10, 1), (0.5, 7, 4), (0.999, 1000, 999),
    (7, 3, 7), (1, 100, 1), (25.0, 10, 25),
])
def test_resolve_steps(value, total, expected):
    cfg = make(eval_steps=value)
    got = cfg.resolve_steps("eval_steps", total)
    assert got == expected and type(got) is int


def test_epochs_zero_trains_by_steps():
    cfg = make(num_train_epochs="0", train_steps="37")
    assert cfg.trains_by_steps is True and cfg.train_steps == 37
    assert make(num_train_epochs=2).trains_by_steps is False
    reject(r"train_steps.*>= 1", num_train_epochs=0, train_steps=0)


def test_epochs_zero_becomes_max_steps_in_training_arguments(tmp_path):
    import torch

    from dllm_trainer.training.train import build_training_args

    cfg = make(num_train_epochs=0, train_steps=37, train_device="cpu", output_dir=str(tmp_path))
    args = build_training_args(cfg, torch.float32, has_eval=False)
    assert args.max_steps == 37
    cfg = make(num_train_epochs=3, train_device="cpu", output_dir=str(tmp_path))
    args = build_training_args(cfg, torch.float32, has_eval=False)
    assert args.max_steps <= 0 and args.num_train_epochs == 3


# ------------------------------------------------------------------------------ cross-field rules


def test_mask_ratio_order():
    cfg = make(min_mask_ratio="0.2", max_mask_ratio="0.8")
    assert (cfg.min_mask_ratio, cfg.max_mask_ratio) == (0.2, 0.8)
    for lo, hi in ((0.5, 0.5), (0.6, 0.4), (1.0, 1.0), (0.0, 0.0)):
        msg = reject(min_mask_ratio=lo, max_mask_ratio=hi)
        assert "min_mask_ratio" in msg and "max_mask_ratio" in msg, msg


def test_load_in_4bit_rules():
    cfg = make(load_in_4bit="true", lora="true", train_device="cuda")
    assert cfg.load_in_4bit is True
    msg = reject(load_in_4bit=True, lora=False)
    assert "load_in_4bit" in msg and "lora" in msg
    for dev in ("cpu", "tpu"):
        msg = reject(load_in_4bit=True, lora=True, train_device=dev)
        assert "load_in_4bit" in msg and "cuda" in msg and dev in msg


def test_multi_node_rules():
    cfg = make(num_machines=2, machine_rank=1, main_process_ip="10.1.2.3", main_process_port="29501")
    assert (cfg.num_machines, cfg.machine_rank, cfg.main_process_port) == (2, 1, 29501)
    msg = reject(num_machines=2, machine_rank=2, main_process_ip="10.1.2.3")
    assert "machine_rank" in msg and "num_machines" in msg and "2" in msg
    reject("machine_rank", machine_rank=1)  # one machine: only rank 0
    msg = reject(num_machines=2)
    assert "main_process_ip" in msg and "num_machines" in msg
    reject("main_process_ip", num_machines=4, machine_rank=0, main_process_ip="   ")


def test_replace_validates():
    cfg = make()
    assert cfg.replace(batch_size=16).batch_size == 16
    with pytest.raises(ConfigError, match="batch_size"):
        cfg.replace(batch_size=0)


# ------------------------------------------------------------------------------ keys


def test_unknown_key_with_did_you_mean():
    msg = reject(learning_rte=1e-4)
    assert "learning_rte" in msg and "did you mean 'learning_rate'" in msg
    msg = reject(lora_rank=8)
    assert "lora_rank" in msg and "did you mean 'lora_r" in msg
    msg = reject(zzzzqqq=1)
    assert "zzzzqqq" in msg and "did you mean" not in msg


def test_unknown_keys_tolerated_when_not_strict():
    cfg = TrainConfig.from_dict({**BASE, "learning_rte": 1, "batch_size": "2"}, strict=False)
    assert cfg.batch_size == 2


def test_app_keys_accepted():
    tl_keys = {"job_id": "12", "template_name": "t", "model_architecture": "LLaDAModelLM", "type": "trainer",
               "experiment_name": "alpha", "formatting_template": "{{x}}", "_config": {"a": 1},
               "embedding_model": "e", "chat_column": "messages", "sweep_config": {}, "run_sweeps": False,
               "plugin_name": "dllm_trainer", "model_path": "", "description": "d", "name": "n"}
    assert set(tl_keys) <= APP_KEYS
    cfg = make(**tl_keys, batch_size="3")
    assert cfg.batch_size == 3
    make(**{k: "x" for k in APP_KEYS})


def test_the_apps_job_config_is_accepted_as_sent(tmp_path):
    """The config transformerlab-app v0.30.3 writes for a job of this plugin (TrainingModalLoRA.tsx's form,
    the Data Template tab's alpaca fields, the task's inputs/outputs, run_job's additions): every key is
    known (strict mode accepts it, so the plugin prints no "ignoring config keys" note) and the Data
    Template fields keep the app's meaning, apart from our own system_prompt."""
    sent = {
        "template_name": "fluffy-panda", "plugin_name": "dllm_trainer", "model_name": "/ws/models/all-MiniLM-L6-v2",
        "model_architecture": "BertModel", "foundation_model_file_path": "/ws/models/all-MiniLM-L6-v2",
        "embedding_model": "", "embedding_model_architecture": "", "embedding_model_file_path": "",
        "instruction_template": "Instruction: {{instruction}}", "input_template": "{{input}}",
        "output_template": "{{output}}", "dataset_name": "tiny_chat", "type": "LoRA", "chatml_formatted_column": "",
        "run_sweeps": False, "sweep_config": "{}", "apply_chat_template": True, "chat_column": "messages",
        "formatting_chat_template": "{{ messages }}", "adaptor_name": "dllm-adaptor", "job_id": "3",
        "adaptor_output_dir": "/ws/adaptors/_ws_models_all-MiniLM-L6-v2/dllm-adaptor",
        "output_dir": "/ws/experiments/alpha/tensorboards/fluffy-panda", "batch_size": "4", "max_length": "0",
        "system_prompt": "",
    }
    cfg = TrainConfig.from_dict(sent)
    assert (cfg.instruction_template, cfg.input_template, cfg.output_template) == (
        "Instruction: {{instruction}}", "{{input}}", "{{output}}")
    assert cfg.system_prompt == "" and cfg.max_length == 0
    form = {f.name for f in form_fields()}
    assert "system_prompt" in form and not form & {"instruction_template", "input_template", "output_template"}


# ------------------------------------------------------------------------------ config files


def test_load_config_file_plain(tmp_path):
    p = tmp_path / "job.json"
    p.write_text(json.dumps({**BASE, "batch_size": "16", "lora": "false"}))
    cfg = load_config_file(str(p))
    assert cfg.batch_size == 16 and cfg.lora is False and cfg.model_name == BASE["model_name"]
    cfg = load_config_file(str(p), overrides={"batch_size": 2})
    assert cfg.batch_size == 2


def test_load_config_file_transformer_lab_input_file(tmp_path):
    p = tmp_path / "input.json"
    p.write_text(json.dumps({"experiment": {"id": 1, "name": "e"},
                             "config": {**BASE, "job_id": 7, "training_method": "dream", "lora_r": "8"}}))
    cfg = load_config_file(str(p))
    assert cfg.training_method == "dream" and cfg.lora_r == 8 and cfg.loss_weight == ("cart", 0.3)


def test_load_config_file_missing(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as ei:
        load_config_file(str(path))
    assert str(path) in str(ei.value) and "does not exist" in str(ei.value)


def test_load_config_file_malformed(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "model_name": "m",\n  "batch_size": 4,,\n}\n')
    with pytest.raises(ConfigError) as ei:
        load_config_file(str(p))
    msg = str(ei.value)
    assert str(p) in msg and "not valid JSON" in msg and "line 3" in msg


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "42", "null"])
def test_load_config_file_not_an_object(tmp_path, content):
    p = tmp_path / "c.json"
    p.write_text(content)
    with pytest.raises(ConfigError, match="JSON object"):
        load_config_file(str(p))


def test_load_config_file_invalid_value_names_the_field(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**BASE, "warmup_ratio": "2"}))
    with pytest.raises(ConfigError, match="warmup_ratio"):
        load_config_file(str(p))


def test_form_fields_are_the_non_app_fields():
    names = {f.name for f in form_fields()}
    assert not names & {"model_name", "dataset_name", "output_dir", "adaptor_output_dir", "dataset_split"}
    assert {"batch_size", "training_method", "adaptor_name"} <= names
