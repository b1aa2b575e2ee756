"""A job's life cycle, inside Transformer Lab (emulated: a real SDK workspace, the app's input file,
the harness's way of running the plugin) and standalone.

End-to-end (slow): a LoRA job that completes (TensorBoard, metrics.json, a fused model in the
Foundation tab whose logits equal base + adaptor), a job that fails in the worker (FAILED with the
worker's reason), a template queued twice (the second job takes the next free model name), and a
stopped job (STOPPED with a checkpoint, resumed by a new job). Fast: the app's own checks with a fake reporter, W&B settings, main.py import.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dllm_trainer import app
from dllm_trainer.hosts.standalone import StandaloneReporter
from dllm_trainer.config import TrainConfig
from lifecycle_tl import REPO, Workspace, clean_env

ASSETS = REPO / "src" / "dllm_trainer" / "assets"
FAKE_KEY = "wandbfakekey-0123456789abcdef0123456789abcdef"
TB_TAGS = ["train/loss", "train/masked_accuracy", "train/mask_ratio", "train/learning_rate", "train/grad_norm",
           "train/tokens_per_second", "eval/loss"]


def chat_rows():
    return [json.loads(line) for line in (ASSETS / "chat_small.jsonl").read_text().splitlines() if line.strip()]


def small_form(**kw):
    form = dict(training_method="bert", train_device="cpu", max_length=64, batch_size=8, num_train_epochs=0,
                train_steps=3, logging_steps=1, eval_steps=2, save_steps=2, lora_r=8, lora_alpha=16, seed=3)
    form.update(kw)
    return form


def scalars(output_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[float]] = {}
    runs = [d for d, _, files in os.walk(output_dir) if any(f.startswith("events.out.tfevents") for f in files)]
    for run in runs:
        acc = EventAccumulator(run)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return found


def all_text_under(*roots: Path) -> str:
    chunks = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                try:
                    chunks.append(p.read_bytes().decode("utf-8", "replace"))
                except OSError:
                    pass
    return "\n".join(chunks)


# ---------------------------------------------------------------------------------------------
# Transformer Lab, end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tl_lora_job_completes_with_a_fused_model_in_the_foundation_tab(tmp_path, minilm):
    # a team workspace; a dataset uploaded as <name>_train.jsonl + <name>_eval.jsonl; a plain BertModel
    # checkpoint (512 positions) imported with the app's local import; the form's defaults for
    # max_length and the app's Data Template defaults; a W&B key in the team secrets but no
    # reachable W&B server (so: offline, and the key must not leak anywhere)
    ws = Workspace.create(tmp_path, org="team-a", WANDB_BASE_URL="http://127.0.0.1:9")
    rows = chat_rows()
    ws.add_dataset("tiny_chat", [], files={"tiny_chat_train.jsonl": rows[:-6], "tiny_chat_eval.jsonl": rows[-6:]})
    model_id, sent_as = ws.import_local_model(minilm)
    ws.add_team_secret("WANDB_API_KEY", FAKE_KEY)
    assert json.loads(Path(sent_as, "index.json").read_text())["json_data"]["architecture"] == "BertModel"
    assert not Path(sent_as, "config.json").exists()  # the app sends a folder that holds only index.json
    form = small_form(log_to_wandb=True)
    form.pop("max_length")
    job = ws.create_job("exp1", form, model_name=sent_as, dataset_name="tiny_chat", adaptor_name="minilm-dllm")
    app_cwd = tmp_path / "app_folder"
    app_cwd.mkdir()

    old_umask = os.umask(0o022)
    try:
        proc = ws.run_plugin(job, cwd=app_cwd)
    finally:
        os.umask(old_umask)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert ws.process_exited(job.job_id) == "COMPLETE"
    assert list(app_cwd.iterdir()) == []  # nothing written to the app's folder (cwd)
    assert "max_length 0 (auto): 512 tokens (the model's maximum positions are 512" in log
    assert "the Data Template reads columns input, instruction, output, which dataset" in log
    assert f"train {len(rows) - 6}, eval 6 (validation split)" in log  # the eval file is not trained on
    assert "length: train_steps 3 (num_train_epochs is 0) = 3 optimizer steps" in log

    state = ws.job_json(job.job_id)
    data = state["job_data"]
    assert state["status"] == "COMPLETE" and state["progress"] == 100
    assert data["completion_status"] == "success" and "minilm-dllm" in data["completion_details"]
    score = data["score"]
    assert score["global_step"] == 3 and math.isfinite(score["loss"]) and math.isfinite(score["eval_loss"])
    assert data["tensorboard_output_dir"] == str(job.run_dir)

    # TensorBoard: every training scalar at every step (logging_steps 1), eval loss at steps 2 and 3
    tb = scalars(job.output_dir)  # the app's TensorBoard for the template finds the job's folder
    for tag in TB_TAGS:
        assert tag in tb, f"{tag} missing from TensorBoard: {sorted(tb)}"
        assert all(math.isfinite(v) for v in tb[tag]), tag
    assert len(tb["train/loss"]) == 3 and len(tb["eval/loss"]) >= 2
    assert all(0 < v < 1 for v in tb["train/mask_ratio"])

    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["eval_loss"] == score["eval_loss"]

    # the Foundation tab: <workspace>/models/<name>/ with index.json beside the weights
    model_dir = ws.workspace / "models" / "minilm-dllm"
    index = json.loads((model_dir / "index.json").read_text())
    assert index["model_id"] == "minilm-dllm" and index["local_model"] is True
    assert index["json_data"]["architecture"] == "BertForMaskedLM"
    assert index["json_data"]["source"] == "transformerlab"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    meta = json.loads((model_dir / "dllm_training.json").read_text())
    assert meta["base_model"] == Path(sent_as).name and meta["dataset"] == "tiny_chat" and meta["lora"] is True
    assert meta["steps"] == 3 and meta["max_length"] == 512
    assert "minilm-dllm" in (model_dir / "README.md").read_text()
    assert Path(job.adaptor_output_dir, "adapter_config.json").is_file()
    assert not (job.run_dir / "fused_model").exists()  # moved into the workspace, not copied
    ckpt_links = sorted((ws.workspace / "jobs" / job.job_id / "checkpoints").iterdir())
    assert [p.name for p in ckpt_links] == ["checkpoint-2", "checkpoint-3"]
    assert all((p / "trainer_state.json").is_file() for p in ckpt_links)
    # readable by the group (umask 022): folders 0755, files 0644, the fused model's folder included
    for root in (model_dir, job.run_dir, Path(job.adaptor_output_dir)):
        for dirpath, dirnames, filenames in os.walk(root):
            assert os.stat(dirpath).st_mode & 0o777 == 0o755, dirpath
            for f in filenames:
                assert os.stat(os.path.join(dirpath, f)).st_mode & 0o777 == 0o644, os.path.join(dirpath, f)

    # W&B: offline with exactly one warning; the key appears nowhere
    assert log.count("is not reachable; logging offline") == 1
    assert list((job.run_dir / "wandb").glob("offline-run-*"))
    assert FAKE_KEY not in log
    assert FAKE_KEY not in all_text_under(job.run_dir, model_dir, ws.workspace / "jobs")

    # the fused model computes what base + adaptor compute, and keeps the base's tied decoder (its size)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    batch = tok(["What is 4 plus 7?", "What comes after [MASK]?"], return_tensors="pt", padding=True)
    fused = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    assert fused.cls.predictions.decoder.weight is fused.bert.embeddings.word_embeddings.weight
    assert (model_dir / "model.safetensors").stat().st_size < 1.05 * (minilm / "model.safetensors").stat().st_size
    base = AutoModelForMaskedLM.from_pretrained(str(minilm))
    with_adaptor = PeftModel.from_pretrained(base, job.adaptor_output_dir).eval()
    with torch.no_grad():
        a = fused(**batch).logits
        b = with_adaptor(**batch).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    plain = AutoModelForMaskedLM.from_pretrained(str(minilm)).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, a, atol=1e-3)  # the fused model is not the base


@pytest.mark.slow
def test_tl_worker_error_fails_the_job_with_the_reason(tmp_path, minilm):
    ws = Workspace.create(tmp_path)
    ws.add_dataset("odd_columns", [{"foo": f"row {i}", "bar": i} for i in range(12)])
    job = ws.create_job("exp1", small_form(), model_name=str(minilm), dataset_name="odd_columns",
                        adaptor_name="never-made")
    proc = ws.run_plugin(job, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ws.process_exited(job.job_id) == "FAILED"  # the app's end-of-process COMPLETE must not win
    state = ws.job_json(job.job_id)
    assert state["status"] == "FAILED"
    data = state["job_data"]
    assert data["completion_status"] == "failed"
    assert "cannot tell the dataset format" in data["completion_details"]
    assert "'foo'" in data["completion_details"] and "odd_columns" in data["completion_details"]
    errors = [line for line in log.splitlines() if "[dllm-error]" in line]
    assert len(errors) == 1 and "cannot tell the dataset format" in errors[0]
    assert "Traceback" not in log
    assert not (ws.workspace / "models" / "never-made").exists()


@pytest.mark.slow
def test_tl_requeued_template_gets_a_new_model_name(tmp_path, minilm):
    """Queuing the same template again (the app's normal use): the second job completes with the next
    free name, logged, and the first job's model, adaptor and checkpoints are untouched. With
    eval_strategy "no" no row is held out."""
    ws = Workspace.create(tmp_path)
    ws.add_dataset("qa", [{"instruction": f"Add one to {i}.", "input": "", "output": str(i + 1)} for i in range(20)])
    form = small_form(train_steps=1, save_steps=1, eval_strategy="no")
    jobs, logs = [], []
    for _ in range(2):
        job = ws.create_job("exp1", form, model_name=str(minilm), dataset_name="qa", template_name="same",
                            adaptor_name="again")
        proc = ws.run_plugin(job, cwd=tmp_path)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert ws.process_exited(job.job_id) == "COMPLETE"
        jobs.append(job)
        logs.append(log)
        if len(jobs) == 1:
            first_model = {p.name: p.stat().st_mtime_ns for p in (ws.workspace / "models" / "again").iterdir()}
            first_ckpt = (job.run_dir / "checkpoint-1" / "trainer_state.json").read_text()
    first, second = jobs
    assert "20 rows -> train 20, eval 0 (none (evaluation off))" in logs[0]  # the app's Data Template, no holdout
    assert "already exists" not in logs[0]
    assert "a model or adaptor named 'again' already exists" in logs[1] and "this run's model is named 'again-2'" in logs[1]
    assert "'again-2' saved to" in ws.job_json(second.job_id)["job_data"]["completion_details"]
    assert first.output_dir == second.output_dir and first.run_dir != second.run_dir
    assert {p.name: p.stat().st_mtime_ns for p in (ws.workspace / "models" / "again").iterdir()} == first_model
    assert (first.run_dir / "checkpoint-1" / "trainer_state.json").read_text() == first_ckpt
    assert (ws.workspace / "models" / "again-2" / "model.safetensors").is_file()
    assert json.loads((ws.workspace / "models" / "again-2" / "index.json").read_text())["model_id"] == "again-2"
    assert Path(first.adaptor_output_dir, "adapter_config.json").is_file()
    assert Path(first.adaptor_output_dir).with_name("again-2").joinpath("adapter_config.json").is_file()


@pytest.mark.slow
def test_tl_stop_button_ends_stopped_with_a_checkpoint(tmp_path, minilm):
    ws = Workspace.create(tmp_path)
    ws.add_dataset("tiny_chat", chat_rows())
    job = ws.create_job("exp1", small_form(train_steps=400, eval_strategy="no", save_steps=10000, logging_steps=5),
                        model_name=str(minilm), dataset_name="tiny_chat", adaptor_name="stopped-run")
    proc = ws.run_plugin(job, cwd=tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 180
        while ws.job_json(job.job_id).get("progress", 0) < 1 and proc.poll() is None:
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        while proc.poll() is None:  # the app's Stop button (pressed again if the flag was lost in a race)
            assert time.monotonic() < deadline, "the job did not stop"
            ws.set_stop(job.job_id)
            time.sleep(2)
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert ws.process_exited(job.job_id) == "STOPPED"
    state = ws.job_json(job.job_id)
    assert state["status"] == "STOPPED" and state["job_data"]["completion_status"] == "stopped"
    ckpts = list(job.run_dir.glob("checkpoint-*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert 0 < step < 400
    trainer_state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == step
    assert ckpts[0].name in state["job_data"]["completion_details"]
    assert (ws.workspace / "jobs" / job.job_id / "checkpoints" / ckpts[0].name / "trainer_state.json").is_file()
    assert not (ws.workspace / "models" / "stopped-run").exists()
    assert not (job.run_dir / "STOP").exists()

    # "resume from checkpoint" in the app: a new job naming the parent job and the checkpoint; the
    # SDK finds it in the parent's checkpoints folder (our link) and training continues from there
    resumed = ws.create_job("exp1", small_form(train_steps=step + 2, eval_strategy="no", save_steps=10000,
                                               logging_steps=1),
                            model_name=str(minilm), dataset_name="tiny_chat", adaptor_name="stopped-run")
    ws.resume_from(resumed.job_id, job.job_id, ckpts[0].name)
    proc = ws.run_plugin(resumed, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert ws.process_exited(resumed.job_id) == "COMPLETE"
    assert f"resuming from checkpoint {ckpts[0]}" in log
    score = ws.job_json(resumed.job_id)["job_data"]["score"]
    assert score["global_step"] == step + 2
    final_state = json.loads((resumed.run_dir / f"checkpoint-{step + 2}" / "trainer_state.json").read_text())
    assert final_state["global_step"] == step + 2
    # the stopped run's history was carried over (it was resumed, not restarted)
    parent_history = trainer_state["log_history"]
    assert parent_history and final_state["log_history"][:len(parent_history)] == parent_history
    assert (ws.workspace / "models" / "stopped-run" / "index.json").is_file()


# ---------------------------------------------------------------------------------------------
# The app's own checks (fast, in-process, fake reporter)
# ---------------------------------------------------------------------------------------------


class FakeReporter(StandaloneReporter):
    def __init__(self):
        super().__init__(log=lambda msg: None)
        self.failed: list[str] = []

    def fail(self, reason):
        self.failed.append(reason)


def job_cfg(tmp_path, **kw) -> TrainConfig:
    raw = {"model_name": "some/model", "dataset_name": "some/data", "output_dir": str(tmp_path / "out"),
           "train_device": "cpu", **kw}
    return TrainConfig.from_dict(raw)


def test_taken_model_or_adaptor_name_gets_the_next_free_name(tmp_path):
    rep, logs = FakeReporter(), []
    cfg = app.resolve_sources(job_cfg(tmp_path, adaptor_name="mine"), rep)
    assert app.unique_model_name(cfg, rep, logs.append) is cfg and logs == []  # free: unchanged, silent
    (tmp_path / "out" / "models" / "mine").mkdir(parents=True)  # an earlier run's model
    (tmp_path / "out" / "adaptors" / "mine-2").mkdir(parents=True)  # an earlier run's adaptor
    (tmp_path / "out" / "adaptors" / "mine-2" / "adapter_config.json").write_text("{}")
    (tmp_path / "out" / "adaptors" / "mine-3").mkdir()  # an empty folder is not taken
    new = app.unique_model_name(cfg, rep, logs.append)
    assert new.adaptor_name == "mine-3" and new.adaptor_output_dir == ""
    from dllm_trainer.training.train import adaptor_dir_for

    assert adaptor_dir_for(new) == str(tmp_path / "out" / "adaptors" / "mine-3")
    assert len(logs) == 1 and "'mine' already exists" in logs[0] and "this run's model is named 'mine-3'" in logs[0]

    # Transformer Lab's adaptor folder <workspace>/adaptors/<model>/<adaptor_name> follows the new name
    ada = tmp_path / "ws" / "adaptors" / "base" / "mine"
    ada.mkdir(parents=True)
    (ada / "adapter_model.safetensors").write_text("x")
    new = app.unique_model_name(cfg.replace(adaptor_name="mine", adaptor_output_dir=str(ada)), rep, logs.append)
    assert (new.adaptor_name, new.adaptor_output_dir) == ("mine-2", str(ada.parent / "mine-2"))
    # a full-length name stays within adaptor_name's 100 characters
    long = "n" * 100
    (tmp_path / "out" / "models" / long).mkdir()
    new = app.unique_model_name(cfg.replace(adaptor_name=long), rep, logs.append)
    assert new.adaptor_name == "n" * 98 + "-2"
    assert list((tmp_path / "out" / "models").iterdir())  # nothing was removed
    assert (tmp_path / "out" / "adaptors" / "mine-2" / "adapter_config.json").read_text() == "{}"


def test_cuda_without_gpu_fails_before_any_worker(tmp_path, capsys):
    rep = FakeReporter()
    assert app.run_job(job_cfg(tmp_path, train_device="cuda"), rep, gpu_count=0) == 2
    assert "no CUDA GPU is visible" in rep.failed[0]
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out" / app.CONFIG_FILE_NAME).exists()


def test_unexpected_error_one_line_and_debug_log(tmp_path, capsys):
    class Broken(FakeReporter):
        def resolve_model(self, name):
            raise RuntimeError("workspace index is corrupt\nsecond line")

    rep = Broken()
    assert app.run_job(job_cfg(tmp_path), rep) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected RuntimeError: workspace index is corrupt" in err[0]
    assert "Traceback" in (tmp_path / "out" / "debug.log").read_text()
    assert "debug.log" in rep.failed[0]


def test_standalone_config_errors_are_one_line(tmp_path, capsys):
    f = tmp_path / "job.json"
    f.write_text(json.dumps({"model_name": "m", "dataset_name": "d", "output_dir": str(tmp_path / "o"),
                             "learning_rat": 0.1}))
    assert app.main(["--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[dllm-error] unknown config key 'learning_rat' (did you mean 'learning_rate'?)"]
    assert app.main(["--config", str(f), "--set", "learning_rat"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    f.write_text(json.dumps({"model_name": "m", "dataset_name": "d", "adaptor_name": "../escape"}))
    assert app.main(["--config", str(f)]) == 2
    assert "adaptor_name must be a single safe name" in capsys.readouterr().err
    assert app.main([]) == 2


def test_resolution_order_workspace_then_local_then_hub(tmp_path):
    class WithWorkspace(FakeReporter):
        def resolve_model(self, name):
            return "/ws/models/x" if name == "x" else None

    (tmp_path / "local_data.jsonl").write_text('{"text": "a"}\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = app.resolve_sources(TrainConfig.from_dict(
            {"model_name": "x", "dataset_name": "local_data.jsonl", "output_dir": "rel_out"}), WithWorkspace())
        assert cfg.model_name == "/ws/models/x"
        assert cfg.dataset_name == str(tmp_path / "local_data.jsonl") and cfg.output_dir == str(tmp_path / "rel_out")
        cfg = app.resolve_sources(TrainConfig.from_dict(
            {"model_name": "org/hub-model", "dataset_name": "org/hub-data"}), WithWorkspace())
        assert (cfg.model_name, cfg.dataset_name) == ("org/hub-model", "org/hub-data")
    finally:
        os.chdir(cwd)


def test_wandb_settings_never_fail_and_keep_the_key_out(tmp_path):
    cfg = job_cfg(tmp_path, log_to_wandb=True)
    no_secret = lambda name: None  # noqa: E731
    env, warning = app.wandb_environment(cfg, no_secret, environ={"HOME": str(tmp_path)}, reachable=lambda u: True)
    assert env["WANDB_MODE"] == "offline" and "no W&B API key" in warning
    assert env["WANDB_DIR"] == cfg.output_dir

    secret = lambda name: FAKE_KEY if name == "WANDB_API_KEY" else None  # noqa: E731
    env, warning = app.wandb_environment(cfg, secret, environ={}, reachable=lambda u: False)
    assert env["WANDB_MODE"] == "offline" and "not reachable" in warning and FAKE_KEY not in json.dumps(env)
    assert FAKE_KEY not in warning
    env, warning = app.wandb_environment(cfg, secret, environ={}, reachable=lambda u: True)
    assert warning is None and env["WANDB_API_KEY"] == FAKE_KEY and "WANDB_MODE" not in env
    env, warning = app.wandb_environment(cfg, no_secret, environ={"WANDB_MODE": "offline"}, reachable=lambda u: True)
    assert warning is None
    assert app.wandb_environment(job_cfg(tmp_path), secret) == ({}, None)


def test_importing_main_is_light_and_cwd_independent(tmp_path):
    code = ("import sys; sys.path.append(sys.argv[1]); import main; "
            "print(sorted(m for m in ('torch', 'transformers', 'dllm_trainer', 'lab') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=tmp_path, env=clean_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _tl_reporter(workspace: Path, job_id: str = "7"):
    """The Transformer Lab host without the SDK (only its workspace lookups are used)."""
    from dllm_trainer.hosts.tlab_plugin import TransformerLabReporter

    rep = TransformerLabReporter.__new__(TransformerLabReporter)
    rep.workspace, rep.job_id = str(workspace), job_id
    return rep


def test_tl_workspace_model_from_the_apps_local_import(tmp_path, minilm):
    from lifecycle_tl import Workspace
    from dllm_trainer.errors import ModelError

    ws = Workspace(home=tmp_path, workspace=tmp_path / "ws", env={})
    model_id, sent_as = ws.import_local_model(minilm)
    rep = _tl_reporter(ws.workspace)
    weights = str(ws.workspace / "my_models" / minilm.name)
    assert rep.resolve_model(sent_as) == weights  # the path the Train tab sends
    assert rep.resolve_model(model_id) == weights  # the model's id
    assert rep.resolve_model(f"TransformerLab/{model_id}") == weights
    stored = ws.add_model("stored", minilm)  # weights beside index.json (downloaded or trained)
    assert rep.resolve_model("stored") == str(stored)  # (its path is a plain local model folder)
    assert rep.resolve_model("org/hub-model") is None and rep.resolve_model(str(minilm)) is None
    shutil.rmtree(weights)  # the imported folder was moved away: say so, by name
    with pytest.raises(ModelError, match=rf"workspace model '{model_id}' .*index\.json\) points to .*{minilm.name}, "
                                         "which is not a model folder"):
        rep.resolve_model(model_id)


def test_tl_each_job_has_its_own_folder_and_latest_looks_at_earlier_jobs(tmp_path):
    template = tmp_path / "exp" / "tensorboards" / "tmpl"
    rep = _tl_reporter(tmp_path / "ws", job_id="12")
    run = rep.run_dir(str(template))
    assert run == str(template / "job_12")
    for n in (3, 11, 12, 100):
        (template / f"job_{n}").mkdir(parents=True)
    (template / "notes").mkdir()
    assert rep.earlier_run_dirs(run) == [str(template / f"job_{n}") for n in (100, 11, 3)]
    assert StandaloneReporter().run_dir("/x/out") == "/x/out" and StandaloneReporter().earlier_run_dirs("/x") == []

    # 'latest' in a new job resumes the newest checkpoint of the template's earlier jobs
    from dllm_trainer.training import checkpoints as ck

    calls = []
    orig = ck.newest_checkpoint

    def fake_newest(folder):
        calls.append(os.path.basename(folder))
        return f"{folder}/checkpoint-5" if folder.endswith("job_11") else None

    ck.newest_checkpoint = fake_newest
    try:
        cfg = TrainConfig.from_dict({"model_name": "m", "dataset_name": "d", "output_dir": run,
                                     "resume_from_checkpoint": "latest"})
        got = app._resume_request(cfg, rep, log=lambda m: None)
    finally:
        ck.newest_checkpoint = orig
    assert calls == ["job_12", "job_100", "job_11"]
    assert got.resume_from_checkpoint == str(template / "job_11" / "checkpoint-5")


def test_tl_unknown_dataset_names_the_workspace_datasets(tmp_path, capsys, monkeypatch):
    from lifecycle_tl import Workspace

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    ws = Workspace(home=tmp_path, workspace=tmp_path / "ws", env={})
    ws.add_dataset("tiny_chat", chat_rows()[:3])

    class Rep(FakeReporter):
        missing_dataset_hint = _tl_reporter(ws.workspace).missing_dataset_hint

    rep = Rep()
    code = app.run_job(job_cfg(tmp_path, dataset_name="tiny_chatt", model_name="no/such-model"), rep)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert ("'tiny_chatt' is not a dataset of the Transformer Lab workspace (" in err[0]
            and "datasets: tiny_chat), and not a local path; dataset 'tiny_chatt'" in err[0])
    assert "not in the local Hugging Face datasets cache and the Hub cannot be reached" in err[0]
    assert "not cached in None" not in err[0]


def test_the_worker_checks_the_dataset_before_loading_the_model(tmp_path, monkeypatch):
    """Before: a missing or broken dataset failed after the model and LoRA had loaded."""
    from dllm_trainer.errors import DataError
    from dllm_trainer.training import loading, train

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(loading, "load_for_training", no_model)
    broken = tmp_path / "data.jsonl"
    broken.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q" "completion": "a"}\n')
    cfg = TrainConfig.from_dict({"model_name": "org/some-model", "dataset_name": str(broken),
                                 "output_dir": str(tmp_path / "out"), "train_device": "cpu"})
    with pytest.raises(DataError, match=r"'data\.jsonl' line 2: not valid JSON"):
        train.run_training(cfg, log=lambda m: None)
    with pytest.raises(DataError, match=r"missing\.jsonl' not found"):
        train.run_training(cfg.replace(dataset_name=str(tmp_path / "missing.jsonl")), log=lambda m: None)
