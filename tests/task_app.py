"""Emulates the current Transformer Lab (v0.34+, SDK transformerlab==0.1.46) running our task.yaml
on its Local provider, for the task lifecycle tests.

What is real: the SDK (its own venv, separate from the test venv), the job files it keeps in a
temporary workspace, our task.yaml's `setup` and `run` commands, `tfl-remote-trap`, and the app's
way of stopping a job. What is emulated, after the app's source (compute_providers/local.py,
services/compute_provider/launch_template.py, services/job_service.py, process_registry.py,
remote_job_status_service.py):

- the app venv: the SDK and the app's pins (transformers 4.57.1, peft 0.14.0, accelerate 1.3.0,
  datasets 3.6.0, wandb 0.23.1, tensorboard 2.18.0, psutil). The app's torch is 2.9.1; the only
  torch wheel this machine has offline is our pinned CPU build, so that one stands in for it (setup
  then keeps it, as it keeps the app's). Made with `python -m venv` (the app: `uv venv`, with uv on
  PATH; setup.sh then uses uv instead of pip). Built once into a cache folder outside the
  repository (~/.cache/dllm-trainer-tests, or $DLLM_TEST_CACHE), like pip's own cache, keyed by
  these pins and by our requirement files and setup.sh, and reused by later sessions and clones:
  the first job after any change to those runs setup from the app's own state; later ones find our
  packages already there.
- a launch: the job is created (status WAITING, parameters in job_data as the launch form leaves
  them), the repository's files are copied to the job's working folder the way the GitHub import
  does (`cp -r clone/* .`: top-level dot files are not copied), `setup` runs under
  `set -e -o pipefail` and `run` as `tfl-remote-trap -- '<run>'` in a new session, both with
  HOME = cwd = that folder, the venv first on PATH, and the app's variables.
- Stop: `job_data.stop = true`, status STOPPING, then SIGTERM to every process of the tree at once
  and SIGKILL to those alive 3 s later.
- the status worker (`settle`): a job left RUNNING/STOPPING is finished from tfl-remote-trap's
  live_status (finished: COMPLETE, or STOPPED when stopping; crashed: FAILED; a process gone
  without either: STOPPED when stopping, else COMPLETE).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_PINS = ["transformerlab==0.1.46", "transformers==4.57.1", "peft==0.14.0", "accelerate==1.3.0",
            "datasets==3.6.0", "wandb==0.23.1", "tensorboard==2.18.0", "psutil==6.1.1"]
STOP_GRACE = 3.0  # process_registry._terminate_process_tree: SIGTERM, wait 3 s, SIGKILL


def _our_torch_pin() -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.strip()
    raise RuntimeError("requirements.txt has no torch pin")


def _cache_key() -> str:
    h = hashlib.sha256()
    h.update("\n".join(APP_PINS + [_our_torch_pin(), sys.version.split()[0]]).encode())
    for name in ("requirements.txt", "pyproject.toml", "setup.sh"):
        h.update((REPO / name).read_bytes())
    return h.hexdigest()[:16]


def app_venv(log=print) -> Path:
    """The emulated app venv (built on first use; a lock keeps concurrent sessions apart)."""
    base = os.environ.get("DLLM_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dllm-trainer-tests")
    root = Path(base) / "tlab-task-app"
    root.mkdir(parents=True, exist_ok=True)
    venv = root / _cache_key()
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        log(f"[task_app] building the emulated Transformer Lab venv in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               *APP_PINS, _our_torch_pin()], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the emulated app venv failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
        (venv / ".complete").write_text(json.dumps({"pins": APP_PINS, "torch": torch}))
    return venv


def app_torch(venv: Path) -> str:
    """The torch version of the app venv as built, before any setup ran in it."""
    return json.loads((venv / ".complete").read_text())["torch"]


def copy_repository(dest: Path) -> None:
    """The repository's files as a GitHub import lands them (`cp -r clone/* .`): what git would push
    (tracked and not ignored), top-level dot files left out."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    for rel in sorted(set(p for p in out.split("\0") if p)):
        if rel.startswith("."):
            continue
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@dataclass
class TaskJob:
    job_id: str
    experiment: str
    workdir: Path  # HOME and cwd of setup and run: the task's files
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    setup_log: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


class TaskApp:
    """One emulated app: its venv, a temporary TFL_HOME_DIR with a team workspace, the task.yaml."""

    def __init__(self, venv: Path, tmp: Path, team: str = "team-a"):
        import yaml

        from lifecycle_tl import clean_env

        self.venv = venv
        self.tmp = tmp
        self.home = tmp / "tlhome"
        self.workspace = self.home / "orgs" / team / "workspace"
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.task = yaml.safe_load((REPO / "task.yaml").read_text())
        self.base_env = clean_env(tmp, TFL_HOME_DIR=str(self.home), TFL_WORKSPACE_DIR=str(self.workspace),
                                  TFL_STORAGE_PROVIDER="localfs", _TFL_USER_ID="user-1")
        self.base_env.pop("VIRTUAL_ENV", None)

    # ---- SDK calls, in the app venv --------------------------------------------------------------
    def sdk(self, action: str, **payload) -> dict:
        proc = subprocess.run([str(self.venv / "bin" / "python"), __file__, action, json.dumps(payload)],
                              env=self.base_env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"SDK helper '{action}' failed:\n{proc.stdout}\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # ---- workspace content ---------------------------------------------------------------------
    def add_dataset(self, name: str, rows: list[dict]) -> Path:
        d = self.workspace / "datasets" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "index.json").write_text(json.dumps({"dataset_id": name, "location": "local", "json_data": {}}))
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    def add_model(self, name: str, source: Path) -> Path:
        d = self.workspace / "models" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file():
                (d / f.name).symlink_to(f)
        (d / "index.json").write_text(json.dumps({"model_id": name, "name": name, "json_data": {"source": "local"}}))
        return d

    # ---- a launch on the Local provider ----------------------------------------------------------
    def env_for(self, job: TaskJob) -> dict:
        env = dict(self.base_env)
        env.update({k: str(v) for k, v in (self.task.get("envs") or {}).items()})
        env.update(
            _TFL_JOB_ID=job.job_id, _TFL_EXPERIMENT_ID=job.experiment, TFL_EXPERIMENT_ID=job.experiment,
            VIRTUAL_ENV=str(self.venv), HOME=str(job.workdir),
            PATH=f"{self.venv / 'bin'}{os.pathsep}{self.base_env.get('PATH', '')}",
        )
        return env

    def launch(self, parameters: dict, *, experiment: str = "exp1", job_data: dict | None = None) -> TaskJob:
        """Create the job, copy the files, run setup (raises on failure), start the run command."""
        data = {"task_name": self.task["name"], "run": self.task["run"], "setup": self.task.get("setup"),
                "parameters": parameters, "provider_id": "local-provider", "provider_type": "local",
                "provider_name": "Local", "cluster_name": f"{self.task['name']}-1", **(job_data or {})}
        info = self.sdk("create_job", experiment=experiment, job_data=data)
        job = TaskJob(info["job_id"], experiment, self.tmp / "local_provider_runs" / info["job_id"] / "workspace")
        job.workdir.mkdir(parents=True)
        job.log_path = job.workdir.parent / "output.log"
        copy_repository(job.workdir)
        env = self.env_for(job)
        setup = subprocess.run(["/bin/bash", "-c", f"set -e -o pipefail; {self.task['setup']}"], cwd=job.workdir,
                               env=env, capture_output=True, text=True, timeout=600)
        if setup.returncode != 0:
            raise AssertionError(f"setup failed ({setup.returncode}):\n{setup.stdout[-4000:]}\n{setup.stderr[-4000:]}")
        job.setup_log = setup.stdout + setup.stderr
        with open(job.log_path, "w") as out:
            job.proc = subprocess.Popen(["/bin/bash", "-c", f"tfl-remote-trap -- {shlex.quote(self.task['run'])}"],
                                        cwd=job.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return job

    def wait(self, job: TaskJob, timeout: float = 600) -> int:
        return job.proc.wait(timeout=timeout)

    def stop(self, job: TaskJob) -> list[str]:
        """The Stop button: stop flag + STOPPING, then the process tree gets SIGTERM, survivors SIGKILL
        after STOP_GRACE. Returns the command lines of the processes that had to be killed."""
        import psutil

        self.sdk("job_stop", experiment=job.experiment, job_id=job.job_id)
        try:
            parent = psutil.Process(job.proc.pid)
            procs = [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE)
        killed = []
        for p in alive:
            try:
                killed.append(" ".join(p.cmdline())[:200])
                p.kill()
            except psutil.Error:
                pass
        job.proc.wait(timeout=30)
        return killed

    def settle(self, job: TaskJob) -> str:
        """The app's status worker, once the process is gone: the job's final status."""
        return self.sdk("settle", experiment=job.experiment, job_id=job.job_id)["status"]

    # ---- reading state as the app's UI does --------------------------------------------------------
    def job_dir(self, job: TaskJob) -> Path:
        return self.workspace / "experiments" / job.experiment / "jobs" / job.job_id

    def job_json(self, job: TaskJob) -> dict:
        path = self.job_dir(job) / "index.json"
        for _ in range(50):  # the job rewrites the file; retry a read caught mid-write
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                time.sleep(0.1)
        raise AssertionError(f"cannot read {path}")

    def metrics_rows(self, job: TaskJob) -> list[dict]:
        path = self.job_dir(job) / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---- the subprocess side (app venv) ----------------------------------------------------------------


def _sdk_main(action: str, payload: dict) -> dict:
    import asyncio

    from lab import Experiment, Job

    async def run():
        if action == "create_job":
            exp = await Experiment.create_or_get(payload["experiment"], create_new=True)
            job = await exp.create_job()
            await job.update_job_data_fields(payload["job_data"])
            await job.update_status("WAITING")  # the Local provider's launch queue
            return {"job_id": str(job.id)}
        job = await Job.get(payload["job_id"], payload["experiment"])
        if action == "job_stop":  # job_service.job_stop
            await job.update_job_data_field("stop", True)
            await job.update_status("STOPPING")
            return {"ok": True}
        if action == "settle":  # remote_job_status_service, for a process that is gone
            status = await job.get_status()
            if status in ("LAUNCHING", "RUNNING", "STOPPING"):
                live = (await job.get_job_data()).get("live_status")
                if live == "Remote command crashed":
                    status = "FAILED"
                else:
                    status = "STOPPED" if status == "STOPPING" else "COMPLETE"
                await job.update_status(status)
            return {"status": status}
        raise SystemExit(f"unknown action {action}")

    return asyncio.run(run())


if __name__ == "__main__":
    print(json.dumps(_sdk_main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})))
