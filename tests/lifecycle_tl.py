"""Emulates the Transformer Lab app (v0.30.x, SDK transformerlab==0.0.83) for the lifecycle tests.

The SDK reads TFL_HOME_DIR when it is imported and keeps the team (org) in a context variable, so
every SDK call runs in a fresh subprocess (`python lifecycle_tl.py ACTION JSON`) with the test's
environment; the tests read the job's index.json directly, as the app's UI would see it.

    ws = Workspace.create(tmp_path, org="team-a")
    job = ws.create_job("exp1", {...form values as strings...})   # job + input file, like the app
    proc = ws.run_plugin(job, cwd=...)                              # harness-style subprocess
    ws.job_json(job.job_id)["status"]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from werkzeug.utils import secure_filename  # the app's own rule for folder names

REPO = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).resolve().parent / "lifecycle_harness.py"
PLUGIN_ID = "dllm_trainer"
# What the Data Template tab (TrainingModalDataTemplatingTab.tsx, training_template_format "alpaca")
# sends for a new template: its textareas' default values.
APP_DATA_TEMPLATE = {"instruction_template": "Instruction: {{instruction}}", "input_template": "{{input}}",
                     "output_template": "{{output}}"}


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """os.environ without anything of Transformer Lab or W&B, HOME in the test folder (no
    ~/.netrc, no accelerate default config, no W&B settings), the Hub offline."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TFL_", "_TFL_", "WANDB_", "ACCELERATE_", "CUDA_VISIBLE"))}
    env.update(
        HOME=str(home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


@dataclass
class Job:
    job_id: str
    experiment: str
    input_file: str
    output_dir: str  # what the app sets: <experiment>/tensorboards/<template_name>, shared by the template's jobs
    adaptor_output_dir: str

    @property
    def run_dir(self) -> Path:
        """Where the plugin keeps this job's files: its own folder below output_dir."""
        return Path(self.output_dir) / f"job_{self.job_id}"


@dataclass
class Workspace:
    home: Path  # TFL_HOME_DIR
    workspace: Path  # where the SDK keeps jobs, models, datasets
    env: dict

    @classmethod
    def create(cls, tmp: Path, org: str | None = None, **env_extra: str) -> "Workspace":
        home = tmp / "tlhome"
        home.mkdir(parents=True, exist_ok=True)
        user_home = tmp / "userhome"
        user_home.mkdir(exist_ok=True)
        extra = {"TFL_HOME_DIR": str(home), **env_extra}
        if org:
            extra["_TFL_ORG_ID"] = org
        env = clean_env(user_home, **extra)
        ws = home / "orgs" / org / "workspace" if org else home / "workspace"
        out = cls(home=home, workspace=ws, env=env)
        out.sdk("init")
        return out

    # ---- SDK calls in a subprocess ------------------------------------------------------------
    def sdk(self, action: str, **payload):
        proc = subprocess.run([sys.executable, __file__, action, json.dumps(payload)], env=self.env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"SDK helper '{action}' failed:\n{proc.stdout}\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def create_job(self, experiment: str, form: dict, *, model_name: str, dataset_name: str,
                   template_name: str = "dllm-template", adaptor_name: str = "dllm-adaptor",
                   model_architecture: str = "BertModel", data_template: dict | None = None) -> Job:
        """What the app does for a LoRA train job (transformerlab-app v0.30.3): the Train modal's form
        (TrainingModalLoRA.tsx: hidden fields, the Data Template tab's alpaca fields with their
        defaults for a new template, the plugin form's values as strings), the task's inputs/outputs
        merged in when queued (routers/tasks.py), then job_id, adaptor_output_dir and output_dir
        added when it runs (shared.py run_job), written to <workspace>/temp/plugin_input_<job>.json."""
        info = self.sdk("create_job", experiment=experiment)
        job_id = str(info["job_id"])
        exp_dir = Path(info["experiment_dir"])
        config = {k: (v if isinstance(v, str) else json.dumps(v) if isinstance(v, bool) else str(v))
                  for k, v in form.items()}  # the plugin form's values come back as strings
        config.update(
            template_name=template_name,
            plugin_name=PLUGIN_ID,
            model_name=model_name,  # the experiment's foundation_filename (a path) or foundation (an id)
            model_architecture=model_architecture,
            foundation_model_file_path=model_name if ("/" in model_name and os.path.isabs(model_name)) else "",
            embedding_model="",
            embedding_model_architecture="",
            embedding_model_file_path="",
            **(APP_DATA_TEMPLATE if data_template is None else data_template),
            dataset_name=dataset_name,
            type="LoRA",
            chatml_formatted_column="",
            run_sweeps=False,
            adaptor_name=adaptor_name,
            job_id=job_id,
            adaptor_output_dir=str(self.workspace / "adaptors" / secure_filename(model_name) / adaptor_name),
            output_dir=str(exp_dir / "tensorboards" / template_name),
        )
        temp = self.workspace / "temp"
        temp.mkdir(parents=True, exist_ok=True)
        input_file = temp / f"plugin_input_{job_id}.json"
        input_file.write_text(json.dumps({"experiment": info["experiment"], "config": config}, indent=4))
        self.sdk("queue_job", job_id=job_id, config=config)
        return Job(job_id, experiment, str(input_file), config["output_dir"], config["adaptor_output_dir"])

    def run_plugin(self, job: Job, *, cwd: Path, timeout: float = 300, wait: bool = True):
        """The app's command line: <venv python> plugin_harness.py --plugin_dir ... --input_file ... --experiment_name ..."""
        argv = [sys.executable, str(HARNESS), "--plugin_dir", str(REPO), "--input_file", job.input_file,
                "--experiment_name", job.experiment]
        if not wait:
            return subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def process_exited(self, job_id: str) -> str:
        """What the app does when the plugin process ends."""
        return self.sdk("process_exited", job_id=job_id)["status"]

    def resume_from(self, job_id: str, parent_job_id: str, checkpoint_name: str) -> None:
        """What the app records for "resume from checkpoint": the parent job and the checkpoint's name."""
        self.sdk("set_job_data", job_id=job_id,
                 fields={"parent_job_id": parent_job_id, "resumed_from_checkpoint": checkpoint_name})

    def set_stop(self, job_id: str) -> None:
        """The app's Stop button."""
        self.sdk("set_stop", job_id=job_id)

    # ---- reading state as the app's UI does ----------------------------------------------------
    def job_json(self, job_id: str) -> dict:
        path = self.workspace / "jobs" / str(job_id) / "index.json"
        for _ in range(50):  # the plugin rewrites the file; retry a read caught mid-write
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                time.sleep(0.1)
        raise AssertionError(f"cannot read {path}")

    def add_dataset(self, name: str, rows: list[dict], *, location: str = "local", filename: str | None = None,
                    files: dict[str, list[dict]] | None = None) -> Path:
        """An uploaded dataset: <workspace>/datasets/<name>/ with the uploaded files and the index.json
        the app writes (routers/data.py: dataset_new + fileupload). `files`: several files by name,
        e.g. {"<name>_train.jsonl": rows, "<name>_eval.jsonl": rows}."""
        d = self.workspace / "datasets" / name
        d.mkdir(parents=True, exist_ok=True)
        files = files or {filename or f"{name}.jsonl": rows}
        (d / "index.json").write_text(json.dumps({"dataset_id": name, "location": location, "description": "",
                                                  "size": -1, "json_data": {"files": sorted(files)}}))
        for fname, frows in files.items():
            (d / fname).write_text("".join(json.dumps(r) + "\n" for r in frows))
        return d

    def add_model(self, name: str, source: Path) -> Path:
        """A model stored in the workspace (downloaded or trained): the weights (linked here) next to an index.json."""
        d = self.workspace / "models" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file():
                (d / f.name).symlink_to(f)
        (d / "index.json").write_text(json.dumps({"model_id": name, "name": name, "local_model": True,
                                                  "json_data": {"architecture": "BertModel", "source": "local"}}))
        return d

    def import_local_model(self, source: Path, folder: str = "my_models") -> tuple[str, str]:
        """The app's local import (GET /model/import_from_local_path, models/filesystemmodel.py): the model
        stays where it is (a folder inside the workspace), <workspace>/models/<basename>/index.json records
        its path in json_data.model_filename / source_id_or_path. Returns (model id, what the Train tab
        sends as model_name): the experiment's foundation_filename, which MainAppPanel.tsx sets to the
        model list's local_path = <workspace>/models/<id> (a folder holding only index.json)."""
        model_path = self.workspace / folder / source.name
        model_path.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file():
                (model_path / f.name).symlink_to(f)
        config = json.loads((source / "config.json").read_text())
        model_id = source.name
        json_data = {
            "uniqueID": model_id, "model_filename": str(model_path), "name": model_id, "description": "",
            "architecture": (config.get("architectures") or [""])[0], "formats": [], "source": "local",
            "source_id_or_path": str(model_path), "huggingface_repo": "", "parameters": "", "context": "",
            "license": "", "logo": "", "private": False, "gated": False, "model_type": "", "library_name": "",
            "transformers_version": "", "context_size": config.get("max_position_embeddings", ""),
            "quantization": config.get("quantization", {}),
        }
        entry = self.workspace / "models" / model_id
        entry.mkdir(parents=True, exist_ok=True)
        (entry / "index.json").write_text(json.dumps({"model_id": model_id, "name": model_id, "json_data": json_data}))
        return model_id, str(entry)

    def add_team_secret(self, name: str, value: str) -> None:
        path = self.workspace / "team_secrets.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = value
        path.write_text(json.dumps(data))


# ---- the subprocess side ----------------------------------------------------------------------


def _sdk_main(action: str, payload: dict) -> dict:
    import asyncio

    from lab import Experiment, Job as SdkJob, dirs

    org = os.environ.get("_TFL_ORG_ID")
    if org:
        dirs.set_organization_id(org)

    async def run():
        if action == "init":
            return {"workspace": await dirs.get_workspace_dir()}
        if action == "create_job":
            exp = await Experiment.create_or_get(payload["experiment"], create_new=True)
            job = await exp.create_job()
            return {"job_id": job.id, "experiment_dir": await exp.get_dir(), "experiment": await exp.get_json_data()}
        if action == "queue_job":
            job = await SdkJob.get(payload["job_id"])
            await job.set_type("TRAIN")
            await job.update_job_data_field("config", payload["config"])
            await job.update_status("RUNNING")  # the app marks the job RUNNING, then starts the plugin
            return {"ok": True}
        if action == "process_exited":
            # the app's on_train_complete: COMPLETE only if the plugin left the job RUNNING
            job = await SdkJob.get(payload["job_id"])
            if await job.get_status() == "RUNNING":
                await job.update_status("COMPLETE")
            return {"status": await job.get_status()}
        if action == "set_job_data":
            job = await SdkJob.get(payload["job_id"])
            for key, value in payload["fields"].items():
                await job.update_job_data_field(key, value)
            return {"ok": True}
        if action == "set_stop":
            job = await SdkJob.get(payload["job_id"])
            await job.update_job_data_field("stop", True)
            return {"ok": True}
        raise SystemExit(f"unknown action {action}")

    return asyncio.run(run())


if __name__ == "__main__":
    print(json.dumps(_sdk_main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})))
