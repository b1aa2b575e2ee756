"""CPU worker settings chosen at launch (training/cpu.py): threads and OpenMP waiting."""
import os
import subprocess
import sys
import time

import pytest

from dllm_trainer.config import TrainConfig
from dllm_trainer.training.cpu import SPIN_COUNT, choose_threads, cpu_worker_env, idle_cores
from dllm_trainer.training.launcher import build_launch


def test_threads_are_the_idle_cores_shared_among_workers():
    assert choose_threads({}, workers=1, idle=8.0, cores=8) == 8
    assert choose_threads({}, workers=2, idle=8.0, cores=8) == 4
    assert choose_threads({}, workers=1, idle=1.1, cores=8) == 1  # six busy cores
    assert choose_threads({}, workers=1, idle=0.0, cores=8) == 1  # never 0
    assert choose_threads({"OMP_NUM_THREADS": "3"}, workers=1, idle=8.0, cores=8) == 3
    assert choose_threads({"DLLM_CPU_THREADS": "5", "OMP_NUM_THREADS": "3"}, workers=1, idle=0.0, cores=8) == 5


def test_a_quiet_machine_spins_briefly_a_busy_one_sleeps(monkeypatch):
    monkeypatch.setattr("dllm_trainer.training.cpu.usable_cores", lambda: list(range(4)))
    quiet = cpu_worker_env({}, workers=1, idle=3.9)
    assert quiet["DLLM_CPU_THREADS"] == quiet["OMP_NUM_THREADS"] == "4"
    assert quiet["GOMP_SPINCOUNT"] == SPIN_COUNT and "OMP_WAIT_POLICY" not in quiet
    busy = cpu_worker_env({}, workers=1, idle=2.0)  # two cores taken by other work
    assert busy["DLLM_CPU_THREADS"] == "2"
    assert busy["GOMP_SPINCOUNT"] == SPIN_COUNT  # 2 threads fit the 2 idle cores
    loaded = cpu_worker_env({"OMP_NUM_THREADS": "4"}, workers=1, idle=2.0)  # the user asked for 4
    assert loaded["DLLM_CPU_THREADS"] == "2" and "OMP_NUM_THREADS" not in loaded
    two_workers = cpu_worker_env({"DLLM_CPU_THREADS": "2"}, workers=2, idle=2.0)  # 4 threads on 2 idle cores
    assert two_workers["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in two_workers
    one = cpu_worker_env({}, workers=1, idle=0.3)
    assert one["DLLM_CPU_THREADS"] == "1" and one["OMP_WAIT_POLICY"] == "PASSIVE"


def test_settings_the_user_exported_are_kept(monkeypatch):
    monkeypatch.setattr("dllm_trainer.training.cpu.usable_cores", lambda: list(range(4)))
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": ""}, {"GOMP_SPINCOUNT": "0"}):
        env = cpu_worker_env(user, workers=1, idle=4.0)
        assert env["DLLM_CPU_THREADS"] == "4"
        assert "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env


def test_the_launcher_passes_them_to_cpu_workers_only():
    cfg = TrainConfig.from_dict({"model_name": "m", "dataset_name": "d.jsonl", "train_device": "cpu"})
    plan = build_launch(cfg, "c.json", base_env={}, idle_cpus=0.0)
    assert plan.env["DLLM_CPU_THREADS"] == "1" and plan.env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert plan.description.endswith("1 thread each")
    cuda = TrainConfig.from_dict({"model_name": "m", "dataset_name": "d.jsonl", "train_device": "cuda"})
    plan = build_launch(cuda, "c.json", base_env={}, gpu_count=1)
    assert not any(k in plan.env for k in ("DLLM_CPU_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/stat"), reason="Linux only")
def test_a_busy_core_does_not_count_as_idle():
    core = sorted(os.sched_getaffinity(0))[-1]
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        time.sleep(0.5)
        assert idle_cores([core], sample_s=0.5) < 0.5
    finally:
        spin.kill()
        spin.wait()
