"""Everything that knows Transformer Lab: the app (v0.30.x) and its SDK (transformerlab==0.0.83, module `lab`).

No other module imports `lab` or knows the workspace layout. What the app does and expects:

- It runs the plugin with `plugin_harness.py --plugin_dir ... --input_file <workspace>/temp/plugin_input_<job>.json
  --experiment_name <exp>`, stdout/stderr going to the job's live log, and `_TFL_ORG_ID` in the
  environment for a team workspace. It does not set `_TFL_JOB_ID`: we set it from the input
  file's `config["job_id"]` before `lab.init()`, which then attaches to that job (status RUNNING).
- SDK 0.0.83 does not read `_TFL_ORG_ID` itself; `lab.dirs.set_organization_id()` selects the
  team workspace (`<TFL_HOME_DIR>/orgs/<org>/workspace`), else `<TFL_HOME_DIR>/workspace`.
- Progress: `lab.update_progress(percent)`. Success: `lab.finish(message, score=...)` (COMPLETE,
  completion_status success, progress 100). Failure: `lab.error(reason)` leaves the top-level
  status COMPLETE (only job_data says failed) and the app marks a job COMPLETE when the process
  ends, so we also set the status to FAILED. Stop: the app's Stop button sets `stop: true` in the
  job data; we poll it, and end with status STOPPED.
- Foundation tab: models are the folders `<workspace>/models/<id>/` holding an index.json
  (`model_id`, `name`, `local_model`, `json_data.architecture`, `json_data.source`) next to the
  weights. SDK 0.0.83's `lab.save_model()` crashes, so we write the folder ourselves.
- Uploaded datasets are `<workspace>/datasets/<name>/` with an index.json whose `location` is
  `local` (the folder's files are the data) or `huggingface` (the name is a Hub id); local models
  are `<workspace>/models/<name>/` with an index.json beside the weights.
- Checkpoints: the SDK's resume lookup (`lab.get_checkpoint_to_resume()`) finds a checkpoint by
  name in the parent job's `<workspace>/jobs/<id>/checkpoints/`; we link our Trainer checkpoints
  there (symlinks, no copies) and record them in the job data.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from typing import Any

from ..errors import ConfigError, UserError
from .tlab_common import WorkspaceHost, clean_scalars as _clean_scalars, run_sdk as _run

APP_NAME = "Transformer Lab"
_SECRET_KEY_RE = re.compile(r"(token|key|secret|password)", re.I)


def _prepare_sdk_environment(job_id: str) -> None:
    home = os.environ.get("TFL_HOME_DIR")
    if home and not os.path.isdir(home):
        # lab.dirs would call exit(1) at import time with only a log line
        raise UserError(f"TFL_HOME_DIR '{home}' does not exist; is Transformer Lab installed there?")
    os.environ["_TFL_JOB_ID"] = str(job_id)


def _settle_sdk_index_rebuild() -> None:
    """(reliability) SDK 0.0.83 rebuilds the experiment's job index in a daemon thread after every
    status update; when the job's process exits while that thread is in a rebuild, the SDK logs
    "cannot schedule new futures after interpreter shutdown" WITH A TRACEBACK into the job's log.
    After the job's final status: run the pending rebuilds here (they read the final status) and
    keep the background thread's now redundant shutdown error out of the log."""
    import logging

    try:
        from lab.experiment import Experiment
    except ImportError:  # pragma: no cover - other SDK layouts
        return
    lock = getattr(Experiment, "_cache_rebuild_lock", None)
    pending_set = getattr(Experiment, "_cache_rebuild_pending", None)
    if lock is None or pending_set is None:
        return
    with lock:
        pending = set(pending_set)
        pending_set.clear()
    for experiment_id, workspace_dir in pending:
        try:
            asyncio.run(Experiment(experiment_id).rebuild_jobs_index(workspace_dir=workspace_dir))
        except Exception:  # noqa: BLE001 - the app rebuilds the index itself too
            pass
    logging.getLogger(Experiment.__module__).setLevel(logging.CRITICAL)


class TransformerLabReporter(WorkspaceHost):
    """Reports one job to Transformer Lab and resolves workspace names. See the module docstring."""

    name = APP_NAME

    def __init__(self, job_id: Any, experiment_name: str | None, *, log=print):
        if job_id in (None, ""):
            raise UserError("the Transformer Lab input file has no job_id in its config")
        self.job_id = str(job_id)
        self.experiment_name = experiment_name or None
        self._log = log
        _prepare_sdk_environment(self.job_id)
        try:
            from lab import dirs
            from lab import lab as sdk
        except ImportError as e:
            raise UserError(f"the Transformer Lab SDK (transformerlab, module 'lab') is not installed: {e}") from None
        self.sdk = sdk
        self.dirs = dirs
        org = os.environ.get("_TFL_ORG_ID", "").strip()
        if org:
            dirs.set_organization_id(org)
        try:
            sdk.init(experiment_id=self.experiment_name)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"Transformer Lab job {self.job_id} cannot be opened: {e}") from None
        self.workspace = _run(dirs.get_workspace_dir())
        self._last_percent: int | None = None
        self._stop_seen = False
        self._start_time = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())

    # ---- job state ---------------------------------------------------------------------------
    @property
    def job(self):
        return self.sdk.job

    def _set_field(self, key: str, value) -> None:
        self.sdk.set_job_data_field(key, value)

    def _set_status(self, status: str) -> None:
        _run(self.job.update_status(status))

    def progress(self, percent: float) -> None:
        p = max(0, min(100, int(percent)))
        if p != self._last_percent:
            self._last_percent = p
            self.sdk.update_progress(p)

    def metrics(self, metrics: dict) -> None:
        """Per-log-step metrics: TensorBoard (and W&B) carry them; the app needs nothing here."""

    def training_started(self, cfg) -> None:
        _run(self.job.set_tensorboard_output_dir(cfg.output_dir))

    def should_stop(self) -> bool:
        if self._stop_seen:
            return True
        try:
            data = self.sdk.get_job_data() or {}
        except Exception:  # noqa: BLE001 - a job file caught mid-write reads as "no stop"
            return False
        stop = data.get("stop", False)
        if isinstance(stop, str):
            stop = stop.strip().lower() in ("true", "1", "yes", "on")
        self._stop_seen = bool(stop)
        return self._stop_seen

    def complete(self, message: str, score: dict) -> None:
        self.sdk.finish(message, score=_clean_scalars(score))
        _settle_sdk_index_rebuild()

    def fail(self, reason: str) -> None:
        self.sdk.error(reason)
        _run(self.job.set_error_message(reason))
        self._set_status("FAILED")
        _settle_sdk_index_rebuild()

    def stopped(self, message: str) -> None:
        self._set_field("completion_status", "stopped")
        self._set_field("completion_details", message)
        self._set_field("end_time", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
        self._set_status("STOPPED")
        _settle_sdk_index_rebuild()

    # ---- checkpoints (workspace names, secrets, resume: tlab_common.WorkspaceHost) -----------
    def checkpoint(self, path: str, step: int) -> None:
        """Link a Trainer checkpoint into the job's checkpoints folder (the app lists and resumes from there)."""
        try:
            ckpt_dir = _run(self.job.get_checkpoints_dir())
            link = os.path.join(ckpt_dir, os.path.basename(path.rstrip("/")))
            if os.path.islink(link) or os.path.exists(link):
                if os.path.islink(link):
                    os.remove(link)
                else:
                    return
            os.symlink(os.path.abspath(path), link, target_is_directory=True)
            for entry in os.scandir(ckpt_dir):  # checkpoints the Trainer rotated away (save_total_limit)
                if entry.is_symlink() and not os.path.exists(entry.path):
                    os.remove(entry.path)
            data = self.sdk.get_job_data() or {}
            listed = [c for c in data.get("checkpoints", []) if isinstance(c, str) and os.path.exists(c)]
            if link not in listed:
                listed.append(link)
            self._set_field("checkpoints", listed)
            self._set_field("latest_checkpoint", link)
        except Exception as e:  # noqa: BLE001 - bookkeeping must never fail a training run
            self._log(f"[dllm] warning: could not record checkpoint {path} with {APP_NAME}: {e}")

    # ---- the final model ---------------------------------------------------------------------
    def model_location(self, model_id: str, output_dir: str | None = None) -> str:
        if not isinstance(self.workspace, str) or "://" in self.workspace:
            raise ConfigError(f"the {APP_NAME} workspace '{self.workspace}' is remote storage; this trainer needs a local workspace")
        return os.path.join(self.workspace, "models", model_id)

    def model_exists(self, model_id: str, output_dir: str | None = None) -> bool:
        return os.path.lexists(self.model_location(model_id))

    def run_dir(self, output_dir: str) -> str:
        """This job's own folder. The app gives every job of a template the same output_dir
        (`<experiment>/tensorboards/<template_name>`); queuing the template again must neither fail
        on nor overwrite the earlier run's checkpoints, so each job works in `job_<id>/` below it
        (the app's TensorBoard for the template shows every job as a run)."""
        return os.path.join(output_dir, f"job_{self.job_id}")

    def earlier_run_dirs(self, run_dir: str) -> list[str]:
        """The other jobs' folders of the same template, newest job first ('latest' looks there too)."""
        parent = os.path.dirname(run_dir.rstrip(os.sep))
        try:
            names = [e.name for e in os.scandir(parent) if e.is_dir() and re.fullmatch(r"job_\d+", e.name)]
        except OSError:
            return []
        own = os.path.basename(run_dir.rstrip(os.sep))
        return [os.path.join(parent, n) for n in sorted(names, key=lambda n: int(n[4:]), reverse=True) if n != own]

    def register_model(self, staging_dir: str, model_id: str, *, architecture: str, base_model: str,
                       meta: dict, config: dict) -> str:
        """Move the finished model into <workspace>/models/<model_id>/ with the index.json the Foundation tab reads."""
        final = self.model_location(model_id)
        if os.path.lexists(final):  # the app picked a free name (app.unique_model_name); never overwrite
            raise ConfigError(f"a model named '{model_id}' already exists in the {APP_NAME} workspace ({final})")
        os.makedirs(os.path.dirname(final), exist_ok=True)
        index = {
            "model_id": model_id,
            "name": model_id,
            "local_model": True,
            "model_filename": "",
            "json_data": {
                "uniqueID": model_id,
                "name": model_id,
                "model_filename": "",
                "description": f"Masked diffusion LM fine-tuned from {base_model} with the Diffusion LLM Trainer "
                               f"({meta.get('training_method')}, job {self.job_id}).",
                "source": "transformerlab",
                "architecture": architecture,
                "huggingface_repo": "",
                "parent_model": base_model,
                "local_path": final,
                "trainer": "dllm_trainer",
                "job_id": self.job_id,
            },
        }
        provenance = {
            "model_name": model_id,
            "model_architecture": architecture,
            "job_id": self.job_id,
            "input_model": base_model,
            "dataset": meta.get("dataset"),
            "adaptor_name": model_id,
            "parameters": {k: v for k, v in config.items() if not _SECRET_KEY_RE.search(k)},
            "start_time": self._start_time,
            "end_time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "md5_checksums": None,
        }
        with open(os.path.join(staging_dir, "index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
        with open(os.path.join(staging_dir, "_tlab_provenance.json"), "w", encoding="utf-8") as fh:
            json.dump(provenance, fh, indent=2, default=str)
        try:
            os.rename(staging_dir, final)  # same filesystem: atomic, the app never lists half a model
        except OSError:
            # another filesystem: copy, index.json last (a folder without it is not listed as a model)
            shutil.copytree(staging_dir, final, ignore=shutil.ignore_patterns("index.json"))
            shutil.copy2(os.path.join(staging_dir, "index.json"), os.path.join(final, "index.json"))
            shutil.rmtree(staging_dir, ignore_errors=True)
        try:
            self._set_field("model_id", model_id)
            self._set_field("model_path", final)
        except Exception:  # noqa: BLE001
            pass
        return final
