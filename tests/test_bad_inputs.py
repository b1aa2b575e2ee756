"""The bad-input matrix: every wrong job gives exactly ONE clear `[dllm-error]` line naming the field
(or file) and what is allowed, a non-zero exit, no traceback on the console, nothing deleted from an
earlier run, and no worker started (the checks run before any launch: config.py, preflight.py,
launcher.build_launch).

Every case runs through main.py's own `main(["--config", F])` in-process (fast); a few also as a
real `python main.py --config F.json` subprocess; a representative subset through the emulated
Transformer Lab (the job ends FAILED with the same reason).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from dllm_trainer.training import launcher
from dllm_trainer.config import TrainConfig, _field_type
from rel_helpers import CHAT, REPO, make_llada_dir, run_main_in_process, subprocess_env


# ---------------------------------------------------------------------------------------------
# Inputs shared by the cases
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    llada = make_llada_dir(root / "llada")
    empty_model = root / "empty-model"
    empty_model.mkdir()
    no_weights = make_llada_dir(root / "no-weights")
    (no_weights / "model.safetensors").unlink()
    corrupt = make_llada_dir(root / "corrupt-weights")
    w = corrupt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    gpt2 = root / "gpt2-model"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    t5 = root / "t5-model"  # an encoder-decoder: no family takes it
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    no_mask = make_llada_dir(root / "no-mask")
    conf = json.loads((no_mask / "config.json").read_text())
    conf["mask_token_id"] = None  # explicitly none (absent would mean LLaDA's published default)
    (no_mask / "config.json").write_text(json.dumps(conf))
    far_mask = make_llada_dir(root / "far-mask", config_changes={"mask_token_id": None})  # default 126336 > vocab 512
    tc = json.loads((no_mask / "tokenizer_config.json").read_text())
    tc.pop("mask_token", None)
    (no_mask / "tokenizer_config.json").write_text(json.dumps(tc))
    model_file = root / "model-file.safetensors"
    shutil.copyfile(llada / "model.safetensors", model_file)

    empty_data = root / "empty.jsonl"
    empty_data.write_text("")
    odd = root / "odd_columns.jsonl"
    odd.write_text("".join(json.dumps({"foo": f"row {i}", "bar": i}) + "\n" for i in range(12)))
    long_prompts = root / "long_prompts.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": "a long question " * 5, "completion": "yes"}) + "\n"
                                    for _ in range(12)))
    txt = root / "data.txt"
    txt.write_text("hello\n")
    bad_json = root / "broken.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": broken\n')
    mixed = root / "mixed_formats.jsonl"
    mixed.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n\n"
                     + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    header_only = root / "header_only.csv"
    header_only.write_text("prompt,completion\n")
    a_file = root / "a-file"
    a_file.write_text("not a folder")
    broken_ckpt = root / "checkpoint-4"
    broken_ckpt.mkdir()
    (broken_ckpt / "trainer_state.json").write_text("{garbage")
    # a complete checkpoint of another run: a full fine-tune of the dream method on another model
    other_ckpt = _complete_checkpoint(root / "other-run" / "checkpoint-6", run=dict(
        model_name=str(root / "some-other-model"), training_method="dream", lora=False, lora_r=None,
        lora_alpha=None, lora_target_modules=None, trainable_parameters=1234))
    return dict(root=root, llada=llada, empty_model=empty_model, no_weights=no_weights, corrupt=corrupt, gpt2=gpt2, t5=t5,
                no_mask=no_mask, far_mask=far_mask, model_file=model_file, empty_data=empty_data, odd=odd, long_prompts=long_prompts,
                txt=txt, bad_json=bad_json, a_file=a_file, broken_ckpt=broken_ckpt, mixed_formats=mixed,
                header_only=header_only, other_ckpt=other_ckpt)


def _complete_checkpoint(path: Path, run: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    from dllm_trainer.training.checkpoints import write_manifest

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"x": 1}, path / name)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    write_manifest(str(path), 6, 1, run=run)
    return path


def base_config(inputs, out: Path) -> dict:
    return dict(model_name=str(inputs["llada"]), dataset_name=str(CHAT), output_dir=str(out), training_method="llada",
                train_device="cpu", lora=True, lora_r=8, lora_alpha=16, batch_size=4, max_length=64,
                num_train_epochs=0, train_steps=3, adaptor_name="mine")


# ---------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------

NUMERIC = [f for f in dataclasses.fields(TrainConfig) if _field_type(f) in (int, float)]


def _below(f):
    s = f.metadata["schema"]
    if "exclusiveMinimum" in s:
        return s["exclusiveMinimum"]
    return s["minimum"] - 1


def _above(f):
    return f.metadata["schema"]["maximum"] + 1


NUMERIC_CASES = (
    [pytest.param({f.name: "abc"}, [f.name, "must be a", "got 'abc'"], id=f"{f.name}-not-a-number") for f in NUMERIC]
    + [pytest.param({f.name: 2.5}, [f.name, "must be a whole number"], id=f"{f.name}-not-whole")
       for f in NUMERIC if _field_type(f) is int]
    + [pytest.param({f.name: _below(f)}, [f.name, "must be"], id=f"{f.name}-too-small") for f in NUMERIC]
    + [pytest.param({f.name: _above(f)}, [f.name, "must be", f"<= {f.metadata['schema']['maximum']}"],
                    id=f"{f.name}-too-large") for f in NUMERIC]
    + [pytest.param({f.name: True}, [f.name, "must be a number"], id=f"{f.name}-a-boolean") for f in NUMERIC[:3]]
)

# (changes to the valid base config, expected parts of the one error line, id). Values may name an
# input from the `inputs` fixture as "@name"; "@out" is the output folder.
CASES = [
    ({"training_method": "gpt"}, ["training_method must be one of bert, llada, dream", "'gpt'"], "unknown-method"),
    ({"dtype": "fp8"}, ["dtype must be one of auto, bfloat16, float16, float32", "'fp8'"], "unknown-dtype"),
    ({"learning_rate_schedule": "exponential"}, ["learning_rate_schedule must be one of constant, linear, cosine"], "unknown-schedule"),
    ({"loss_weight_type": "quadratic"}, ["loss_weight_type must be one of auto, scheduler, uniform or cart[geo_p:P]"], "unknown-loss-weight"),
    ({"loss_weight_type": "cart[geo_p:2]"}, ["loss_weight_type", "geo_p must be in (0, 1]"], "cart-p-out-of-range"),
    ({"train_device": "gpu"}, ["train_device must be one of cuda, cpu, tpu", "'gpu'"], "unknown-device"),
    ({"nonfinite_loss": "ignore"}, ["nonfinite_loss must be one of stop, skip"], "unknown-nonfinite-policy"),
    ({"truncation": "left"}, ["truncation must be one of right, filter"], "unknown-truncation"),
    ({"eval_strategy": "always"}, ["eval_strategy must be one of steps, epoch, no"], "unknown-eval-strategy"),
    ({"loss_normalization": "tokens"}, ["loss_normalization must be one of trainable_tokens, masked_tokens"], "unknown-normalization"),
    ({"lora_r": 6}, ["lora_r must be a multiple of 4", "got 6"], "lora-r-not-multiple-of-4"),
    ({"lora_alpha": 10}, ["lora_alpha must be a multiple of 4", "got 10"], "lora-alpha-not-multiple-of-4"),
    ({"lora": "maybe"}, ["lora must be true or false", "'maybe'"], "boolean-not-a-boolean"),
    ({"load_in_4bit": True}, ["load_in_4bit needs train_device 'cuda'", "got 'cpu'"], "4bit-on-cpu"),
    ({"load_in_4bit": True, "train_device": "cuda"}, ["train_device is 'cuda' but no CUDA GPU is visible", "load_in_4bit needs one too"], "4bit-without-cuda"),
    ({"load_in_4bit": True, "lora": False}, ["load_in_4bit requires lora: true"], "4bit-without-lora"),
    ({"train_device": "cuda"}, ["train_device is 'cuda' but no CUDA GPU is visible", "train_device 'cpu'"], "cuda-without-gpu"),
    ({"train_device": "cuda", "gpu_ids": "0,a"}, ["gpu_ids must be 'auto' or a comma-separated list of GPU indices"], "gpu-ids-malformed"),
    ({"train_device": "cuda", "gpu_ids": "0;rm -rf /"}, ["gpu_ids must be 'auto' or a comma-separated list"], "gpu-ids-shell"),
    ({"train_device": "cuda", "gpu_ids": "5", "_gpus": 2}, ["gpu_ids '5' names GPU 5 but only 2 GPUs are visible"], "gpu-ids-out-of-range"),
    ({"train_device": "cuda", "gpu_ids": "1,1", "_gpus": 2}, ["gpu_ids lists GPU 1 more than once"], "gpu-ids-duplicate"),
    ({"training_method": "bert"}, ["training_method 'bert' does not fit model", "LLaDAModelLM", "use training_method 'llada'"], "method-does-not-fit-model"),
    ({"training_method": "dream"}, ["training_method 'dream' does not fit model", "use training_method 'llada'"], "dream-on-llada"),
    ({"model_name": "@gpt2"}, ["GPT2LMHeadModel", "does not fit model", "use training_method 'a2d'"], "causal-lm-needs-a2d"),
    ({"model_name": "@t5"}, ["T5ForConditionalGeneration", "is not supported", "expects LLaDAModelLM"], "unsupported-architecture"),
    ({"model_name": "@root/no-such-model"}, ["model '", "no-such-model' does not exist"], "model-missing"),
    ({"model_name": "@empty_model"}, ["model folder '", "empty-model' is empty"], "model-empty-folder"),
    ({"model_name": "@no_weights"}, ["model folder '", "no-weights' has no weights"], "model-without-weights"),
    ({"model_name": "@corrupt"}, ["corrupt-weights'", "model.safetensors", "truncated"], "model-corrupt-weights"),
    ({"model_name": "@model_file"}, ["model-file.safetensors' is a file; give the model's folder"], "model-is-a-file"),
    ({"model_name": "@no_mask", "_unextendable": True}, ["no-mask' has no mask token and cannot be extended"], "tokenizer-without-mask-not-extendable"),
    ({"model_name": "@far_mask"}, ["far-mask'", "mask_token_id 126336", "vocabulary of 512"], "mask-id-outside-vocabulary"),
    ({"max_length": 512}, ["max_length (512) exceeds the model's maximum positions (256)", "or 0 for the model's own limit"],
     "max-length-beyond-positions"),
    ({"dataset_name": "@root/no-such-data.jsonl"}, ["dataset '", "no-such-data.jsonl' not found"], "dataset-missing"),
    ({"dataset_name": "@empty_data"}, ["empty.jsonl", "empty"], "dataset-empty"),
    ({"dataset_name": "@odd"}, ["odd_columns.jsonl", "cannot tell the dataset format", "'foo'", "'messages'"], "dataset-unknown-columns"),
    ({"dataset_name": "@long_prompts", "max_length": 16}, ["training rows of", "long_prompts.jsonl", "were dropped", "max_length=16"], "dataset-rows-truncate-to-nothing"),
    ({"dataset_name": "@txt"}, ["data.txt", "unsupported type '.txt'", ".jsonl"], "dataset-unsupported-file-type"),
    ({"dataset_name": "@bad_json"}, ["'broken.jsonl' line 2: not valid JSON (Expecting value at column 10)"], "dataset-corrupt-json"),
    ({"dataset_name": "@mixed_formats"}, ["'mixed_formats.jsonl' line 3 is a 'messages' row (messages/conversations)",
                                          "line 1 is a 'prompt_completion' row", "use one row format per dataset"],
     "dataset-mixed-formats"),
    ({"dataset_name": "@header_only"}, ["'header_only.csv' has only a header line (prompt, completion) and no data rows"],
     "dataset-csv-header-only"),
    ({"input_template": "{{ messages }} {{ question }}", "output_template": "{{ answer }}"},
     ["the Data Template does not fit dataset", "input_template reads question", "output_template reads answer",
      "not among its columns (messages)"], "template-reads-missing-columns"),
    ({"dataset_split": "nope"}, ["has no split 'nope'", "['train']"], "dataset-missing-split"),
    ({"input_template": "{{ instruction "}, ["input_template"], "template-syntax-error"),
    ({"input_template": "{{ instruction }}"}, ["input_template needs an output_template"], "template-without-output"),
    ({"instruction_template": "Summarize:", "input_template": "{{ instruction }}"},
     ["input_template and instruction_template need an output_template"], "data-template-without-output"),
    ({"adaptor_name": ""}, ["adaptor_name must be a single safe name"], "adaptor-name-empty"),
    ({"adaptor_name": "/"}, ["adaptor_name must be a single safe name", "no path separators"], "adaptor-name-slash"),
    ({"adaptor_name": ".."}, ["adaptor_name must be a single safe name", "'..'"], "adaptor-name-dotdot"),
    ({"adaptor_name": "../../etc"}, ["adaptor_name must be a single safe name"], "adaptor-name-traversal"),
    ({"output_dir": "@a_file/out"}, ["output_dir '", "a-file/out' is not a writable folder", "Not a directory"], "output-dir-under-a-file"),
    ({"output_dir": "/proc/dllm-test-out"}, ["output_dir '/proc/dllm-test-out' is not a writable folder"], "output-dir-unwritable"),
    ({"resume_from_checkpoint": "@root/checkpoint-99"}, ["resume_from_checkpoint '", "checkpoint-99' is not a checkpoint folder"], "resume-path-missing"),
    ({"resume_from_checkpoint": "@broken_ckpt"}, ["resume_from_checkpoint '", "checkpoint-4' is incomplete or corrupt", "trainer_state.json is not valid JSON"], "resume-checkpoint-corrupt"),
    ({"learning_rat": 0.1}, ["unknown config key 'learning_rat' (did you mean 'learning_rate'?)"], "unknown-key"),
    ({"min_mask_ratio": 0.8, "max_mask_ratio": 0.5}, ["min_mask_ratio (0.8) must be smaller than max_mask_ratio (0.5)"], "mask-ratios-inverted"),
    ({"num_machines": 2}, ["main_process_ip is required when num_machines > 1"], "multinode-without-ip"),
    ({"machine_rank": 2, "num_machines": 2, "main_process_ip": "10.0.0.1"}, ["machine_rank must be below num_machines (2)"], "machine-rank-too-high"),
    ({"accelerate_config_file": "@root/none.yaml"}, ["accelerate_config_file '", "none.yaml' does not exist"], "accelerate-config-missing"),
    ({"lora_target_modules": "q_proj;rm -rf"}, ["lora_target_modules must be 'all-linear' or a comma list of module names"], "lora-targets-malformed"),
    ({"logging_steps": 1.5}, ["logging_steps must be a whole number of steps (>= 1) or a fraction in (0, 1)"], "logging-steps-fractional"),
    ({"model_name": ""}, ["model_name is required"], "model-name-empty"),
    ({"output_dir": ""}, ["output_dir is empty"], "output-dir-empty"),
    ({}, ["output_dir '", "already holds checkpoints of another run (checkpoint-1)", "resume_from_checkpoint: latest",
          "choose a new output_dir"], "fresh-run-over-another-runs-checkpoints"),
    ({"resume_from_checkpoint": "@other_ckpt"}, ["checkpoint-6' does not fit this run", "model: checkpoint '",
                                                "training_method: checkpoint 'dream', this run 'llada'",
                                                "LoRA: checkpoint off, this run on"], "resume-checkpoint-of-another-run"),
    ({"dataset_name": "  "}, ["dataset_name is required"], "dataset-name-empty"),
]

FILE_CASES = [
    ("{not json", ["config file '", "job.json' is not valid JSON", "line 1"], "config-file-malformed"),
    ("[1, 2, 3]", ["config file '", "must hold a JSON object of key/value pairs"], "config-file-not-an-object"),
    (None, ["config file '", "missing.json' does not exist"], "config-file-missing"),
    (b"\xff\xfe\x00garbage", ["config file '", "job.json'"], "config-file-binary"),
]


def _materialise(changes: dict, inputs, out: Path) -> dict:
    def sub(v):
        if isinstance(v, str) and v.startswith("@"):
            key, _, rest = v[1:].partition("/")
            base = out if key == "out" else inputs[key]
            return str(base / rest) if rest else str(base)
        return v

    return {k: sub(v) for k, v in changes.items() if not k.startswith("_")}


def _prepare_output(out: Path) -> list[Path]:
    """An earlier run's files that must survive a failed job."""
    keep = [out / "checkpoint-1" / "trainer_state.json", out / "earlier-notes.txt", out / "models" / "taken" / "config.json",
            out / "adaptors" / "taken-adaptor" / "adapter_config.json"]
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text('{"from": "an earlier run"}')
    return keep


@pytest.fixture(autouse=True)
def datasets_logs_to_the_current_stderr():
    """datasets' log handler keeps the stream it was created with; under pytest that may be an earlier
    test's closed capture stream, which prints a logging traceback that a real run never shows."""
    import sys

    import datasets

    for h in datasets.utils.logging._get_library_root_logger().handlers:
        if hasattr(h, "setStream"):
            with h.lock:  # not setStream: it flushes the old stream, which may be closed already
                h.stream = sys.stderr
    yield


def check_one_clear_error(code, console: str, expected: list[str]) -> str:
    assert code not in (0, None), console[-3000:]
    assert "Traceback" not in console, console[-3000:]
    errors = [line for line in console.splitlines() if "[dllm-error]" in line]
    assert len(errors) == 1, console[-3000:]
    assert errors[0].startswith("[dllm-error] ")
    for part in expected:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    return errors[0]


@pytest.mark.parametrize("changes, expected", [c.values for c in NUMERIC_CASES], ids=[c.id for c in NUMERIC_CASES])
def test_numeric_field_out_of_type_or_range(tmp_path, inputs, capfd, no_workers, changes, expected):
    out = tmp_path / "out"
    keep = _prepare_output(out)
    cfg_path = tmp_path / "job.json"
    cfg_path.write_text(json.dumps({**base_config(inputs, out), **changes}))
    code, console = run_main_in_process(["--config", str(cfg_path)], capfd)
    check_one_clear_error(code, console, expected)
    assert all(p.exists() for p in keep)


@pytest.mark.parametrize("changes, expected", [c[:2] for c in CASES], ids=[c[2] for c in CASES])
def test_bad_input_fails_with_one_clear_message(tmp_path, inputs, capfd, no_workers, monkeypatch, changes, expected):
    out = tmp_path / "out"
    keep = _prepare_output(out)
    monkeypatch.setattr(launcher, "visible_gpu_count", lambda: changes.get("_gpus", 0))
    if changes.get("_unextendable"):
        from transformers import PreTrainedTokenizerBase

        def refuse(self, *a, **kw):
            raise ValueError("this tokenizer's vocabulary is frozen")

        monkeypatch.setattr(PreTrainedTokenizerBase, "add_special_tokens", refuse)
    cfg_path = tmp_path / "job.json"
    cfg_path.write_text(json.dumps({**base_config(inputs, out), **_materialise(changes, inputs, out)}))
    code, console = run_main_in_process(["--config", str(cfg_path)], capfd)
    check_one_clear_error(code, console, expected)
    assert all(p.exists() for p in keep), "an earlier run's file was deleted"
    assert "training started" not in console
    assert not (out / "dllm_config.json").exists()


@pytest.mark.parametrize("content, expected", [c[:2] for c in FILE_CASES], ids=[c[2] for c in FILE_CASES])
def test_bad_job_config_file(tmp_path, capfd, no_workers, content, expected):
    path = tmp_path / ("job.json" if content is not None else "missing.json")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, console = run_main_in_process(["--config", str(path)], capfd)
    check_one_clear_error(code, console, expected)


def test_the_matrix_is_big_enough():
    assert len(CASES) + len(FILE_CASES) >= 40
    assert {f.name for f in NUMERIC} <= {next(iter(c.values[0])) for c in NUMERIC_CASES}


# ---------------------------------------------------------------------------------------------
# The same through real processes
# ---------------------------------------------------------------------------------------------

SUBPROCESS_CASES = ["unknown-method", "model-corrupt-weights", "output-dir-under-a-file"]


@pytest.mark.slow
def test_bad_inputs_through_python_main_py(tmp_path, inputs):
    """A few cases as a user runs them: `python main.py --config F.json` (run side by side)."""
    import subprocess
    import sys

    by_id = {c[2]: c for c in CASES}
    runs = []
    for case_id in SUBPROCESS_CASES:
        changes, expected, _ = by_id[case_id]
        out = tmp_path / case_id / "out"
        keep = _prepare_output(out)
        cfg_path = tmp_path / case_id / "job.json"
        cfg_path.write_text(json.dumps({**base_config(inputs, out), **_materialise(changes, inputs, out)}))
        runs.append((expected, keep, cfg_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    runs.append((["is not valid JSON"], [], bad))
    procs = [subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path)
             for _, _, path in runs]
    for (expected, keep, _), proc in zip(runs, procs):
        out, err = proc.communicate(timeout=180)
        check_one_clear_error(proc.returncode, out + err, expected)
        assert all(p.exists() for p in keep)


TL_CASES = ["lora-r-not-multiple-of-4", "method-does-not-fit-model", "model-corrupt-weights", "dataset-missing"]


@pytest.mark.slow
def test_bad_inputs_fail_the_transformer_lab_job(tmp_path, inputs):
    """A representative subset in the emulated Transformer Lab (jobs run side by side): FAILED, with the
    one error line as the job's reason, and no model registered."""
    from lifecycle_tl import Workspace

    ws = Workspace.create(tmp_path)
    by_id = {c[2]: c for c in CASES}
    started = []
    for n, case_id in enumerate(TL_CASES):
        changes, expected, _ = by_id[case_id]
        form = {k: v for k, v in base_config(inputs, tmp_path).items()
                if k not in ("model_name", "dataset_name", "output_dir", "adaptor_name")}
        values = _materialise(changes, inputs, tmp_path)
        form.update({k: v for k, v in values.items() if k not in ("model_name", "dataset_name")})
        job = ws.create_job(f"exp{n}", form, model_name=values.get("model_name", str(inputs["llada"])),
                            dataset_name=values.get("dataset_name", str(CHAT)), adaptor_name=f"bad-{n}")
        started.append((case_id, expected, job, ws.run_plugin(job, cwd=tmp_path, wait=False)))
    for n, (case_id, expected, job, proc) in enumerate(started):
        log, _ = proc.communicate(timeout=180)
        line = check_one_clear_error(proc.returncode, log, expected)
        assert ws.process_exited(job.job_id) == "FAILED", case_id
        state = ws.job_json(job.job_id)
        assert state["status"] == "FAILED", case_id
        details = state["job_data"].get("completion_details", "")
        assert line.removeprefix("[dllm-error] ") in details, (case_id, details)
        assert not (ws.workspace / "models" / f"bad-{n}").exists()
