"""One training job from start to finish, standalone or inside Transformer Lab.

    main(argv)            tells the host from how it was started: the v0.30.x plugin harness's
                          arguments (--input_file ... --experiment_name ...), a standalone
                          `--config FILE.json [--set key=value ...]`, or neither inside a current
                          Transformer Lab task (its job in the environment, hosts/tlab_task.py);
                          builds the reporter and the config, and calls run_job. Returns the exit code.
    run_job(cfg, rep)     resolves the model/dataset names, picks a model name that is free (a taken
                          adaptor_name becomes name-2, ...; logged), runs the preflight checks
                          (preflight.py: the dataset first), writes the validated config to
                          <output_dir>/dllm_config.json, launches the
                          accelerate workers (launcher.py), streams their output, polls for a stop
                          request, and on success fuses the LoRA adaptor (or takes the full
                          fine-tune), writes the model card + metadata, and registers the model.

Reporters (hosts/): `standalone.StandaloneReporter` (prints; the final model goes to
<output_dir>/models/<name>/), `tlab_plugin.TransformerLabReporter` (a Transformer Lab v0.30.x
plugin job: progress, status, Foundation tab) and `tlab_task.TaskReporter` (a task of the current
Transformer Lab: progress, metrics charts, checkpoints, the model saved with the job).

Errors: a UserError anywhere (bad config value, a dataset the workers cannot read, ...) ends the
job with one clear line `[dllm-error] ...`, a non-zero exit code and, in Transformer Lab, status
FAILED with that reason. Anything unexpected prints one line and writes the traceback to
<output_dir>/debug.log.
"""
from __future__ import annotations

import argparse
import json
import math
import netrc
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable
from urllib.parse import urlparse

from .config import APP_KEYS, TrainConfig, load_config_file
from .errors import ERROR_PREFIX, ConfigError, DataError, UserError, report_unexpected_error, report_user_error
from .hosts.standalone import StandaloneReporter

CONFIG_FILE_NAME = "dllm_config.json"
METRICS_FILE_NAME = "metrics.json"
TRAIN_PROGRESS_SHARE = 95  # percent of the progress bar for the training steps; the rest is fusing/registering


# ---------------------------------------------------------------------------------------------
# Reporters
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _local_path(name: str) -> str | None:
    p = os.path.expanduser(name.strip())
    return os.path.abspath(p) if name.strip() and os.path.exists(p) else None


def resolve_sources(cfg: TrainConfig, reporter) -> TrainConfig:
    """Workspace entries first, then local paths, then Hub ids; every local path made absolute
    (the workers run in output_dir)."""
    model = reporter.resolve_model(cfg.model_name) or _local_path(cfg.model_name) or cfg.model_name.strip()
    dataset = reporter.resolve_dataset(cfg.dataset_name) or _local_path(cfg.dataset_name) or cfg.dataset_name.strip()
    changes: dict[str, Any] = {
        "model_name": model,
        "dataset_name": dataset,
        "output_dir": reporter.run_dir(os.path.abspath(os.path.expanduser(cfg.output_dir))),
    }
    if cfg.adaptor_output_dir.strip():
        changes["adaptor_output_dir"] = os.path.abspath(os.path.expanduser(cfg.adaptor_output_dir))
    if cfg.accelerate_config_file.strip():
        changes["accelerate_config_file"] = os.path.abspath(os.path.expanduser(cfg.accelerate_config_file))
    spec = cfg.resume_from_checkpoint.strip()
    if spec and spec != "latest":
        changes["resume_from_checkpoint"] = os.path.abspath(os.path.expanduser(spec))
    return cfg.replace(**changes)


def _nonempty_dir(path: str) -> bool:
    return os.path.isdir(path) and any(True for _ in os.scandir(path))


def _finite(metrics: dict) -> dict:
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (not isinstance(v, float) or math.isfinite(v))}


def _architecture(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            archs = json.load(fh).get("architectures") or []
        return archs[0] if archs else "Unknown"
    except (OSError, json.JSONDecodeError, AttributeError):
        return "Unknown"


def _fuse_dtype(model_path: str):
    """Fuse in the base checkpoint's stored half precision when it has one, else float32."""
    import torch

    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
            conf = json.load(fh)
        stored = str(conf.get("dtype") or conf.get("torch_dtype") or "")
    except (OSError, json.JSONDecodeError):
        stored = ""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored, torch.float32)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url if "://" in url else f"https://{url}")
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _netrc_key(host: str) -> str | None:
    try:
        auth = netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth and auth[2] else None


def wandb_environment(cfg: TrainConfig, secret: Callable[[str], str | None], *,
                      reachable: Callable[[str], bool] = _reachable, run_name: str | None = None,
                      environ: dict[str, str] | None = None) -> tuple[dict[str, str], str | None]:
    """(variables for the workers, one warning or None). Never fails: without a key or without
    network, W&B logs offline into <output_dir>/wandb (sync later with `wandb sync`). The key is
    only ever passed through the workers' environment, never printed or written."""
    if not cfg.log_to_wandb:
        return {}, None
    environ = os.environ if environ is None else environ
    env = {"WANDB_DIR": cfg.output_dir, "WANDB_PROJECT": environ.get("WANDB_PROJECT") or "dllm_trainer"}
    if run_name and not environ.get("WANDB_NAME"):
        env["WANDB_NAME"] = run_name
    mode = (environ.get("WANDB_MODE") or "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        return env, None
    base_url = environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    key_from_secret = None
    key = environ.get("WANDB_API_KEY") or None
    if not key:
        key = key_from_secret = secret("WANDB_API_KEY") or None
    if not key:
        key = _netrc_key(urlparse(base_url).hostname or "api.wandb.ai")
    offline_dir = os.path.join(cfg.output_dir, "wandb")
    if not key:
        env["WANDB_MODE"] = "offline"
        return env, (f"[dllm] warning: log_to_wandb is on but no W&B API key was found (WANDB_API_KEY, a "
                     f"WANDB_API_KEY secret, or `wandb login`); logging offline to {offline_dir} "
                     "(upload later with `wandb sync`)")
    if not reachable(base_url):
        env["WANDB_MODE"] = "offline"  # offline runs need no key: it is not passed on
        return env, (f"[dllm] warning: W&B ({base_url}) is not reachable; logging offline to {offline_dir} "
                     "(upload later with `wandb sync`)")
    if key_from_secret:
        env["WANDB_API_KEY"] = key_from_secret  # the workers' environment only; never printed or written
    return env, None


def _write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def run_job(cfg: TrainConfig, reporter, *, gpu_count: int | None = None, poll_interval: float = 1.0,
            log: Callable[[str], Any] = print) -> int:
    """Run one job; returns the exit code (0 also for a requested stop). Never raises for job
    failures: they are reported (reporter.fail) and printed as one line."""
    debug_dir = os.path.abspath(os.path.expanduser(cfg.output_dir)) if cfg.output_dir else None
    try:
        return _run_job(cfg, reporter, gpu_count=gpu_count, poll_interval=poll_interval, log=log)
    except UserError as e:
        _quietly(reporter.fail, str(e))
        return report_user_error(e)
    except KeyboardInterrupt:
        where = f"; what was saved stays in {cfg.output_dir}" if cfg.output_dir else ""
        _quietly(reporter.stopped, f"interrupted before the end of training{where}")
        print(f"[dllm] interrupted{where}", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - one line here, the traceback in debug.log
        code = report_unexpected_error(e, debug_dir)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = f" (traceback in {os.path.join(debug_dir, 'debug.log')})" if debug_dir else ""
        _quietly(reporter.fail, f"unexpected {type(e).__name__}: {first}{where}")
        return code


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reporting a failure must not hide the failure
        print(f"[dllm] warning: could not report to {getattr(fn, '__self__', fn).__class__.__name__}: {e}",
              file=sys.stderr, flush=True)


def _run_job(cfg: TrainConfig, reporter, *, gpu_count, poll_interval, log) -> int:
    from .training import export
    from .training.launcher import WorkerFailed, build_launch, run_workers, worker_env
    from .training.train import adaptor_dir_for

    started = time.time()
    user_cfg = cfg
    cfg = resolve_sources(cfg, reporter)
    main_machine = cfg.machine_rank == 0  # only the rank-0 machine saves and registers the model
    if main_machine:
        cfg = unique_model_name(cfg, reporter, log)
    model_id = cfg.adaptor_name
    cfg = _resume_request(cfg, reporter, log)
    # machines sharing one output_dir (a shared filesystem) must not overwrite each other's config
    config_path = os.path.join(cfg.output_dir, CONFIG_FILE_NAME if main_machine
                               else CONFIG_FILE_NAME.replace(".json", f".machine{cfg.machine_rank}.json"))
    plan = build_launch(cfg, config_path, gpu_count=gpu_count)  # hardware errors before anything starts
    try:
        model_config = _preflight(cfg, log)  # reliability: bad inputs fail here, before any worker starts (preflight.py)
    except DataError as e:
        hint = reporter.missing_dataset_hint(user_cfg.dataset_name) if cfg.dataset_name == user_cfg.dataset_name.strip() else None
        if hint and ("not found" in str(e) or "Hugging Face Hub" in str(e)):
            raise DataError(f"{hint}, and not a local path; {e}") from None
        raise
    if model_config is not None and cfg.max_length == 0:
        from .training.loading import max_length_note, resolve_max_length

        resolved = resolve_max_length(cfg, model_config)
        log(max_length_note(cfg, resolved, model_config))
        cfg = cfg.replace(max_length=resolved)

    _refuse_over_another_run(cfg)  # the last check: another run's checkpoints are never overwritten

    if reporter.should_stop():  # stopped while it was queued
        reporter.stopped("stopped before training started")
        return 0
    os.makedirs(cfg.output_dir, exist_ok=True)
    _write_json_atomic(config_path, cfg.to_dict())
    from .training.memory_plan import check_job

    check_job(cfg, plan, config_path, log=log)  # GPU jobs: peak memory table; refuses what cannot fit
    wandb_env, warning = wandb_environment(cfg, reporter.secret, run_name=f"{model_id}")
    if warning:
        log(warning)
    log(f"[dllm] {cfg.training_method} training of {cfg.model_name} on {cfg.dataset_name}: {plan.description}; "
        f"output in {cfg.output_dir}")
    reporter.training_started(cfg)
    reporter.progress(0)

    def on_progress(step: int, max_steps: int) -> None:
        reporter.progress(TRAIN_PROGRESS_SHARE * step / max(1, max_steps))

    res = run_workers(
        plan,
        output_dir=cfg.output_dir,
        env=worker_env(plan.env, {**wandb_env, **_host_worker_env(reporter)}),
        on_progress=on_progress,
        on_metrics=reporter.metrics,
        on_checkpoint=reporter.checkpoint,
        should_stop=reporter.should_stop,
        on_stop_request=getattr(reporter, "acknowledge_stop", None),
        poll_interval=poll_interval,
    )
    if res.interrupted:
        raise KeyboardInterrupt
    result = res.result or {}
    if res.stop_requested and (not res.ok or result.get("stopped") or not result):
        return _stopped(reporter, res, log)
    if not res.ok:
        raise WorkerFailed(res.failure_reason())
    if not main_machine:
        reporter.complete(f"machine rank {cfg.machine_rank} finished {res.step} steps; the rank-0 machine saves the model",
                          _finite(res.last_metrics))
        return 0
    if not result:
        raise WorkerFailed("the training workers exited without reporting a result; see the log above")
    if result.get("stopped"):  # a STOP file written by hand (standalone)
        return _stopped(reporter, res, log)

    metrics = _finite(result.get("metrics") or {})
    metrics_path = os.path.join(cfg.output_dir, METRICS_FILE_NAME)
    if not os.path.isfile(metrics_path):
        _write_json_atomic(metrics_path, metrics)

    if cfg.lora:
        adaptor_dir = result.get("adaptor_dir") or adaptor_dir_for(cfg)
        staging = os.path.join(cfg.output_dir, "fused_model")
        log("[dllm] fusing the LoRA adaptor into the base model")
        from .families import get_family

        export.fuse_adaptor(cfg.model_name, adaptor_dir, staging, family_name=cfg.training_method,
                            dtype=_fuse_dtype(cfg.model_name), trust_remote_code=cfg.trust_remote_code, log=log,
                            family=get_family(cfg.training_method).configured(cfg))
    else:
        adaptor_dir = None
        staging = result.get("final_model_dir") or os.path.join(cfg.output_dir, "final_model")
    reporter.progress(TRAIN_PROGRESS_SHARE + 2)
    meta = export.training_metadata(user_cfg, metrics, base_model=user_cfg.model_name, adaptor_dir=adaptor_dir,
                                    base_hub_id=export.hub_id(user_cfg.model_name, cfg.model_name),
                                    license_id=export.base_license(export.base_model_dir(cfg.model_name)))
    meta["model_name"] = model_id
    meta["max_length"] = cfg.max_length or user_cfg.max_length  # what max_length 0 became, when known here
    free = _free_name(model_id, lambda name: reporter.model_exists(name, cfg.output_dir))
    if free != model_id:  # taken while this run trained (another job): never overwrite it
        log(f"[dllm] a model named '{model_id}' appeared while this run trained; this run's model is '{free}'")
        model_id = meta["model_name"] = free
    meta["train_seconds"] = round(time.time() - started, 1)
    export.write_model_card(staging, meta, name=model_id)
    final = reporter.register_model(staging, model_id, architecture=_architecture(staging),
                                    base_model=user_cfg.model_name, meta=meta, config=user_cfg.to_dict())
    log(f"[dllm] final model '{model_id}': {final}")
    steps = metrics.get("global_step", res.step)
    loss = metrics.get("loss")
    summary = f"trained {steps} steps" + (f", final loss {loss:.4g}" if isinstance(loss, float) else "")
    reporter.complete(f"{summary}; model '{model_id}' saved to {final}", metrics)
    return 0


def _host_worker_env(reporter) -> dict[str, str]:
    """A host that stops jobs by signalling every process (not through us) gets workers that save
    a checkpoint on that signal (callbacks.py)."""
    from .training.events import STOP_ON_SIGTERM_ENV

    return {STOP_ON_SIGTERM_ENV: "1"} if getattr(reporter, "stops_with_signal", False) else {}


def _free_name(base: str, taken: Callable[[str], bool]) -> str:
    """base, else base-2, base-3, ... (kept within adaptor_name's 100 characters): the first not taken."""
    name, n = base, 1
    while taken(name):
        n += 1
        suffix = f"-{n}"
        name = base[: 100 - len(suffix)] + suffix
    return name


def unique_model_name(cfg: TrainConfig, reporter, log) -> TrainConfig:
    """Re-queuing the same template (the app's normal use) or re-running a config must never fail
    on, nor overwrite, the model or LoRA adaptor of an earlier run: when adaptor_name is taken (a
    model of that name, or a non-empty adaptor folder), the run takes the next free name-2, name-3,
    ... for both, and says so."""
    from .training.train import adaptor_dir_for

    def adaptor_dir(name: str) -> str:
        if not cfg.adaptor_output_dir:
            return adaptor_dir_for(cfg.replace(adaptor_name=name))
        if name == cfg.adaptor_name:
            return cfg.adaptor_output_dir
        parent, leaf = os.path.split(cfg.adaptor_output_dir.rstrip(os.sep))
        # the app's adaptor folder is <workspace>/adaptors/<model>/<adaptor_name>: it follows the name
        leaf = name if leaf == cfg.adaptor_name else f"{leaf}-{name.rsplit('-', 1)[1]}"
        return os.path.join(parent, leaf)

    def taken(name: str) -> bool:
        return reporter.model_exists(name, cfg.output_dir) or (cfg.lora and _nonempty_dir(adaptor_dir(name)))

    name = _free_name(cfg.adaptor_name, taken)
    if name == cfg.adaptor_name:
        return cfg
    log(f"[dllm] a model or adaptor named '{cfg.adaptor_name}' already exists "
        f"({reporter.model_location(cfg.adaptor_name, cfg.output_dir)}); this run's model is named '{name}'")
    return cfg.replace(adaptor_name=name, adaptor_output_dir=adaptor_dir(name) if cfg.adaptor_output_dir else "")


def _resume_request(cfg: TrainConfig, reporter, log) -> TrainConfig:
    """resume_from_checkpoint as the workers get it (reliability; checkpoints.py):
    a path stays; 'latest' becomes the newest checkpoint of output_dir (a broken one stops the job
    with what is wrong: checkpoints.newest_checkpoint), else the checkpoint the app asks this job to
    resume from, if any (else it stays 'latest': a fresh start); '' becomes the app's checkpoint to
    resume, if any."""
    spec = cfg.resume_from_checkpoint.strip()
    if spec and spec != "latest":
        return cfg
    if spec == "latest":
        from .training.checkpoints import newest_checkpoint

        # this run's folder, then (Transformer Lab) the folders of the template's earlier jobs; the
        # newest checkpoint of the first folder that has one, or ConfigError when it is broken
        for folder in [cfg.output_dir, *reporter.earlier_run_dirs(cfg.output_dir)]:
            found = newest_checkpoint(folder) if os.path.isdir(folder) else None
            if found:
                log(f"[dllm] resume_from_checkpoint 'latest': {found}")
                return cfg.replace(resume_from_checkpoint=found)
    resume = reporter.checkpoint_to_resume()
    if resume:
        log(f"[dllm] resuming from checkpoint {resume}")
        return cfg.replace(resume_from_checkpoint=resume)
    return cfg


def _refuse_over_another_run(cfg: TrainConfig) -> None:
    """A run that does not resume never writes into a folder holding another run's checkpoints
    (they would be replaced, or deleted by rotation): checkpoints.refuse_fresh_run_over names
    resume_from_checkpoint latest or a new output_dir. The Transformer Lab hosts give every job a
    folder of its own, so re-queuing a template never meets this."""
    from .training.checkpoints import refuse_fresh_run_over

    if cfg.resume_from_checkpoint.strip() in ("", "latest"):
        refuse_fresh_run_over(cfg.output_dir)


def _preflight(cfg: TrainConfig, log):
    from .preflight import run_preflight

    return run_preflight(cfg, log=log)


def _stopped(reporter, res, log) -> int:
    ckpts = [c for c in res.checkpoints if os.path.isdir(c)]
    where = f"; checkpoint {ckpts[-1]} (continue with resume_from_checkpoint: latest)" if ckpts else "; no checkpoint was saved"
    how = " (Ctrl-C)" if res.ctrl_c else ""
    reporter.stopped(f"stopped{how} at step {res.step}{where}")
    return 130 if res.ctrl_c else 0  # Ctrl-C: the shell's convention, so a calling script stops too


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """A bad command line is one `[dllm-error]` line (exit code 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"{ERROR_PREFIX}{message} (see {self.prog} --help)\n")


def _parser(prog: str = "main.py") -> argparse.ArgumentParser:
    ap = _OneLineParser(
        prog=prog,
        description="Diffusion LLM Trainer: one training job. Standalone, give --config FILE.json; inside "
                    "Transformer Lab the plugin harness passes --input_file/--experiment_name.",
        epilog="Ctrl-C (or creating the file <output_dir>/STOP) stops after the step in progress and saves a "
               "checkpoint; continue with resume_from_checkpoint: latest. A second Ctrl-C stops at once.",
    )
    ap.add_argument("--config", help="standalone: a JSON job config (the manifest's keys plus model_name, dataset_name, output_dir)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value (repeatable)")
    ap.add_argument("--input_file", help="Transformer Lab: the job's input file ({experiment, config})")
    ap.add_argument("--experiment_name", help="Transformer Lab: the experiment")
    ap.add_argument("--job_id", help="Transformer Lab: the job (default: config.job_id of the input file)")
    ap.add_argument("--plugin_dir", help=argparse.SUPPRESS)
    ap.add_argument("--workspace_dir", help=argparse.SUPPRESS)
    return ap


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got '{pair}'")
        if not value.strip():
            raise ConfigError(f"--set {key.strip()}= has no value; give one (--set {key.strip()}=VALUE), or leave the "
                              "key out to keep the config file's value")
        out[key.strip()] = value
    return out


def _unknown_arguments(unknown: list[str]) -> ConfigError:
    """The standalone command line takes only --config and --set: say how to set a config value."""
    first = unknown[0]
    key = first[2:].partition("=")[0] if first.startswith("--") else ""
    known = set(TrainConfig.__dataclass_fields__)
    if key in known or key.replace("-", "_") in known:
        name = key.replace("-", "_")
        value = first.partition("=")[2] or (unknown[1] if len(unknown) > 1 and not unknown[1].startswith("--") else "VALUE")
        hint = f"; config values are set with --set {name}={value} (or in the config file)"
    else:
        hint = "; the options are --config FILE.json and --set KEY=VALUE"
    return ConfigError(f"unknown argument{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)}{hint}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: every worker is terminated before we exit."""


def _install_sigterm() -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None, prog: str = "main.py") -> int:
    from . import _stop_auto_registration

    _stop_auto_registration()  # this process registers LLaDA/Dream where it loads one (training/loading.py)
    args, unknown = _parser(prog).parse_known_args(argv)
    from .hosts.tlab_task import launched_as_task

    hosted = bool(args.input_file) or (not args.config and launched_as_task())
    if unknown and not hosted:
        return report_user_error(_unknown_arguments(unknown))
    if unknown:  # the app's harness may pass arguments of its own; they are not ours to judge
        print(f"[dllm] note: ignoring arguments this trainer does not use: {' '.join(unknown)}", flush=True)
    if not _isatty(sys.stderr):  # a log file (Transformer Lab's job log): a bar redraw is a line, so few of them
        os.environ.setdefault("TQDM_MININTERVAL", "5")
    restore = _install_sigterm()
    try:
        if args.input_file:
            return _main_tlab(args)
        if args.config:
            return _main_standalone(args)
        if launched_as_task():
            return _main_task(args)
        print(f"{ERROR_PREFIX}give --config FILE.json (standalone) or --input_file FILE (Transformer Lab); "
              f"see {prog} --help", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # before or after a job (run_job handles its own)
        print("[dllm] interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        restore()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _main_standalone(args) -> int:
    try:
        cfg = load_config_file(args.config, _overrides(args.set))
    except UserError as e:
        return report_user_error(e)
    return run_job(cfg, StandaloneReporter())


def _main_tlab(args) -> int:
    from .hosts.tlab_plugin import TransformerLabReporter

    try:
        with open(args.input_file, encoding="utf-8") as fh:
            raw = json.load(fh)
        config = raw.get("config") if isinstance(raw, dict) else None
        if not isinstance(config, dict):
            raise ConfigError(f"input file '{args.input_file}' has no 'config' object")
        overrides = _overrides(args.set)
    except (OSError, json.JSONDecodeError) as e:
        return report_user_error(ConfigError(f"cannot read the input file '{args.input_file}': {e}"))
    except UserError as e:
        return report_user_error(e)

    job_id = config.get("job_id") or args.job_id or os.environ.get("_TFL_JOB_ID")
    try:
        reporter = TransformerLabReporter(job_id, args.experiment_name)
    except UserError as e:
        return report_user_error(e)
    except Exception as e:  # noqa: BLE001 - the SDK failed: nothing to report to
        return report_unexpected_error(e, config.get("output_dir") or None)

    known = set(TrainConfig.__dataclass_fields__)
    ignored = sorted(k for k in config if k not in known and k not in APP_KEYS)
    return _run_hosted(reporter, config, overrides, ignored)


def _main_task(args) -> int:
    """A task job of the current Transformer Lab (v0.34+): the job's parameters come from the SDK."""
    from .hosts import tlab_task

    tlab_task.install_stop_signal()  # the app stops a task with SIGTERM: a stop request, not a crash
    try:
        overrides = _overrides(args.set)
        reporter = tlab_task.TaskReporter()
    except UserError as e:
        return report_user_error(e)
    except Exception as e:  # noqa: BLE001 - the SDK failed: nothing to report to
        return report_unexpected_error(e, None)
    try:
        config, ignored = reporter.job_config()
    except Exception as e:  # noqa: BLE001
        code = report_unexpected_error(e, None)
        _quietly(reporter.fail, f"unexpected {type(e).__name__} reading the job's parameters: {e}")
        return code
    return _run_hosted(reporter, config, overrides, ignored)


def _run_hosted(reporter, config: dict, overrides: dict, ignored: list[str]) -> int:
    """Validate an app job's config (a bad value fails the job with one clear reason), then run it."""
    if ignored:
        print(f"[dllm] note: ignoring config keys this trainer does not use: {', '.join(ignored)}", flush=True)
    try:
        cfg = TrainConfig.from_dict({**config, **overrides}, strict=False)
    except UserError as e:
        _quietly(reporter.fail, str(e))
        return report_user_error(e)
    except Exception as e:  # noqa: BLE001
        code = report_unexpected_error(e, config.get("output_dir") or None)
        _quietly(reporter.fail, f"unexpected {type(e).__name__}: {e}")
        return code
    return run_job(cfg, reporter)
