"""The current Transformer Lab's task contract, without the app (fast): task.yaml is what the app
accepts and agrees with config.py, job parameters as lab.get_config() returns them, how main.py
tells a task from the plugin harness and standalone, the stop signal's path through the launcher
and the workers. End to end, against the real SDK: test_task_lifecycle.py."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from dllm_trainer import app, cli
from dllm_trainer.config import TrainConfig, task_form_fields
from dllm_trainer.hosts import tlab_task
from dllm_trainer.hosts.standalone import StandaloneReporter
from dllm_trainer.training import callbacks
from dllm_trainer.training.launcher import LaunchPlan, run_workers
from lifecycle_tl import REPO, clean_env

TASK_YAML = REPO / "task.yaml"

# transformerlab-app schemas/task.py (TaskYamlSpec, extra="forbid") and the launch form's
# QueueTaskModal/types.ts: what the app accepts.
APP_TOP_LEVEL = {"name", "resources", "envs", "setup", "run", "github_repo_url", "github_repo_dir",
                 "github_repo_branch", "parameters", "sweeps", "minutes_requested"}
APP_RESOURCES = {"compute_provider", "cpus", "memory", "disk_space", "accelerators", "num_nodes", "fleet_name",
                 "instance_type", "cloud", "region", "zone", "use_spot", "image_id"}
APP_PARAM_KEYS = {"type", "default", "title", "min", "max", "step", "options", "enum", "required", "ui_widget"}
APP_TYPES = {"int", "integer", "float", "number", "bool", "boolean", "enum", "string"}
APP_WIDGETS = {"slider", "range", "switch", "radio", "password", "select", "lab_model_select", "lab_dataset_select"}


@pytest.fixture(scope="module")
def task() -> dict:
    return yaml.safe_load(TASK_YAML.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ task.yaml


def test_task_yaml_is_what_the_app_accepts(task):
    assert set(task) <= APP_TOP_LEVEL, set(task) - APP_TOP_LEVEL
    assert isinstance(task["name"], str) and task["name"].strip()
    assert isinstance(task["run"], str) and isinstance(task.get("setup", ""), str)
    assert set(task.get("resources") or {}) <= APP_RESOURCES
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in (task.get("envs") or {}).items())
    for name, p in task["parameters"].items():
        assert isinstance(p, dict) and set(p) <= APP_PARAM_KEYS, (name, set(p) - APP_PARAM_KEYS)
        assert p["type"] in APP_TYPES and "default" in p and p.get("title"), name
        if "ui_widget" in p:
            assert p["ui_widget"] in APP_WIDGETS, name
        if p["type"] == "enum":
            assert p["default"] in p["options"], name
        if "min" in p:
            assert p["min"] <= p["default"], name
        if "max" in p:
            assert p["default"] <= p["max"], name
    assert task["parameters"]["model_name"]["ui_widget"] == "lab_model_select"
    assert task["parameters"]["dataset_name"]["ui_widget"] == "lab_dataset_select"
    assert task["parameters"]["model_name"]["required"] and task["parameters"]["dataset_name"]["required"]
    # the commands the Local provider runs in the folder holding our files
    assert (REPO / task["run"].split()[-1]).is_file() and (REPO / task["setup"].split()[-1]).is_file()


def test_task_parameters_are_the_form_fields(task):
    params = task["parameters"]
    assert list(params) == ["model_name", "dataset_name"] + [f.name for f in task_form_fields()]
    by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, p in params.items():
        assert p["default"] == by_name[name].default, name
        assert p["title"] == by_name[name].metadata["title"], name
    assert params["lora_r"]["step"] == 4 and params["lora_r"]["min"] == 4
    assert params["training_method"]["options"] == by_name["training_method"].metadata["schema"]["enum"]
    assert {"bert", "llada", "dream"} <= set(params["training_method"]["options"])


def test_committed_task_yaml_matches_generated(task, tmp_path):
    assert task["parameters"] == json.loads(json.dumps(tlab_task.task_parameters())), \
        "task.yaml is stale: run dllm-trainer manifest --task-yaml task.yaml"
    # the writer regenerates the parameters of a stale file and keeps its other keys
    stale = tmp_path / "task.yaml"
    stale.write_text(yaml.safe_dump({**task, "parameters": {"x": {"type": "string", "default": ""}},
                                     "description": "not a task.yaml key"}), encoding="utf-8")
    assert cli.main(["manifest", "--task-yaml", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == TASK_YAML.read_text(encoding="utf-8")


def test_task_defaults_left_as_schema_dicts_give_the_default_config(task):
    raw = dict(task["parameters"])  # every key left alone: its whole schema dict
    raw.update(model_name="m", dataset_name="d")
    config, ignored = tlab_task.job_parameters(raw)
    assert ignored == []
    cfg = TrainConfig.from_dict(config)
    assert cfg == TrainConfig.from_dict({"model_name": "m", "dataset_name": "d"})


# ------------------------------------------------------------------------------ job parameters


def test_job_parameters_as_the_launch_form_and_sweeps_send_them():
    raw = {
        "model_name": "org/model", "dataset_name": "my-data", "lora_r": "16", "learning_rate": "3e-5",
        "lora": "false", "mask_prompt_loss": {"title": "Mask prompt loss", "type": "boolean", "default": False},
        # the form's own keys: silently ignored
        "provider_id": "p1", "provider_name": "Local", "cpus": None, "accelerators": None, "num_nodes": None,
        "docker_image": "", "region": "", "use_spot": False, "minutes_requested": None,
        # not ours, not the app's: named once
        "learning_rat": "0.1",
    }
    config, ignored = tlab_task.job_parameters(raw)
    assert ignored == ["learning_rat"]
    cfg = TrainConfig.from_dict(config)
    assert (cfg.lora_r, cfg.learning_rate, cfg.lora, cfg.mask_prompt_loss) == (16, 3e-5, False, False)
    assert cfg.model_name == "org/model" and cfg.dataset_name == "my-data"


def test_metric_names_as_the_app_charts_them():
    assert [tlab_task.chart_name(k) for k in ("loss", "eval_loss", "masked_accuracy", "train/loss")] == \
        ["train/loss", "eval/loss", "train/masked_accuracy", "train/loss"]


# ------------------------------------------------------------------------------ which host


def test_host_detection():
    assert tlab_task.launched_as_task({"_TFL_JOB_ID": "j1", "_TFL_EXPERIMENT_ID": "exp"})
    assert tlab_task.launched_as_task({"_TFL_JOB_ID": "j1", "TFL_EXPERIMENT_ID": "exp"})
    assert not tlab_task.launched_as_task({"_TFL_JOB_ID": "j1"})  # the v0.30.x harness sets neither
    assert not tlab_task.launched_as_task({})


def test_task_job_under_the_old_sdk_fails_with_one_line(tmp_path):
    """A task started where only SDK 0.0.83 (the plugin generation, this test venv's) is installed."""
    home = tmp_path / "tlhome"
    home.mkdir()
    env = clean_env(tmp_path, TFL_HOME_DIR=str(home), _TFL_JOB_ID="job-1", _TFL_EXPERIMENT_ID="exp1")
    proc = subprocess.run([sys.executable, str(REPO / "main.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "[dllm-error]" in lines[0] and "transformerlab >= 0.1.0" in lines[0], proc.stderr
    assert "0.0.83" in lines[0] and "Traceback" not in proc.stderr + proc.stdout


def test_without_a_host_main_says_what_to_give(capsys, monkeypatch):
    monkeypatch.delenv("_TFL_JOB_ID", raising=False)
    assert app.main([]) == 2
    assert "--config" in capsys.readouterr().err


def test_workers_stop_on_sigterm_only_under_a_host_that_stops_that_way():
    class Signalling(StandaloneReporter):
        stops_with_signal = True

    assert app._host_worker_env(Signalling()) == {callbacks.STOP_ON_SIGTERM_ENV: "1"}
    assert app._host_worker_env(StandaloneReporter()) == {}


# ------------------------------------------------------------------------------ a signalled stop


def test_sigterm_is_a_stop_request_for_the_stop_callback(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    previous = signal.getsignal(signal.SIGTERM)
    try:
        callbacks.stop_on_sigterm()
        cb = callbacks.StopFileCallback(str(tmp_path))
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
        control = cb.on_step_end(args, TrainerState(), TrainerControl())
        assert not control.should_training_stop
        os.kill(os.getpid(), signal.SIGTERM)
        control = cb.on_step_end(args, TrainerState(), TrainerControl())
        assert control.should_training_stop and control.should_save and cb.stopped
    finally:
        signal.signal(signal.SIGTERM, previous)
        callbacks._signalled.clear()


# A launcher that dies on SIGTERM (as accelerate's simple launcher does) and a worker that, on
# SIGTERM, finishes its step, saves and reports, as ours do under STOP_ON_SIGTERM_ENV.
_WORKER = textwrap.dedent("""
    import json, signal, sys, time
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(1))
    print("[dllm-event] " + json.dumps({"event": "progress", "step": 1, "max_steps": 100}), flush=True)
    while not stop:
        time.sleep(0.05)
    time.sleep(1.0)  # the rest of the step and the checkpoint
    print("[dllm-event] " + json.dumps({"event": "checkpoint", "step": 2, "path": "OUT/checkpoint-2"}), flush=True)
    print("[dllm-event] " + json.dumps({"event": "result", "stopped": True, "metrics": {}}), flush=True)
""")
_LAUNCHER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); time.sleep(600)"


def test_a_stop_signalled_to_every_process_keeps_the_workers_checkpoint(tmp_path):
    import psutil

    signalled = []

    def stop_everything(step, max_steps):  # the app: SIGTERM to every process of the job at once
        if not signalled:
            signalled.append(True)
            for p in psutil.Process().children(recursive=True):
                p.send_signal(signal.SIGTERM)

    saved = []
    plan = LaunchPlan(argv=[sys.executable, "-c", _LAUNCHER, _WORKER.replace("OUT", str(tmp_path))], env={},
                      num_processes=1, world_size=1, description="test")
    res = run_workers(plan, output_dir=str(tmp_path), env=clean_env(tmp_path), on_progress=stop_everything,
                      on_checkpoint=lambda path, step: saved.append(path), should_stop=lambda: bool(signalled),
                      poll_interval=0.2, exit_grace=15)
    assert res.returncode != 0 and res.stop_requested  # the launcher died of the signal
    assert saved == [str(tmp_path / "checkpoint-2")]  # ...but the worker was left to save
    assert res.result == {"event": "result", "stopped": True, "metrics": {}}
