"""launcher.py: `accelerate launch` argument lists for every hardware setting, the config errors
raised before anything starts, and the streaming/supervision of worker processes (with fake
workers: small Python scripts that print events, fail, spawn children, or wait for STOP)."""
from __future__ import annotations

import io
import os
import sys
import textwrap
import time

import pytest

from dllm_trainer.config import TrainConfig
from dllm_trainer.errors import ConfigError
from dllm_trainer.training.launcher import LaunchPlan, build_launch, parse_gpu_ids, run_workers, worker_env

BASE = {"model_name": "m", "dataset_name": "d", "output_dir": "/tmp/out"}
JSON = "/tmp/out/dllm_config.json"


def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **{k: str(v) for k, v in kw.items()}})


def parsed(plan: LaunchPlan):
    """The argument list as accelerate itself parses it (unknown or misspelled flags fail here)."""
    from accelerate.commands.launch import launch_command_parser

    assert plan.argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    ns = launch_command_parser().parse_args(plan.argv[3:])
    assert ns.module and ns.training_script == "dllm_trainer.training.train"
    assert ns.training_script_args == ["--config-json", JSON]
    return ns


def test_cuda_auto_single_gpu():
    plan = build_launch(cfg(train_device="cuda"), JSON, gpu_count=1, base_env={})
    ns = parsed(plan)
    assert not ns.multi_gpu and not ns.cpu and ns.num_processes == 1 and ns.num_machines == 1
    assert ns.gpu_ids is None and ns.mixed_precision == "no"
    assert (plan.num_processes, plan.world_size) == (1, 1)


def test_cuda_auto_uses_every_visible_gpu():
    plan = build_launch(cfg(train_device="cuda", gpu_ids="auto"), JSON, gpu_count=4, base_env={})
    ns = parsed(plan)
    assert ns.multi_gpu and ns.num_processes == 4 and ns.main_process_port == 29500
    assert plan.world_size == 4


def test_cuda_selected_gpus():
    plan = build_launch(cfg(train_device="cuda", gpu_ids="0, 2"), JSON, gpu_count=4, base_env={})
    ns = parsed(plan)
    assert ns.multi_gpu and ns.num_processes == 2 and ns.gpu_ids == "0,2"
    one = parsed(build_launch(cfg(train_device="cuda", gpu_ids="3"), JSON, gpu_count=4, base_env={}))
    assert not one.multi_gpu and one.num_processes == 1 and one.gpu_ids == "3"


def test_gpu_ids_are_indices_into_an_existing_cuda_visible_devices():
    plan = build_launch(cfg(train_device="cuda", gpu_ids="1"), JSON, gpu_count=2,
                        base_env={"CUDA_VISIBLE_DEVICES": "4,6"})
    assert parsed(plan).gpu_ids == "6"


@pytest.mark.parametrize(
    "settings, visible, message",
    [
        ({"train_device": "cuda"}, 0, "no CUDA GPU is visible"),
        ({"train_device": "cuda", "gpu_ids": "0,2"}, 2, "names GPU 2 but only 2 GPUs are visible"),
        ({"train_device": "cuda", "gpu_ids": "1,1"}, 2, "more than once"),
        ({"train_device": "cuda", "lora": "true", "load_in_4bit": "true"}, 0, "load_in_4bit"),
        ({"train_device": "cuda", "accelerate_config_file": "/nonexistent/accel.yaml"}, 1, "does not exist"),
    ],
)
def test_hardware_errors_before_anything_starts(settings, visible, message):
    with pytest.raises(ConfigError, match=message):
        build_launch(cfg(**settings), JSON, gpu_count=visible, base_env={})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"gpu_ids": "0,,2"}, "gpu_ids must be 'auto' or a comma-separated list"),
        ({"gpu_ids": "first"}, "gpu_ids must be 'auto' or a comma-separated list"),
        ({"train_device": "cpu", "load_in_4bit": "true"}, "load_in_4bit needs train_device 'cuda'"),
        ({"num_machines": "2", "machine_rank": "0"}, "main_process_ip is required"),
        ({"num_machines": "2", "machine_rank": "2", "main_process_ip": "10.0.0.1"}, "machine_rank must be below"),
        ({"train_device": "gpu"}, "train_device must be one of cuda, cpu, tpu"),
    ],
)
def test_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({**BASE, **settings})
    with pytest.raises(ConfigError):
        parse_gpu_ids("0,,2")


def test_cpu_single_process():
    plan = build_launch(cfg(train_device="cpu"), JSON, gpu_count=8, base_env={})
    ns = parsed(plan)
    assert ns.cpu and not ns.multi_gpu and ns.num_processes == 1
    assert plan.env["ACCELERATE_USE_CPU"] == "true"


def test_cpu_several_processes_go_through_torchrun_with_cuda_hidden():
    plan = build_launch(cfg(train_device="cpu", num_processes=3, main_process_port=29600), JSON,
                        gpu_count=8, base_env={})
    ns = parsed(plan)
    assert ns.multi_gpu and ns.num_processes == 3 and ns.main_process_port == 29600
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "" and plan.env["ACCELERATE_USE_CPU"] == "true"
    assert plan.world_size == 3


def test_tpu():
    plan = build_launch(cfg(train_device="tpu"), JSON, base_env={}, tpu_available=True)
    ns = parsed(plan)
    assert ns.tpu and ns.main_training_function == "worker_main" and not ns.multi_gpu
    with pytest.raises(ConfigError, match="torch_xla"):
        build_launch(cfg(train_device="tpu"), JSON, base_env={}, tpu_available=False)


def test_multi_node():
    c = cfg(train_device="cuda", num_machines=2, machine_rank=1, main_process_ip="10.1.2.3", main_process_port=29555)
    ns = parsed(build_launch(c, JSON, gpu_count=4, base_env={}))
    assert ns.multi_gpu and ns.num_processes == 8 and ns.num_machines == 2
    assert ns.machine_rank == 1 and ns.main_process_ip == "10.1.2.3" and ns.main_process_port == 29555
    c = cfg(train_device="cpu", num_processes=1, num_machines=2, machine_rank=0, main_process_ip="127.0.0.1")
    ns = parsed(build_launch(c, JSON, gpu_count=0, base_env={}))
    assert ns.multi_gpu and ns.num_processes == 2 and ns.num_machines == 2 and ns.machine_rank == 0


def test_accelerate_config_file(tmp_path):
    f = tmp_path / "fsdp.yaml"
    f.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    ns = parsed(build_launch(cfg(train_device="cuda", accelerate_config_file=str(f)), JSON, gpu_count=2, base_env={}))
    # the file's distributed type must win: no --multi_gpu, no precision override, its process count
    assert ns.config_file == str(f) and not ns.multi_gpu and ns.mixed_precision is None and ns.num_processes is None
    ns = parsed(build_launch(cfg(train_device="cuda", gpu_ids="1", accelerate_config_file=str(f)), JSON,
                             gpu_count=2, base_env={}))
    assert ns.config_file == str(f) and ns.gpu_ids == "1" and ns.num_processes == 1


def test_worker_env_makes_the_package_importable(monkeypatch):
    import dllm_trainer

    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = worker_env({"CUDA_VISIBLE_DEVICES": "", "DROP_ME": None}, {"WANDB_MODE": "offline"})
    src = os.path.dirname(os.path.dirname(os.path.abspath(dllm_trainer.__file__)))
    assert env["PYTHONPATH"].split(os.pathsep) == [src, "/somewhere"]
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["WANDB_MODE"] == "offline" and "DROP_ME" not in env
    assert env["PYTHONUNBUFFERED"] == "1"


# ---------------------------------------------------------------------------------------------
# Streaming and supervision, with fake workers
# ---------------------------------------------------------------------------------------------


def fake(tmp_path, body: str) -> LaunchPlan:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))
    return LaunchPlan(argv=[sys.executable, str(script)], env={}, num_processes=1, world_size=1, description="fake")


EVENTS = """
import json, sys, time
def ev(**k): print("[dllm-event] " + json.dumps(k), flush=True)
"""


def test_stream_events_and_output(tmp_path, capsys):
    plan = fake(tmp_path, EVENTS + """
ev(event="train_begin", max_steps=2)
sys.stderr.write(" 50%|#####     | 1/2\\r100%|##########| 2/2\\n"); sys.stderr.flush()
ev(event="progress", step=1, max_steps=2)
print("plain line one", flush=True)
ev(event="metrics", step=1, loss=2.5, learning_rate=1e-4)
ev(event="checkpoint", step=2, path="/x/checkpoint-2")
ev(event="progress", step=2, max_steps=2)
ev(event="result", stopped=False, adaptor_dir="/x/a", final_model_dir=None, metrics={"loss": 2.0})
""")
    progress, metrics, ckpts = [], [], []
    res = run_workers(plan, output_dir=str(tmp_path / "out"), env=dict(os.environ),
                      on_progress=lambda s, m: progress.append((s, m)), on_metrics=metrics.append,
                      on_checkpoint=lambda p, s: ckpts.append((p, s)))
    out = capsys.readouterr()
    assert res.ok and res.returncode == 0
    assert progress == [(0, 2), (1, 2), (2, 2)]
    assert metrics == [{"step": 1, "loss": 2.5, "learning_rate": 1e-4}]
    assert ckpts == [("/x/checkpoint-2", 2)] and res.checkpoints == ["/x/checkpoint-2"]
    assert res.result["metrics"] == {"loss": 2.0} and res.step == 2
    assert "plain line one" in out.out and "[dllm] step 1/2: loss 2.5, lr 0.0001\n" in out.out
    assert "[dllm-event]" not in out.out + out.err  # machine-facing events are never echoed
    # not a terminal (a log file): \r-separated redraws are lines of their own
    assert out.err == " 50%|#####     | 1/2\n100%|##########| 2/2\n"


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_redraw_in_place_on_a_terminal(tmp_path):
    plan = fake(tmp_path, EVENTS + """
sys.stderr.write("\\r  0%|          | 0/2\\r 50%|#####     | 1/2"); sys.stderr.flush()
time.sleep(0.3)
print("a log line", flush=True)
time.sleep(0.3)
sys.stderr.write("\\r100%|##########| 2/2"); sys.stderr.flush()
time.sleep(0.3)
sys.stderr.write("\\n"); sys.stderr.flush()  # tqdm's close: the bar already on screen is final
time.sleep(0.3)  # two pipes: their order is only kept for writes apart in time
print("after the bar", flush=True)
""")
    term = FakeTerminal()
    res = run_workers(plan, output_dir=str(tmp_path / "out"), env=dict(os.environ), out=term, err=term)
    assert res.ok
    # each redraw returns to the line start and clears it; the log line is written above the bar,
    # which is drawn again below it; the finished bar ends the line
    assert term.getvalue() == (
        "\r  0%|          | 0/2\x1b[K" "\r 50%|#####     | 1/2\x1b[K"
        "\r\x1b[K" "a log line\n" " 50%|#####     | 1/2\x1b[K"
        "\r100%|##########| 2/2\x1b[K" "\n" "after the bar\n"
    )


_NAMED_CAUSES = [
    # a worker's own one-line error
    ("[dllm-error] dataset 'x.jsonl': cannot tell the dataset format from its columns ['foo']",
     "dataset 'x.jsonl': cannot tell the dataset format from its columns ['foo']"),
    # torchrun's line on a rank killed by a signal: torchrun may stop the other ranks before they say anything
    ("[E] failed (exitcode: -9) local_rank: 1 (pid: 4242) of binary: python",
     "training worker rank 1 (pid 4242) was killed by SIGKILL (out of memory, or killed from outside); "
     "the job was stopped"),
]


@pytest.mark.parametrize("cause_line, reason", _NAMED_CAUSES, ids=["worker-error", "rank-killed"])
def test_a_named_cause_becomes_the_reason_and_the_launcher_traceback_goes_to_debug_log(tmp_path, capsys,
                                                                                        cause_line, reason):
    plan = fake(tmp_path, f"""
import sys
print("loading ...", flush=True)
print({cause_line!r}, file=sys.stderr, flush=True)
try:
    raise RuntimeError("launcher noise")
except RuntimeError:
    import traceback; traceback.print_exc()
sys.exit(2)
""")
    res = run_workers(plan, output_dir=str(tmp_path / "out"), env=dict(os.environ))
    err = capsys.readouterr().err
    assert not res.ok and res.returncode == 2
    assert res.failure_reason() == reason
    assert "Traceback" not in err and "launcher noise" not in err  # accelerate/torchrun's re-raise of the exit
    assert "launcher noise" in (tmp_path / "out" / "debug.log").read_text()


def test_failure_without_worker_message_uses_the_last_telling_line(tmp_path):
    plan = fake(tmp_path, """
import sys
print("some output", flush=True)
print("ValueError: bf16 mixed precision requires a supported device", file=sys.stderr, flush=True)
print("bye", file=sys.stderr, flush=True)
sys.exit(1)
""")
    res = run_workers(plan, output_dir=str(tmp_path / "out"), env=dict(os.environ))
    reason = res.failure_reason()
    assert "exit code 1" in reason and "ValueError: bf16 mixed precision" in reason


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_no_orphans_when_the_launcher_dies(tmp_path):
    """Like torchrun, the fake launcher starts a worker in its own session, then dies: the
    worker must not outlive the job, and the job must end promptly."""
    pidfile = tmp_path / "child.pid"
    plan = fake(tmp_path, f"""
import subprocess, sys, time, os
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open({str(pidfile)!r}, "w").write(str(child.pid))
time.sleep(1.5)
os._exit(9)
""")
    t0 = time.monotonic()
    res = run_workers(plan, output_dir=str(tmp_path / "out"), env=dict(os.environ), poll_interval=0.2)
    assert res.returncode == 9 and not res.ok
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    assert time.monotonic() - t0 < 30


def test_stop_request_writes_the_stop_file(tmp_path):
    out_dir = tmp_path / "out"
    plan = fake(tmp_path, EVENTS + f"""
import io
import os
os.makedirs({str(out_dir)!r}, exist_ok=True)
stop = os.path.join({str(out_dir)!r}, "STOP")
if os.path.exists(stop):
    os.remove(stop)  # like train.py: a stale request from an earlier run is removed at start
step = 0
while not os.path.exists(stop) and step < 600:
    step += 1
    ev(event="progress", step=step, max_steps=1000)
    time.sleep(0.05)
ev(event="checkpoint", step=step, path="/x/checkpoint-%d" % step)
ev(event="result", stopped=True, adaptor_dir=None, final_model_dir=None, metrics={{}})
""")
    asked = []

    def should_stop():
        asked.append(time.monotonic())
        return len(asked) >= 3

    acknowledged = []
    said = io.StringIO()

    def on_stop_request():  # the host's bookkeeping comes after the STOP file and the message
        acknowledged.append(((out_dir / "STOP").exists(), "stop requested" in said.getvalue()))

    res = run_workers(plan, output_dir=str(out_dir), env=dict(os.environ), should_stop=should_stop,
                      on_stop_request=on_stop_request, poll_interval=0.2, out=said, err=said)
    assert res.ok and res.stop_requested and res.result["stopped"] is True
    assert 0 < res.step < 600 and res.checkpoints
    assert acknowledged == [(True, True)]
    assert not (out_dir / "STOP").exists()  # cleaned up after the run


def test_interrupt_terminates_the_workers(tmp_path):
    pidfile = tmp_path / "child.pid"
    plan = fake(tmp_path, f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open({str(pidfile)!r}, "w").write(str(child.pid))
time.sleep(120)
""")

    def ctrl_c():
        if pidfile.exists():
            raise KeyboardInterrupt
        return False

    t0 = time.monotonic()
    res = run_workers(plan, output_dir=str(tmp_path / "out"), env=dict(os.environ), should_stop=ctrl_c,
                      poll_interval=0.2)
    assert res.interrupted and not res.ok
    assert not _alive(int(pidfile.read_text()))
    assert time.monotonic() - t0 < 30


def test_a_failing_reporter_never_ends_the_run(tmp_path, capsys):
    plan = fake(tmp_path, EVENTS + """
for step in range(1, 4):
    ev(event="progress", step=step, max_steps=3)
ev(event="result", stopped=False, adaptor_dir=None, final_model_dir="/x", metrics={})
""")

    def broken(step, max_steps):
        raise OSError("job file unwritable")

    res = run_workers(plan, output_dir=str(tmp_path / "out"), env=dict(os.environ), on_progress=broken)
    assert res.ok and res.step == 3 and res.result is not None
    assert capsys.readouterr().err.count("broken failed (OSError: job file unwritable)") == 1


@pytest.mark.slow
def test_launcher_dies_with_a_killed_app(tmp_path):
    """SIGKILL of the app process cannot be handled; the launcher then gets SIGTERM from the
    kernel (PR_SET_PDEATHSIG) so that torchrun still shuts its workers down."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    import signal
    import subprocess

    pidfile = tmp_path / "launcher.pid"
    worker = tmp_path / "launcher.py"
    worker.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    app_code = textwrap.dedent(f"""
        import sys
        from dllm_trainer.training.launcher import LaunchPlan, run_workers
        plan = LaunchPlan(argv=[sys.executable, {str(worker)!r}], env={{}}, num_processes=1, world_size=1, description="x")
        run_workers(plan, output_dir={str(tmp_path / 'out')!r}, env=None)
    """)
    app_proc = subprocess.Popen([sys.executable, "-c", app_code])
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert time.monotonic() < deadline and app_proc.poll() is None, "the fake launcher did not start"
            time.sleep(0.1)
        time.sleep(0.3)
        launcher_pid = int(pidfile.read_text())
        os.kill(app_proc.pid, signal.SIGKILL)
        app_proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(launcher_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(launcher_pid)
    finally:
        if app_proc.poll() is None:
            app_proc.kill()
        if pidfile.exists() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


STEPPING_WORKER = """
import os
stop = os.path.join({out!r}, "STOP")
ev(event="train_begin", max_steps=1000)
step = 0
while step < 600:
    time.sleep(0.05)  # the step in progress
    step += 1
    print("worker: finished step %d" % step, flush=True)
    ev(event="progress", step=step, max_steps=1000)
    if os.path.exists(stop):  # like StopFileCallback: checked at the end of each step
        break
ev(event="checkpoint", step=step, path="/x/checkpoint-%d" % step)
ev(event="result", stopped=True, adaptor_dir=None, final_model_dir=None, metrics={{}})
"""


def _press_ctrl_c(when):
    """SIGINT to this process (what a terminal sends on Ctrl-C) as soon as when() is true."""
    import signal
    import threading

    def run():
        deadline = time.monotonic() + 60
        while not when() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=run, daemon=True).start()


def test_ctrl_c_stops_like_the_stop_file(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    plan = fake(tmp_path, EVENTS + STEPPING_WORKER.format(out=str(out_dir)))
    steps = []
    _press_ctrl_c(lambda: len(steps) >= 5)
    res = run_workers(plan, output_dir=str(out_dir), env=dict(os.environ), poll_interval=0.2,
                      on_progress=lambda s, m: steps.append(s))
    out = capsys.readouterr().out
    assert res.ok and res.ctrl_c and res.stop_requested and not res.interrupted
    assert res.result["stopped"] is True and res.checkpoints == [f"/x/checkpoint-{res.step}"]
    lines = out.splitlines()
    said = next(i for i, ln in enumerate(lines) if ln.startswith("[dllm] Ctrl-C: the workers stop after the step in progress"))
    # the STOP file is written before the message: at most the step in progress ends after it
    finished_after = [ln for ln in lines[said:] if ln.startswith("worker: finished step")]
    assert len(finished_after) <= 1, lines[said:]
    assert lines[-1] == f"[dllm] checkpoint saved: /x/checkpoint-{res.step}"
    assert not (out_dir / "STOP").exists()


def test_ctrl_c_before_the_first_step_stops_at_once(tmp_path, capsys):
    ready = tmp_path / "ready"
    plan = fake(tmp_path, f"""
open({str(ready)!r}, "w").write("loading")
import time
time.sleep(120)  # still loading the model: no train_begin yet
""")
    _press_ctrl_c(ready.exists)
    t0 = time.monotonic()
    res = run_workers(plan, output_dir=str(tmp_path / "out"), env=dict(os.environ), poll_interval=0.2)
    assert res.interrupted and res.ctrl_c and time.monotonic() - t0 < 30
    assert "before the first training step" in capsys.readouterr().err
