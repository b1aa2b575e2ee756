"""A job run as a task by the current Transformer Lab (v0.34 and later; SDK transformerlab 0.1.x).

No other module imports `lab` for a task or knows this contract. What the app does and expects
(transformerlab-app: compute_providers/local.py, services/compute_provider/launch_template.py,
services/job_service.py, services/process_registry.py; the SDK's lab_facade.py, job.py, dirs.py,
remote_trap.py):

- The task is `task.yaml` at the repository root plus its files, imported from a GitHub URL, a
  folder upload or a gallery. The app validates task.yaml with unknown keys forbidden; its
  `parameters` (generated from config.py, `task_parameters()` below) become the launch form.
- The Local provider makes a fresh venv per job (`uv venv`, the SDK and the app's pins: torch
  2.9.1, transformers 4.57.1, ...), sets HOME and the working directory to the job's folder holding
  the task's files (top-level dot files are not copied), runs `setup` under `set -e -o pipefail`
  (600 s), then `tfl-remote-trap -- '<run>'` in a new session. Environment: `_TFL_JOB_ID`,
  `_TFL_EXPERIMENT_ID` (also `TFL_EXPERIMENT_ID`), `TFL_WORKSPACE_DIR`, `TFL_HOME_DIR`, `_TFL_USER_ID`,
  `TFL_STORAGE_PROVIDER`, the task's `envs`. That is how `launched_as_task()` knows it is one.
- Parameters: `lab.init()` attaches to the job; `lab.get_config()` returns `job_data.parameters`:
  the task's parameters merged with the form's values, untouched. Values can be strings (sweeps, the
  CLI), a key left alone can still be its whole schema dict, and the form adds its own keys
  (provider, resources, docker_image, region, use_spot, ...: `TASK_APP_KEYS`, ignored silently).
- Reporting: `lab.update_progress(pct, metrics=..., step=...)` (SDK 0.1.40+) appends to the job's
  metrics.jsonl, which the app charts; `lab.save_checkpoint` copies a checkpoint into
  `<job>/checkpoints/` (the app lists them and offers "resume from checkpoint"); `lab.save_model`
  copies the final model into `<job>/models/<job id>_<name>/`; `lab.save_artifact` keeps the
  TensorBoard events (the app has no TensorBoard viewer); `lab.finish` = COMPLETE; `lab.error` = FAILED.
  tfl-remote-trap marks the job FAILED when our process exits non-zero.
- Stop: the Stop button sets `job_data.stop` and status STOPPING, then the provider sends SIGTERM to
  every process of the job's tree at once and SIGKILL to survivors 3 s later. So SIGTERM here means
  "stop": the workers finish their step and save a checkpoint (callbacks.py), this process reports
  STOPPED and exits 0 (a non-zero exit would turn the job FAILED).
- Resume: the app starts a new job with `parent_job_id` and `resumed_from_checkpoint` (a name in the
  parent's checkpoints folder); `lab.get_checkpoint_to_resume()` returns its path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

from ..errors import UserError
from .tlab_common import WorkspaceHost, clean_scalars, run_sdk

APP_NAME = "Transformer Lab"
TASK_YAML = "task.yaml"
SDK_FLOOR = "0.1.0"  # lab.get_config() and the task job layout

# Keys the app's launch form or API put into job_data.parameters beside the task's own parameters.
TASK_APP_KEYS = frozenset(
    {
        "provider_id", "provider_name", "provider_type", "resource_group_id", "resource_group_name",
        "resource_group_custom_override", "cpus", "memory", "disk_space", "accelerators", "num_nodes",
        "minutes_requested", "description", "custom_sbatch_flags", "docker_image", "region", "zone",
        "use_spot", "fleet_name", "resources", "run_sweeps", "sweep_config", "sweep_metric",
        "lower_is_better", "enable_trackio", "trackio_project_name", "enable_profiling",
        "enable_profiling_torch", "experiment_name", "task_name", "subtype", "interactive_type",
        "cluster_name", "file_mounts", "github_repo_url", "github_repo_dir", "github_repo_branch",
    }
)

# task.yaml (the app's TaskYamlSpec and launch form): top-level keys, parameter keys, types, widgets.
TASK_KEYS = ("name", "resources", "envs", "setup", "run", "github_repo_url", "github_repo_dir",
             "github_repo_branch", "parameters", "sweeps", "minutes_requested")
PARAMETER_KEYS = ("type", "default", "title", "min", "max", "step", "options", "enum", "required", "ui_widget")
PARAMETER_TYPES = ("int", "integer", "float", "number", "bool", "boolean", "enum", "string")
PARAMETER_WIDGETS = ("slider", "range", "switch", "radio", "password", "select", "lab_model_select",
                     "lab_dataset_select")
TASK_HEADER = (
    "# Diffusion LLM Trainer as a Transformer Lab task (v0.34 and later): Tasks > New, from this\n"
    "# repository's GitHub URL or a folder upload. The `parameters` are generated from\n"
    "# src/dllm_trainer/config.py (`dllm-trainer manifest --task-yaml task.yaml`); do not edit them here.\n"
    "# `run` ignores SIGTERM (the app's stop) until main.py, seconds later, handles it as a stop.\n"
)
TASK_STATIC = {
    "name": "diffusion-llm-trainer",
    "envs": {"PYTHONUNBUFFERED": "1"},
    "setup": "bash setup.sh",
    # Dying of the stop signal while the package loads would read as a crash (FAILED); ignored, the
    # app's SIGKILL 3 s later ends it and the job is STOPPED. install_stop_signal() then takes over.
    "run": "trap '' TERM; exec python main.py",
}


def launched_as_task(environ=None) -> bool:
    """True when the current Transformer Lab started this process as a task's run command."""
    env = os.environ if environ is None else environ
    return bool(env.get("_TFL_JOB_ID", "").strip()
                and (env.get("_TFL_EXPERIMENT_ID", "").strip() or env.get("TFL_EXPERIMENT_ID", "").strip()))


# ---- stop requests --------------------------------------------------------------------------------
_STOP_SIGNALLED = threading.Event()


def install_stop_signal() -> None:
    """The app stops a task with SIGTERM (after setting status STOPPING): record it as a stop request
    instead of dying. Installed first thing, so a stop during start-up is a stop too."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # only sets a flag: safe whatever the main thread is doing
        _STOP_SIGNALLED.set()

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # pragma: no cover - not the main thread of the main interpreter
        pass


# ---- the job file ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _torn_reads_retried(attempts: int = 40, wait_s: float = 0.05):
    """While ``lab.init()`` runs: the SDK's reads of a job file caught mid-write are retried.

    The SDK rewrites index.json in place (truncate, then write), reads a half-written file as {}
    and saves its read-modify-write updates from that {}: one such update during init wiped the
    job record, the app's stop flag and STOPPING with it (the stop signal itself is ignored while
    Python starts, task.yaml `run`), and the stopped job ran on and ended COMPLETE. Every file
    init reads exists and is non-empty, so {} there is always a torn read."""
    try:
        from lab.labresource import BaseLabResource
    except ImportError:  # another SDK layout: its own reads
        yield
        return
    import asyncio

    original = BaseLabResource.get_json_data

    async def get_json_data(self, *args, **kwargs):
        data = {}
        for _ in range(attempts):
            data = await original(self, *args, **kwargs)
            if data:
                break
            await asyncio.sleep(wait_s)
        return data

    BaseLabResource.get_json_data = get_json_data
    try:
        yield
    finally:
        BaseLabResource.get_json_data = original


# ---- parameters -----------------------------------------------------------------------------------


def job_parameters(raw: dict) -> tuple[dict, list[str]]:
    """(our config keys, keys this trainer ignores) from `lab.get_config()`: schema dicts the user
    left alone become their default; the app's own keys are dropped without a word."""
    from ..config import APP_KEYS, TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in (raw or {}).items():
        if key in TASK_APP_KEYS:
            continue
        if isinstance(value, dict) and ("default" in value or "type" in value):
            value = value.get("default")
        if key in known:
            config[key] = value
        elif key not in APP_KEYS:
            ignored.append(key)
    return config, sorted(ignored)


def task_parameters() -> dict:
    """task.yaml `parameters`, generated from the config fields (the form the app shows)."""
    from ..config import TrainConfig, _field_type, task_form_fields

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    params: dict[str, dict] = {}
    for name, widget in (("model_name", "lab_model_select"), ("dataset_name", "lab_dataset_select")):
        f = fields[name]
        params[name] = {"title": f.metadata["title"], "type": "string", "default": f.default, "required": True,
                        "ui_widget": widget}
    for f in task_form_fields():
        typ = _field_type(f)
        schema = f.metadata["schema"]
        entry: dict[str, Any] = {"title": f.metadata["title"]}
        if "enum" in schema:
            entry.update(type="enum", default=f.default, options=list(schema["enum"]))
        else:
            entry.update(type={bool: "boolean", int: "integer", float: "number"}.get(typ, "string"), default=f.default)
            if "minimum" in schema:
                entry["min"] = schema["minimum"]
            if "maximum" in schema:
                entry["max"] = schema["maximum"]
            if typ is int:
                entry["step"] = schema.get("multipleOf", 1)
        params[f.name] = entry
    return params


def task_document(existing: dict | None = None) -> dict:
    """The whole task.yaml: the keys of an existing file kept (unknown ones dropped), parameters regenerated."""
    doc = {k: v for k, v in (existing or {}).items() if k in TASK_KEYS and k != "parameters"}
    for key, value in TASK_STATIC.items():
        doc.setdefault(key, value)
    ordered = {k: doc[k] for k in TASK_KEYS if k in doc}
    ordered["parameters"] = task_parameters()
    return ordered


def write_task_yaml(path: str) -> None:
    import yaml

    existing = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        existing = loaded if isinstance(loaded, dict) else None
    text = TASK_HEADER + yaml.safe_dump(task_document(existing), sort_keys=False, default_flow_style=None,
                                        allow_unicode=True, width=1000)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ---- reporting ------------------------------------------------------------------------------------


def chart_name(key: str) -> str:
    """Metric names as the app charts them (and as TensorBoard shows them): train/loss, eval/loss."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return key if "/" in key else "train/" + key


def _sdk_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("transformerlab")
    except Exception:  # noqa: BLE001
        return "unknown"


def _version_tuple(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


class TaskReporter(WorkspaceHost):
    """Reports one task job to the current Transformer Lab. See the module docstring."""

    name = APP_NAME
    grouped_model_ids = True
    stops_with_signal = True  # the workers save a checkpoint on SIGTERM (app.py passes it on)

    def __init__(self, *, log: Callable[[str], Any] = print):
        self._log = log
        self.job_id = os.environ.get("_TFL_JOB_ID", "").strip()
        for var in ("TFL_HOME_DIR", "TFL_WORKSPACE_DIR"):
            folder = os.environ.get(var)
            if folder and "://" not in folder and not os.path.isdir(folder):
                # lab.dirs would exit(1) with only a log line
                raise UserError(f"{var} '{folder}' does not exist; this job cannot reach its {APP_NAME} workspace")
        try:
            from lab import dirs
            from lab import lab as sdk
        except ImportError as e:
            raise UserError(f"the {APP_NAME} SDK (transformerlab, module 'lab') is not installed: {e}") from None
        version = _sdk_version()
        if not hasattr(sdk, "get_config") or (version != "unknown" and _version_tuple(version) < _version_tuple(SDK_FLOOR)):
            raise UserError(f"this job was started as a {APP_NAME} task, which needs the SDK transformerlab "
                            f">= {SDK_FLOOR}; this environment has {version}")
        self.sdk = sdk
        self.dirs = dirs
        self._launch_job_data = self._job_data_before_init()
        try:
            with _torn_reads_retried():
                sdk.init()
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{APP_NAME} job {self.job_id} cannot be opened: {e}") from None
        self._restore_lost_job_data()
        self.workspace = run_sdk(dirs.get_workspace_dir())
        self._metrics_supported = "metrics" in inspect.signature(sdk.update_progress).parameters
        self._last_percent = 0
        self._output_dir: str | None = None
        self._warned: set[str] = set()
        self._checkpoints: list[str] = []  # as recorded in the job
        self._stopping = False
        self._stop_acknowledged = False
        # lab.init() sets the status RUNNING, also over a STOPPING the app set before we started
        # (Stop pressed while Python was starting): read the stop flag now, so the job says STOPPED
        # before the app's SIGKILL can end this process with the status still RUNNING.
        if self.should_stop():
            self.acknowledge_stop()

    # ---- job state ---------------------------------------------------------------------------
    @property
    def job(self):
        return self.sdk.job

    # The SDK rewrites the job file in place (truncate, then write) and reads a file caught mid-write
    # as {} ("Corrupt JSON ... treating as empty"); its read-modify-write updates then save only the
    # field they set. lab.init() makes three of them while the app may be writing too (Stop pressed
    # while we start: stop flag, STOPPING), so the job's launch data is read before init and put
    # back if init's writes lost it.
    def _read_job_data(self, job) -> dict:
        for _ in range(30):  # a torn read comes back {}; the writer is done within milliseconds
            try:
                data = run_sdk(job.get_job_data())
            except Exception:  # noqa: BLE001 - as a torn read
                data = None
            if isinstance(data, dict) and data:
                return data
            time.sleep(0.1)
        return {}

    def _job_data_before_init(self) -> dict:
        experiment = os.environ.get("_TFL_EXPERIMENT_ID") or os.environ.get("TFL_EXPERIMENT_ID")
        if not (self.job_id and experiment):
            return {}
        try:
            from lab import Job

            job = run_sdk(Job.get(self.job_id, experiment))
        except Exception:  # noqa: BLE001 - init reports a job that cannot be opened
            return {}
        return self._read_job_data(job)

    def _restore_lost_job_data(self) -> None:
        if not self._launch_job_data:
            return
        now = self._read_job_data(self.job)
        lost = {k: v for k, v in self._launch_job_data.items() if k not in now}
        if lost:
            self._log(f"[dllm] the job record lost {', '.join(sorted(lost))} to a write racing ours at start; "
                      "restored from the launch")
            try:
                run_sdk(self.job.update_job_data_fields(lost))
            except Exception as e:  # noqa: BLE001 - the parameters are still ours (job_config)
                self._warn_once("restore the job record", e)

    def job_config(self) -> tuple[dict, list[str]]:
        """``job_data.parameters`` (what ``lab.get_config()`` returns), as read at launch; read now
        when the launch read had nothing (no experiment id in the environment)."""
        data = self._launch_job_data or self._read_job_data(self.job)
        params = data.get("parameters")
        return job_parameters(params if isinstance(params, dict) else {})

    def _note(self, message: str) -> None:
        """A line in the job's own log (the app's job output), besides our stdout."""
        try:
            self.sdk.log(message)
        except Exception:  # noqa: BLE001 - the log is a courtesy
            pass

    def _warn_once(self, what: str, e: Exception) -> None:
        if what not in self._warned:
            self._warned.add(what)
            self._log(f"[dllm] warning: could not {what} with {APP_NAME}: {type(e).__name__}: {e}")

    def progress(self, percent: float) -> None:
        p = max(0, min(100, int(percent)))
        if p != self._last_percent:
            self._last_percent = p
            self.sdk.update_progress(p)

    def metrics(self, metrics: dict) -> None:
        """Per-log-step metrics into the app's charts (metrics.jsonl); SDKs before 0.1.40 have no charts."""
        if not self._metrics_supported:
            return
        step = metrics.get("step")
        values = {chart_name(k): v for k, v in clean_scalars(metrics).items() if k != "step"}
        if values:
            self.sdk.update_progress(self._last_percent, metrics=values,
                                     step=int(step) if isinstance(step, (int, float)) else None)

    def training_started(self, cfg) -> None:
        self._output_dir = cfg.output_dir
        run_sdk(self.job.set_tensorboard_output_dir(cfg.output_dir))
        self._note(f"Diffusion LLM Trainer: {cfg.training_method} training of {cfg.model_name}; "
                   f"working folder {cfg.output_dir}")

    def should_stop(self) -> bool:
        if self._stopping:
            return True
        stop = _STOP_SIGNALLED.is_set()
        if not stop:
            try:
                state = run_sdk(self.job.get_json_data(uncached=True)) or {}
            except Exception:  # noqa: BLE001 - a job file caught mid-write reads as "no stop"
                return False
            data = state.get("job_data") if isinstance(state.get("job_data"), dict) else {}
            flag = data.get("stop", False)
            if isinstance(flag, str):
                flag = flag.strip().lower() in ("true", "1", "yes", "on")
            stop = bool(flag) or state.get("status") in ("STOPPING", "STOPPED")
        if stop:
            self._stopping = True
        return stop

    def acknowledge_stop(self) -> None:
        """After the launcher has written the STOP file and said so (the app's SIGKILL comes 3 s after
        its signal, so those go first): the job says STOPPED, with the checkpoint it has, from now on."""
        if self._stop_acknowledged:
            return
        self._stop_acknowledged = True
        latest = os.path.basename(self._checkpoints[-1].rstrip("/")) if self._checkpoints else None
        try:
            self.stopped("stop requested; the workers save a checkpoint after the current step"
                         + (f" (latest checkpoint so far: {latest})" if latest else ""))
        except Exception as e:  # noqa: BLE001
            self._warn_once("mark the job stopped", e)

    def complete(self, message: str, score: dict) -> None:
        self._save_tensorboard()
        clean = clean_scalars(score)
        clean.update({chart_name(k): v for k, v in clean.items() if k.startswith("eval_")})  # e.g. sweeps' eval/loss
        self._note(message)
        self.sdk.finish(message, score=clean)

    def fail(self, reason: str) -> None:
        self._note(f"failed: {reason}")
        self.sdk.error(reason)
        run_sdk(self.job.set_error_message(reason))

    def stopped(self, message: str) -> None:
        run_sdk(self.job.update_job_data_fields({
            "completion_status": "stopped",
            "completion_details": message,
            "end_time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }))
        run_sdk(self.job.update_status("STOPPED"))

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, path: str, step: int) -> None:
        """Copy a Trainer checkpoint into the job's checkpoints (the app lists and resumes from them);
        copies of checkpoints the Trainer has rotated away (save_total_limit) go too."""
        if not os.path.isdir(path):
            return  # rotated away (save_total_limit) before we got to it
        try:
            from lab import storage

            name = os.path.basename(path.rstrip("/"))
            dest = self.sdk.save_checkpoint(path, name)
            keep = {e.name for e in os.scandir(os.path.dirname(path.rstrip("/"))) if e.name.startswith("checkpoint-")}
            data = self.sdk.get_job_data() or {}
            listed: list[str] = []
            for c in list(data.get("checkpoints") or []) + [dest]:
                if not isinstance(c, str) or c in listed:
                    continue
                if os.path.basename(c.rstrip("/")) in keep:
                    listed.append(c)
                else:
                    run_sdk(storage.rm_tree(c))
            run_sdk(self.job.update_job_data_fields({"checkpoints": listed, "latest_checkpoint": dest}))
            self._checkpoints = listed
            if self._stopping:  # the stop's own checkpoint: say so now, in case we are killed before the end
                self.stopped(f"stopped with checkpoint {name}")
        except Exception as e:  # noqa: BLE001 - bookkeeping must never fail a training run
            self._warn_once("record a checkpoint", e)

    # ---- the final model -----------------------------------------------------------------------
    def model_exists(self, model_id: str, output_dir: str | None = None) -> bool:
        """Never: the SDK keeps every job's models apart (<job id>_<name>)."""
        return False

    def model_location(self, model_id: str, output_dir: str | None = None) -> str:
        return f"{model_id} (saved with job {self.job_id})"

    def run_dir(self, output_dir: str) -> str:
        return output_dir

    def earlier_run_dirs(self, run_dir: str) -> list[str]:
        return []

    def register_model(self, staging_dir: str, model_id: str, *, architecture: str, base_model: str,
                       meta: dict, config: dict) -> str:
        """Hand the finished model to the job (lab.save_model copies it); the local copy then goes."""
        tag = "fill-mask" if meta.get("training_method") == "bert" else "text-generation"
        dest = self.sdk.save_model(staging_dir, name=model_id, architecture=architecture, parent_model=base_model,
                                   pipeline_tag=tag)  # a tag given: the SDK does not ask the Hub for one
        if isinstance(dest, str) and os.path.isfile(os.path.join(dest, "config.json")):
            shutil.rmtree(staging_dir, ignore_errors=True)
        return dest

    def _save_tensorboard(self) -> None:
        if not self._output_dir:
            return
        for sub, name in (("runs", "tensorboard"), ("samples", "samples")):
            folder = os.path.join(self._output_dir, sub)
            if os.path.isdir(folder):
                try:
                    self.sdk.save_artifact(folder, name=name)
                except Exception as e:  # noqa: BLE001
                    self._warn_once(f"save the {name} events", e)
