"""A job's life as a task of the current Transformer Lab (v0.34+), end to end (slow): the real SDK
(transformerlab==0.1.46) in its own venv, our task.yaml's setup and run commands as the Local
provider runs them, the app's stop (tests/task_app.py says what is emulated and how).

- a LoRA job with string parameters (one left as its whole schema dict) completes through
  lab.finish: metrics charts with a finite loss, checkpoints in the job, the fused model with the
  job, TensorBoard events kept; setup kept the app's SDK and torch;
- a bad value (lora_r 6) ends FAILED with one message naming lora_r, and a non-zero exit;
- the Stop button (SIGTERM to every process, SIGKILL 3 s later) ends the job STOPPED with its
  latest checkpoint in the job (the stop's own one too when it is saved within those 3 s), and
  "resume from checkpoint" continues it; a stop while the job is still starting is a stop, too.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from lifecycle_tl import REPO
from task_app import TaskApp, app_torch, app_venv

pytestmark = pytest.mark.slow

ASSETS = REPO / "src" / "dllm_trainer" / "assets"


def chat_rows():
    return [json.loads(line) for line in (ASSETS / "chat_small.jsonl").read_text().splitlines() if line.strip()]


def form(app: TaskApp, **kw) -> dict:
    """The job's parameters as strings (sweeps and the CLI send them so), model and dataset picked
    from the workspace, one left as its whole schema dict, and keys the launch form adds."""
    params = dict(model_name="minilm", dataset_name="tiny_chat", training_method="bert", train_device="cpu",
                  max_length="64", batch_size="8", num_train_epochs="0", train_steps="3", logging_steps="1",
                  eval_steps="2", save_steps="2", lora_r="8", lora_alpha="16", seed="3", adaptor_name="minilm-dllm")
    params.update({k: str(v) for k, v in kw.items()})
    params["mask_prompt_loss"] = app.task["parameters"]["mask_prompt_loss"]
    params.update(provider_id="local-provider", provider_name="Local", cpus=None, memory=None, disk_space=None,
                  accelerators=None, num_nodes=None, minutes_requested=None, docker_image="", region="", use_spot=False)
    return params


@pytest.fixture(scope="module")
def app(tmp_path_factory, minilm) -> TaskApp:
    venv = app_venv()
    tl = TaskApp(venv, tmp_path_factory.mktemp("tl"))
    tl.add_dataset("tiny_chat", chat_rows())
    tl.add_model("minilm", minilm)
    return tl


def _venv_torch(app: TaskApp) -> str:
    import subprocess

    return subprocess.run([str(app.venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_task_job_completes_with_metrics_checkpoints_and_a_model(app):
    job = app.launch(form(app))
    rc = app.wait(job)
    log = job.log()
    assert rc == 0, job.setup_log[-2000:] + log[-4000:]
    assert app.settle(job) == "COMPLETE"
    assert "ignoring config keys" not in log and "Traceback" not in log

    # setup kept the app's SDK (the run went through it) and its torch: no CUDA build came in
    app_built_with = app_torch(app.venv)
    if "installing dependencies" in job.setup_log:  # the first run in a freshly built app venv
        assert "keeping the installed transformerlab SDK" in job.setup_log
        assert f"keeping the installed torch {app_built_with}" in job.setup_log
    else:
        assert "already installed" in job.setup_log
    assert _venv_torch(app) == app_built_with and "+cpu" in app_built_with

    state = app.job_json(job)
    data = state["job_data"]
    assert state["status"] == "COMPLETE" and state["progress"] == 100
    assert data["completion_status"] == "success" and "minilm-dllm" in data["completion_details"]
    assert data["live_status"] == "Remote command finished"
    score = data["score"]
    assert score["global_step"] == 3 and math.isfinite(score["eval_loss"]) and score["eval/loss"] == score["eval_loss"]

    # the Metrics charts: one row per logged step with a finite training loss, eval loss too
    rows = [r for r in app.metrics_rows(job) if r.get("metrics")]
    losses = [r["metrics"]["train/loss"] for r in rows if "train/loss" in r["metrics"]]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses)
    assert any("eval/loss" in r["metrics"] for r in rows)
    assert [r["step"] for r in rows if "train/loss" in r["metrics"]][:3] == [1, 2, 3]

    # checkpoints copied into the job (the app lists them and resumes from them)
    ckpts = data["checkpoints"]
    assert [Path(c).name for c in ckpts] == ["checkpoint-2", "checkpoint-3"]
    assert all((Path(c) / "trainer_state.json").is_file() for c in ckpts)
    assert Path(data["latest_checkpoint"]).name == "checkpoint-3"
    assert Path(ckpts[0]).parent == app.job_dir(job) / "checkpoints"

    # the fused model, saved with the job (jobs/<id>/models/<id>_<name>)
    model_dir = app.job_dir(job) / "models" / f"{job.job_id}_minilm-dllm"
    assert (model_dir / "config.json").is_file() and list(model_dir.glob("*.safetensors"))
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    assert data["models"] == [str(model_dir)]  # SDK 0.1.46 keeps the model's metadata in job_data only
    assert json.loads((model_dir / "dllm_training.json").read_text())["base_model"] == "minilm"
    assert not (job.workdir / "output" / "fused_model").exists()  # handed over, not kept twice

    # TensorBoard events kept as an artifact; the run's output stayed in the job's working folder
    assert list((app.job_dir(job) / "artifacts" / "tensorboard").rglob("events.out.tfevents*"))
    assert data["tensorboard_output_dir"] == str(job.workdir / "output")
    assert "[dllm] final model 'minilm-dllm'" in (app.job_dir(job) / "provider_logs.txt").read_text()


def test_task_job_with_a_bad_value_fails_naming_it(app):
    job = app.launch(form(app, lora_r="6"))
    rc = app.wait(job)
    log = job.log()
    assert rc != 0
    assert app.settle(job) == "FAILED"
    data = app.job_json(job)["job_data"]
    assert data["completion_status"] == "failed" and "lora_r" in data["completion_details"]
    assert "multiple of 4" in data["completion_details"]
    errors = [line for line in log.splitlines() if "[dllm-error]" in line]
    assert len(errors) == 1 and "lora_r" in errors[0]
    assert "Traceback" not in log
    assert not (app.job_dir(job) / "models").exists() or not any((app.job_dir(job) / "models").iterdir())


def test_task_stop_button_ends_the_job_stopped_with_a_checkpoint_and_it_resumes(app):
    job = app.launch(form(app, train_steps=400, eval_strategy="no", save_steps=3, logging_steps=1))
    deadline = time.monotonic() + 240
    while not app.job_json(job)["job_data"].get("checkpoints"):  # a periodic checkpoint is in the job
        assert job.proc.poll() is None, job.log()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint was recorded"
        time.sleep(0.5)
    t0 = time.monotonic()
    killed = app.stop(job)  # SIGTERM to every process; SIGKILL to those left after STOP_GRACE
    took = time.monotonic() - t0
    log = job.log()
    assert "[dllm] stop requested" in log and "Traceback" not in log, log[-4000:]
    assert app.settle(job) == "STOPPED"
    state = app.job_json(job)
    data = state["job_data"]
    assert state["status"] == "STOPPED" and data["completion_status"] == "stopped"
    ckpts = data["checkpoints"]
    assert ckpts and all((Path(c) / "trainer_state.json").is_file() for c in ckpts), data
    step = int(Path(data["latest_checkpoint"]).name.split("-")[1])
    assert 0 < step < 400
    assert json.loads((Path(data["latest_checkpoint"]) / "trainer_state.json").read_text())["global_step"] == step
    if not killed:  # everything ended within the app's grace: exit 0, the stop's own checkpoint recorded
        assert job.proc.returncode == 0 and data["live_status"] == "Remote command finished", log[-4000:]
        assert f"stopped at step {step}" in data["completion_details"], data["completion_details"]
    print(f"\nstop: checkpoint-{step} recorded; {'ended by itself' if not killed else 'killed: ' + repr(killed)} "
          f"{took:.1f} s after the stop signal")

    # "resume from checkpoint": a new job naming the parent and the checkpoint; same parameters
    resumed = app.launch(form(app, train_steps=step + 2, eval_strategy="no", save_steps=10000, logging_steps=1),
                         job_data={"parent_job_id": job.job_id,
                                   "resumed_from_checkpoint": Path(data["latest_checkpoint"]).name})
    rc = app.wait(resumed)
    log = resumed.log()
    assert rc == 0, log[-4000:]
    assert app.settle(resumed) == "COMPLETE"
    assert f"resuming from checkpoint {data['latest_checkpoint']}" in log
    final = app.job_json(resumed)["job_data"]
    assert final["score"]["global_step"] == step + 2
    assert (app.job_dir(resumed) / "models" / f"{resumed.job_id}_minilm-dllm" / "config.json").is_file()


def test_task_stopped_while_starting_ends_stopped_not_failed(app):
    job = app.launch(form(app))
    deadline = time.monotonic() + 60
    while app.job_json(job)["job_data"].get("live_status") != "Remote command started":
        assert time.monotonic() < deadline and job.proc.poll() is None, job.log()[-3000:]
        time.sleep(0.05)
    app.stop(job)  # while python is still importing the package
    assert app.settle(job) == "STOPPED", job.log()[-3000:]
    data = app.job_json(job)["job_data"]
    assert data.get("live_status") != "Remote command crashed" and data.get("completion_status") != "failed"


# Run in the app venv: lab.init() whose status update reads the job file mid-write. The SDK
# rewrites index.json in place (truncate, then write) and reads a half-written file as {}; its
# read-modify-write then saves only the field it set. CI saw it: the app set STOPPING while our
# process started, and the job lost its parameters ("model_name is required").
_INIT_AFTER_A_TORN_READ = r"""
import json, sys
import lab.labresource as res
from lab import lab as sdk
torn = {"left": 0}
real_read = res.BaseLabResource.get_json_data
async def read(self, *a, **k):
    if torn["left"]:
        torn["left"] -= 1
        return {}
    return await real_read(self, *a, **k)
res.BaseLabResource.get_json_data = read
from lab.job import Job
real_status = Job.update_status
async def update_status(self, status):
    torn["left"] = int(sys.argv[1]) if status == "RUNNING" else 0  # the one lab.init() writes
    return await real_status(self, status)
Job.update_status = update_status
from dllm_trainer.hosts.tlab_common import run_sdk
from dllm_trainer.hosts.tlab_task import TaskReporter
reporter = TaskReporter()
config, _ = reporter.job_config()
print(json.dumps({"config": config, "job_data": run_sdk(reporter.job.get_job_data())}))
"""


@pytest.mark.parametrize("torn_reads", [1, 100], ids=["retried", "outlasting-the-retries"])
def test_task_keeps_its_parameters_when_the_job_file_is_torn_at_start(app, torn_reads):
    import os
    import subprocess

    params = form(app)
    info = app.sdk("create_job", experiment="exp1", job_data={"task_name": "dllm", "parameters": params})
    env = dict(app.base_env, _TFL_JOB_ID=info["job_id"], _TFL_EXPERIMENT_ID="exp1", TFL_EXPERIMENT_ID="exp1",
               PYTHONPATH=str(REPO / "src") + os.pathsep + app.base_env.get("PYTHONPATH", ""))
    proc = subprocess.run([str(app.venv / "bin" / "python"), "-c", _INIT_AFTER_A_TORN_READ, str(torn_reads)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"]["model_name"] == "minilm" and out["config"]["train_steps"] == "3"
    assert out["job_data"]["parameters"] == params and out["job_data"]["task_name"] == "dllm"
    assert out["job_data"]["live_status"] == "Lab initialized"
    if torn_reads == 1:  # retried: nothing init wrote before the torn read was lost
        assert out["job_data"]["start_time"]
    else:  # the update saved from {} wiped the record; the launch data was put back
        assert "start_time" not in out["job_data"]
        assert "restored from the launch" in proc.stdout
