"""`accelerate launch` argument lists for the training workers, and streaming their output.

Two halves:

- `build_launch(cfg, config_json)` turns the hardware settings of a job into the argument list of
  ONE `accelerate launch` command (never a shell string) plus the environment the workers need.
  Everything that can be wrong about the hardware (no GPU for `cuda`, a GPU id that does not
  exist, a missing accelerate config file, 4-bit without CUDA, TPU without torch_xla) raises
  `ConfigError` here, before any process starts.
- `run_workers(plan, ...)` starts that command, copies the workers' output line by line to our
  own stdout/stderr as it arrives (the live log), parses the `[dllm-event]` lines (progress,
  metrics, checkpoints, the final result), remembers the `[dllm-error]` lines and the last lines
  of output, writes `<output_dir>/STOP` when a stop is requested, and makes sure no worker
  outlives the job (every descendant process is tracked and terminated when the launcher ends,
  fails, or is interrupted).

How accelerate is driven:

    cuda, 1 GPU         --num_processes 1 --num_machines 1 --gpu_ids G
    cuda, n > 1 GPUs    --multi_gpu --num_processes n [--gpu_ids ...]      (torchrun, NCCL)
    cpu, 1 process      --cpu --num_processes 1
    cpu, n > 1          --multi_gpu --num_processes n, with CUDA hidden    (torchrun, gloo)
    tpu                 --tpu --main_training_function worker_main
    multi-node          + --num_machines M --machine_rank R --main_process_ip IP --main_process_port P
    config file         --config_file F (its distributed type wins: no --multi_gpu, no precision flags)

`accelerate launch --cpu --num_processes n` starts a single process unless an MPI hostfile is
given, so several CPU workers go through accelerate's torchrun path with every GPU hidden; the
workers then run accelerate's MULTI_CPU mode with the gloo backend (the Trainer is built with
`use_cpu=True` for train_device cpu).
"""
from __future__ import annotations

import codecs
import collections
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from .cpu import cpu_worker_env
from .events import EVENT_PREFIX, STOP_FILE, CtrlCStops, describe_metrics, parse_event
from ..config import TrainConfig
from ..errors import ERROR_PREFIX, ConfigError, UserError

WORKER_MODULE = "dllm_trainer.training.train"
LAUNCH_MODULE = "accelerate.commands.launch"
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_GPU_LIST_RE = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*$")


class WorkerFailed(UserError):
    """The training workers ended with an error; the message is the workers' own reason."""


@dataclass
class LaunchPlan:
    argv: list[str]  # the full command: [python, -m, accelerate.commands.launch, ..., --config-json, FILE]
    env: dict[str, str]  # variables set (or, with value None, removed) on top of os.environ
    num_processes: int  # processes on this machine
    world_size: int  # processes over all machines
    description: str  # one line for the log
    layout: "Layout | None" = None  # the accelerate config's sharding (distributed.py), None without one


# ---------------------------------------------------------------------------------------------
# Building the command
# ---------------------------------------------------------------------------------------------


def visible_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as "no GPU"
        return 0


def parse_gpu_ids(spec: str) -> list[int] | None:
    """None for 'auto'; else the listed ids. ConfigError for malformed lists and duplicates."""
    text = (spec or "").strip()
    if text in ("", "auto"):
        return None
    if not _GPU_LIST_RE.match(text):
        raise ConfigError(f"gpu_ids must be 'auto' or a comma-separated list of GPU indices such as 0,2, got '{spec}'")
    ids = [int(x) for x in text.split(",")]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"gpu_ids lists GPU {', '.join(map(str, dupes))} more than once ('{spec}')")
    return ids


def _physical_ids(ids: list[int], env: dict[str, str]) -> list[str]:
    """accelerate sets CUDA_VISIBLE_DEVICES from --gpu_ids; when we already run under a
    CUDA_VISIBLE_DEVICES list, index i means the i-th entry of that list, not physical GPU i."""
    current = env.get("CUDA_VISIBLE_DEVICES")
    if current is None or not current.strip():
        return [str(i) for i in ids]
    entries = [e.strip() for e in current.split(",") if e.strip()]
    return [entries[i] if i < len(entries) else str(i) for i in ids]


def build_launch(
    cfg: TrainConfig,
    config_json: str,
    *,
    gpu_count: int | None = None,
    python: str | None = None,
    base_env: dict[str, str] | None = None,
    tpu_available: bool | None = None,
    idle_cpus: float | None = None,
) -> LaunchPlan:
    """The `accelerate launch` command for this job; ConfigError for impossible hardware settings.

    gpu_count / tpu_available / base_env / idle_cpus (idle cores now) default to what this machine
    has (tests pass them)."""
    base_env = dict(os.environ if base_env is None else base_env)
    python = python or sys.executable
    machines = cfg.num_machines
    if cfg.machine_rank >= machines:
        raise ConfigError(f"machine_rank must be below num_machines ({machines}), got {cfg.machine_rank}")
    if machines > 1 and not cfg.main_process_ip.strip():
        raise ConfigError("main_process_ip is required when num_machines > 1 (the address of the rank-0 machine)")

    config_file = cfg.accelerate_config_file.strip()
    if config_file:
        config_file = os.path.abspath(os.path.expanduser(config_file))
        if not os.path.isfile(config_file):
            raise ConfigError(f"accelerate_config_file '{cfg.accelerate_config_file}' does not exist")

    args: list[str] = []
    env: dict[str, str | None] = {}
    ids = parse_gpu_ids(cfg.gpu_ids)
    layout = None
    if config_file:  # FSDP / DeepSpeed: what cannot work fails here (distributed.py)
        from .distributed import check_layout, read_layout

        layout = read_layout(config_file)
        check_layout(layout, train_device=cfg.train_device, load_in_4bit=cfg.load_in_4bit,
                     gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.resume_from_checkpoint.strip():
        from .distributed import check_resume_layout

        check_resume_layout(cfg.resume_from_checkpoint, layout)

    if cfg.load_in_4bit and cfg.train_device != "cuda":
        raise ConfigError(f"load_in_4bit needs train_device 'cuda' (bitsandbytes 4-bit runs on CUDA GPUs), got '{cfg.train_device}'")

    if cfg.train_device == "cuda":
        visible = visible_gpu_count() if gpu_count is None else gpu_count
        if visible == 0:
            raise ConfigError(
                "train_device is 'cuda' but no CUDA GPU is visible"
                + (" (load_in_4bit needs one too)" if cfg.load_in_4bit else "")
                + "; use train_device 'cpu', or check the GPU driver and CUDA_VISIBLE_DEVICES"
            )
        if ids is None:
            selected = list(range(visible))
        else:
            missing = [i for i in ids if i >= visible]
            if missing:
                raise ConfigError(
                    f"gpu_ids '{cfg.gpu_ids}' names GPU {', '.join(map(str, missing))} but only {visible} "
                    f"GPU{'s are' if visible != 1 else ' is'} visible (ids 0..{visible - 1})"
                )
            selected = ids
        per_machine = len(selected)
        world = per_machine * machines
        explicit_ids = ids is not None
        if config_file and not explicit_ids:
            # The accelerate config decides processes and GPUs (FSDP / DeepSpeed layouts).
            args += ["--config_file", config_file, "--num_machines", str(machines)]
            if layout.num_processes:  # accelerate starts the config's process count (over all machines)
                world = layout.num_processes
                per_machine = max(1, world // machines)
                if per_machine > visible:
                    raise ConfigError(
                        f"accelerate_config_file '{cfg.accelerate_config_file}' starts {per_machine} processes per "
                        f"machine (num_processes {world} over {machines} machine{'s' if machines != 1 else ''}) but "
                        f"only {visible} GPU{'s are' if visible != 1 else ' is'} visible; lower num_processes in the "
                        "file or set gpu_ids"
                    )
            desc = f"CUDA via accelerate config {config_file} ({layout.name})"
        else:
            if config_file:
                args += ["--config_file", config_file]
            elif world > 1:
                args += ["--multi_gpu"]
            args += ["--num_processes", str(world), "--num_machines", str(machines)]
            if explicit_ids or base_env.get("CUDA_VISIBLE_DEVICES"):
                args += ["--gpu_ids", ",".join(_physical_ids(selected, base_env))]
            desc = f"{per_machine} GPU{'s' if per_machine != 1 else ''} ({','.join(map(str, selected))})"
    elif cfg.train_device == "cpu":
        per_machine = cfg.num_processes
        world = per_machine * machines
        if world == 1:
            args += ["--cpu", "--num_processes", "1", "--num_machines", "1"]
        elif layout is not None and layout.kind == "fsdp":
            # The config's FSDP settings pick accelerate's launcher (--multi_gpu would drop them);
            # the workers run FSDP over gloo (distributed.enable_fsdp_on_cpu).
            args += ["--num_processes", str(world), "--num_machines", str(machines)]
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            # torchrun path with CUDA hidden: MULTI_CPU / gloo in the workers (see module docstring)
            args += ["--multi_gpu", "--num_processes", str(world), "--num_machines", str(machines)]
            env["CUDA_VISIBLE_DEVICES"] = ""
        env["ACCELERATE_USE_CPU"] = "true"
        # threads and OpenMP waiting for the machine as it is now (cpu.py)
        env.update(cpu_worker_env(base_env, per_machine, idle=idle_cpus))
        if config_file:
            args = ["--config_file", config_file] + args
        desc = f"{per_machine} CPU process{'es' if per_machine != 1 else ''}"
        if layout is not None and layout.kind == "fsdp" and world > 1:
            desc += f" with {layout.name}"
        threads = env["DLLM_CPU_THREADS"]
        desc += f", {threads} thread{'s' if threads != '1' else ''} each"
    elif cfg.train_device == "tpu":
        if tpu_available is None:
            import importlib.util

            tpu_available = importlib.util.find_spec("torch_xla") is not None
        if not tpu_available:
            raise ConfigError("train_device 'tpu' needs torch_xla, which is not installed in this environment")
        if machines > 1 and not config_file:
            raise ConfigError("multi-machine TPU training needs an accelerate_config_file describing the TPU pod")
        per_machine = world = 1  # xmp.spawn starts one process per TPU core by itself
        if config_file:
            args += ["--config_file", config_file]
        args += ["--tpu", "--main_training_function", "worker_main"]
        desc = "TPU"
    else:  # pragma: no cover - the config validates the enum
        raise ConfigError(f"train_device must be one of cuda, cpu, tpu, got '{cfg.train_device}'")

    if machines > 1:
        args += [
            "--machine_rank", str(cfg.machine_rank),
            "--main_process_ip", cfg.main_process_ip.strip(),
            "--main_process_port", str(cfg.main_process_port),
        ]
        desc += f" on machine {cfg.machine_rank} of {machines} (rank 0 at {cfg.main_process_ip.strip()}:{cfg.main_process_port})"
    elif world > 1:
        args += ["--main_process_port", str(cfg.main_process_port)]
    if layout is not None:
        from .distributed import launch_overrides

        args += launch_overrides(layout)
    if not config_file and cfg.train_device != "tpu":
        # Precision is set by the Trainer (bf16/fp16 arguments); these only silence accelerate's defaults warning.
        args += ["--mixed_precision", "no", "--dynamo_backend", "no"]

    argv = [python, "-m", LAUNCH_MODULE, *args, "-m", WORKER_MODULE, "--config-json", config_json]
    return LaunchPlan(argv=argv, env=env, num_processes=per_machine, world_size=world, description=desc, layout=layout)


def worker_env(plan_env: dict[str, str | None], extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ + what the workers need: our package importable, unbuffered output, plan/extra vars."""
    env = dict(os.environ)
    import dllm_trainer

    src = os.path.dirname(os.path.dirname(os.path.abspath(dllm_trainer.__file__)))
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in parts:
        env["PYTHONPATH"] = os.pathsep.join([src, *parts])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # progress bars: on a terminal they redraw in place (run_workers); in a log file each redraw is a
    # line, so there they refresh every 5 s instead of 10 times a second
    env.setdefault("TQDM_MININTERVAL", "0.5" if _isatty(sys.stdout) else "5")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead rank aborts collectives instead of hanging
    for key, value in {**plan_env, **(extra or {})}.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# ---------------------------------------------------------------------------------------------
# Running and streaming
# ---------------------------------------------------------------------------------------------


@dataclass
class LaunchResult:
    returncode: int
    stop_requested: bool = False
    interrupted: bool = False
    result: dict | None = None  # the workers' `result` event
    last_metrics: dict = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)  # `[dllm-error]` messages, deduplicated, in order
    tail: list[str] = field(default_factory=list)  # the last lines of output (both streams)
    worker_deaths: list[str] = field(default_factory=list)  # torchrun's 'failed (exitcode: -N) local_rank: R' lines
    max_steps: int | None = None
    step: int = 0
    ctrl_c: bool = False  # the stop was asked for with Ctrl-C

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.interrupted

    def failure_reason(self) -> str:
        """The workers' own error message(s), else the most telling of the last output lines."""
        dead = _killed_worker(self.worker_deaths)  # a rank killed by a signal is the cause; the others' errors follow
        if self.error_lines:
            return "; ".join(([dead] if dead else []) + self.error_lines[:3])
        if dead:
            return dead
        code = _describe_exit(self.returncode)
        telling = _telling_line(self.tail)
        if telling:
            return f"the training workers failed ({code}): {telling}"
        return f"the training workers failed ({code}) without an error message; see the log above"


_TORCHRUN_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")


def _killed_worker(lines: list[str]) -> str | None:
    """torchrun's "failed (exitcode: -9) local_rank: 1 (pid: N)" for a worker killed by a signal
    (reliability: a SIGKILLed / OOM-killed rank is named as the cause of the job's failure)."""
    for line in lines:
        m = _TORCHRUN_FAILED.search(line)
        if m and int(m.group(1)) < 0:
            return (f"training worker rank {m.group(2)} (pid {m.group(3)}) was {_describe_exit(int(m.group(1)))} "
                    "(out of memory, or killed from outside); the job was stopped")
    return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_EXC_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)|Killed)\b:?(.*)$")


def _telling_line(lines: list[str]) -> str:
    for line in reversed(lines):
        text = line.strip()
        if _EXC_LINE.match(text) or "died with <Signals" in text or "exitcode" in text.replace(" ", "").lower():
            return text[:500]
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:500]
    return ""


def _die_with_parent() -> None:
    """In the launcher child (Linux): get SIGTERM if the app process dies without cleaning up
    (e.g. SIGKILL), so torchrun still shuts its workers down."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def _ignore_sigint() -> Callable[[], None]:
    """Ignore Ctrl-C (while the workers are cleaned up); returns the function that restores it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous)


def _append_debug(output_dir: str, line: str) -> None:
    try:
        with open(os.path.join(output_dir, "debug.log"), "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError:
        pass


_LINE_END = re.compile(r"\r\n|\n|\r")


def _pump(stream, name: str, q: "queue.Queue[tuple[str, str | None, bool]]") -> None:
    """Read raw chunks and split on \\n and \\r, so lines arrive as soon as written. The flag says
    the piece is a progress-bar state that the next one redraws in place: text after a \\r (tqdm
    writes "\\r" + bar), passed on as soon as it is read rather than when the next redraw ends it.
    When a bar already passed on turns out final (a \\n follows), an empty line ends it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = stream.fileno()
    buf = ""
    after_cr = False  # buf follows a \r: a bar being redrawn
    shown = None  # the bar text already passed on before its end arrived
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += decoder.decode(chunk)
            start = 0
            for m in _LINE_END.finditer(buf):
                if m.group() == "\r" and m.end() == len(buf):
                    break  # a \r at the end of the chunk may be the first half of \r\n
                piece, cr = buf[start:m.start()], m.group() == "\r"
                if piece != shown or not after_cr:
                    q.put((name, piece, cr))
                elif not cr:  # the bar already shown is final: it keeps its line
                    q.put((name, "", False))
                after_cr, shown, start = cr, None, m.end()
            buf = buf[start:]
            if after_cr and buf and buf != shown:
                q.put((name, buf, True))
                shown = buf
        buf += decoder.decode(b"", final=True)
        for piece in _LINE_END.split(buf):
            if piece and piece != shown:
                q.put((name, piece, False))
    except OSError:
        pass
    finally:
        q.put((name, None, False))


class _Console:
    """Writes relayed lines; on a terminal, progress-bar redraws (pieces ended by \\r) stay on one
    line that redraws in place, and the other lines are written above it. Elsewhere (a log file,
    Transformer Lab's job log) every piece is a line of its own."""

    def __init__(self, out: TextIO, err: TextIO):
        self.streams = {"out": out, "err": err}
        self.tty = {k: _isatty(s) for k, s in self.streams.items()}
        self.bar: tuple[str, str] | None = None  # (stream, text) of the bar shown at the bottom

    def write(self, name: str, text: str, redraw: bool = False) -> None:
        stream = self.streams[name]
        if not self.tty[name]:
            print(text, file=stream, flush=True)
            return
        if redraw:
            if self.bar and self.bar[0] != name:
                self._clear()
            stream.write("\r" + text + "\x1b[K")
            stream.flush()
            self.bar = (name, text)
            return
        bar = self.bar
        if bar:
            self._clear()
        stream.write(text + "\n")
        stream.flush()
        if bar and not _same_bar(bar[1], text):  # a finished bar ends with \n: it replaces the redrawn one
            self.streams[bar[0]].write(bar[1] + "\x1b[K")
            self.streams[bar[0]].flush()
            self.bar = bar

    def clear(self) -> None:
        self._clear()

    def end_bar(self, name: str) -> None:
        if self.bar and self.bar[0] == name:
            self.streams[name].write("\n")
            self.streams[name].flush()
            self.bar = None

    def _clear(self) -> None:
        if self.bar:
            s = self.streams[self.bar[0]]
            s.write("\r\x1b[K")
            s.flush()
            self.bar = None

    def close(self) -> None:
        if self.bar:
            s = self.streams[self.bar[0]]
            s.write("\n")
            s.flush()
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _same_bar(bar: str, line: str) -> bool:
    """The final state of a bar (ended by \\n) has the same description before its percentage."""
    head = lambda t: t.split("%", 1)[0].rstrip("0123456789 .")  # noqa: E731
    return "%" in bar and "%" in line and head(bar) == head(line)


class _ProcessTree:
    """The launcher and every process it starts. torchrun puts each worker in its own session,
    so a process-group kill would miss them: we remember descendants as they appear and signal
    each one (psutil guards against PID reuse)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.known: dict[int, object] = {}
        try:
            import psutil

            self._psutil = psutil
            self._root = psutil.Process(proc.pid)
        except Exception:  # noqa: BLE001 - psutil missing: fall back to the process group
            self._psutil = None
            self._root = None

    def refresh(self) -> None:
        if self._root is None:
            return
        try:
            for child in self._root.children(recursive=True):
                self.known.setdefault(child.pid, child)
        except Exception:  # noqa: BLE001 - the launcher may just have exited
            pass

    def alive(self) -> list:
        out = []
        for p in list(self.known.values()):
            try:
                if p.is_running() and p.status() != self._psutil.STATUS_ZOMBIE:
                    out.append(p)
            except Exception:  # noqa: BLE001
                pass
        return out

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and (self.proc.poll() is None or self.alive()):
            time.sleep(0.05)

    def terminate(self, grace: float = 10.0) -> None:
        """SIGTERM the launcher (it forwards to its workers); after grace/2 SIGTERM every descendant
        left; after grace SIGKILL whatever still runs."""
        self.refresh()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
        self._wait(grace / 2)
        for p in self.alive():
            try:
                p.terminate()
            except Exception:  # noqa: BLE001
                pass
        self._wait(grace / 2)
        for p in self.alive():
            try:
                p.kill()
            except Exception:  # noqa: BLE001
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.kill()
            except OSError:
                pass
        if self._root is None:  # no psutil: at least the launcher's own process group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def run_workers(
    plan: LaunchPlan,
    *,
    output_dir: str,
    env: dict[str, str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[str, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_stop_request: Callable[[], None] | None = None,
    poll_interval: float = 1.0,
    stop_grace: float = 600.0,
    exit_grace: float = 15.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
    tail_lines: int = 40,
) -> LaunchResult:
    """Run the launch command to completion, streaming its output; see the module docstring.

    A stop request (should_stop() turning true) writes <output_dir>/STOP: the workers save a
    checkpoint and exit on their own; after stop_grace seconds they are terminated. The first
    Ctrl-C is a stop request too (ctrl_c=True; before the first training step there is nothing to
    save, so it stops at once); a second Ctrl-C, or SIGTERM (KeyboardInterrupt), terminates every
    worker at once and returns with interrupted=True.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    env = env if env is not None else worker_env(plan.env)
    os.makedirs(output_dir, exist_ok=True)
    stop_path = os.path.join(output_dir, STOP_FILE)
    if os.path.exists(stop_path):
        os.remove(stop_path)

    res = LaunchResult(returncode=-1)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    try:
        proc = subprocess.Popen(
            plan.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=output_dir,
            start_new_session=True,  # our own process group: signals to the app don't hit the workers twice
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    except OSError as e:
        raise WorkerFailed(f"cannot start the training workers ({plan.argv[0]}): {e.strerror or e}") from None

    tree = _ProcessTree(proc)
    console = _Console(out, err)
    q: queue.Queue[tuple[str, str | None, bool]] = queue.Queue()
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout, "out", q), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, "err", q), daemon=True),
    ]
    for t in readers:
        t.start()
    open_streams = 2
    next_poll = time.monotonic() + poll_interval
    stop_at: float | None = None
    exited_at: float | None = None
    diverting = False
    warned: set[str] = set()
    restore_sigint = lambda: None  # noqa: E731
    ctrl_c = CtrlCStops(lambda: None)  # the loop reads ctrl_c.pressed (no I/O in a signal handler)

    def safe(fn, *args, default=None):
        """Reporting callbacks must never end a training run (a KeyboardInterrupt still does)."""
        if fn is None:
            return default
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            name = getattr(fn, "__name__", "callback")
            if name not in warned:
                warned.add(name)
                console.write("err", f"[dllm] warning: {name} failed ({type(e).__name__}: {e}); training continues")
            return default

    def say(text: str, stream: str = "out") -> None:
        console.write(stream, text)

    def handle(name: str, line: str, redraw: bool = False) -> None:
        nonlocal diverting
        idx = line.find(EVENT_PREFIX)
        ev = parse_event(line[idx:]) if idx >= 0 else None
        if ev is not None:
            kind = ev.get("event")
            if kind == "progress":
                res.step = int(ev.get("step") or 0)
                res.max_steps = ev.get("max_steps") or res.max_steps
                if res.max_steps:
                    safe(on_progress, res.step, int(res.max_steps))
                return
            if kind == "train_begin":
                res.max_steps = ev.get("max_steps") or res.max_steps
                say(f"[dllm] training started: {res.max_steps} optimizer steps")
                if res.max_steps:
                    safe(on_progress, 0, int(res.max_steps))
                return
            if kind == "metrics":
                metrics = {k: v for k, v in ev.items() if k != "event"}
                res.last_metrics.update(metrics)
                shown = {k: v for k, v in metrics.items() if k != "step"}
                say(describe_metrics(shown, ev.get("step"), res.max_steps))
                safe(on_metrics, metrics)
                return
            if kind == "checkpoint":
                path = ev.get("path")
                if path:
                    res.checkpoints.append(path)
                    say(f"[dllm] checkpoint saved: {path}")
                    safe(on_checkpoint, path, int(ev.get("step") or 0))
                return
            if kind == "result":
                res.result = ev
                return
        stripped = line.strip()
        eidx = stripped.find(ERROR_PREFIX.strip())
        if eidx >= 0:
            # the workers' own one-line error: it becomes the job's failure reason (printed once, by the app)
            msg = stripped[eidx + len(ERROR_PREFIX.strip()):].strip()
            if msg and msg not in res.error_lines:
                res.error_lines.append(msg)
            return
        if not _ANSI_RE.sub("", line).strip():
            if redraw:
                console.clear()  # a bar that erased itself (leave=False)
            elif line == "":
                console.end_bar(name)  # the bar on screen is final: it keeps its line
            return
        if not redraw:
            tail.append(line)
        if _TORCHRUN_FAILED.search(line):
            res.worker_deaths.append(line)  # kept whatever the tail's length
        if (name == "err" and stripped.startswith("Traceback (most recent call last)")
                and (res.error_lines or _killed_worker(res.worker_deaths))):
            # accelerate/torchrun re-raise a worker's exit as their own traceback; the worker (or torchrun's
            # line on a rank killed by a signal) already said what went wrong, so the launcher's traceback
            # goes to debug.log, not the live log
            diverting = True
        if diverting and name == "err":
            _append_debug(output_dir, line)
            return
        console.write(name, line, redraw)

    def request_stop(message: str) -> None:
        nonlocal stop_at
        if stop_at is None:
            stop_at = time.monotonic()
            res.stop_requested = True
            with open(stop_path, "w") as fh:  # first the file, then the message, then the host's bookkeeping
                fh.write("stop requested\n")
            say(message)
            safe(on_stop_request)

    try:
        with ctrl_c:
            while True:
                try:
                    name, line, redraw = q.get(timeout=0.2)
                    if line is None:
                        open_streams -= 1
                    else:
                        handle(name, line, redraw)
                except queue.Empty:
                    pass
                if ctrl_c.pressed and not res.ctrl_c and proc.poll() is None:
                    res.ctrl_c = True
                    if res.max_steps is None:  # no training step yet: nothing to save
                        say("[dllm] Ctrl-C before the first training step: stopping the workers (nothing to save yet)",
                            "err")
                        raise KeyboardInterrupt
                    request_stop("[dllm] Ctrl-C: the workers stop after the step in progress and save a checkpoint "
                                 "(Ctrl-C again to stop at once, without one)")
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + poll_interval
                    tree.refresh()
                    if stop_at is None and safe(should_stop, default=False):
                        request_stop("[dllm] stop requested: the workers save a checkpoint and stop after the current step")
                    if stop_at is not None and proc.poll() is None and not os.path.exists(stop_path):
                        # (re)written while the workers run: a worker that starts late deletes a stale STOP
                        with open(stop_path, "w") as fh:
                            fh.write("stop requested\n")
                if stop_at is not None and now - stop_at > stop_grace and proc.poll() is None:
                    say(f"[dllm] the workers did not stop within {stop_grace:.0f} s of the stop request; terminating them",
                        "err")
                    tree.terminate()
                if proc.poll() is not None:
                    if exited_at is None:
                        exited_at = now
                        if proc.returncode != 0 and stop_at is None and safe(should_stop, default=False):
                            # the host signalled every process to stop (launcher included): the workers
                            # are saving their checkpoint; they get exit_grace to finish
                            stop_at = now
                            res.stop_requested = True
                            say("[dllm] stop requested: the workers save a checkpoint and stop")
                            safe(on_stop_request)
                        if proc.returncode != 0 and stop_at is None:
                            # A failed launcher must not leave workers behind (they may hold the pipes open).
                            tree.terminate(grace=5.0)
                    if open_streams <= 0:
                        break
                    if now - exited_at > exit_grace:
                        tree.terminate(grace=2.0)  # something still holds our pipes: a stray descendant
                        if now - exited_at > exit_grace + 5:
                            break
    except KeyboardInterrupt:
        res.interrupted = True
        restore_sigint = _ignore_sigint()  # the clean-up below must finish even if Ctrl-C is pressed again
        console.write("err", "[dllm] interrupted: terminating the training workers")
        tree.terminate(grace=10.0)
    finally:
        if proc.poll() is None:
            tree.terminate(grace=5.0)
        else:
            stray = tree.alive()
            if stray:
                tree.terminate(grace=5.0)
        # drain what is left in the queue (non-blocking)
        while True:
            try:
                name, line, redraw = q.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                handle(name, line, redraw)
        console.close()
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass
        if os.path.exists(stop_path):
            try:
                os.remove(stop_path)
            except OSError:
                pass
        restore_sigint()
    res.returncode = proc.returncode if proc.returncode is not None else -9
    res.tail = list(tail)
    return res
