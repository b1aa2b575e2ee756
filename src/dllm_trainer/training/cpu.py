"""CPU workers: how many threads, and how idle OpenMP threads wait.

OpenMP reads its settings when a process starts, so the launcher chooses them once,
for the machine as it is at launch (`cpu_worker_env`), and passes them to every CPU worker:

- threads (DLLM_CPU_THREADS / OMP_NUM_THREADS): the cores this job may use that other work
  leaves idle now, shared among the local workers. More threads than idle cores stall every op
  on a descheduled thread (measured 4x slower per step at the bench size on a loaded 2-core box).
- waiting: with idle cores for every thread, OpenMP threads spin briefly between ops
  (GOMP_SPINCOUNT=3000) instead of sleeping at once (OMP_WAIT_POLICY=PASSIVE), which paid a
  futex wake-up per op: 0.23 vs 0.32 s per step of the bench model on a quiet 2-core box. With a
  busy process beside it, spinning cost 1.2x (3000) to 1.85x (libgomp's default 300000) against
  PASSIVE, so a machine that is busy at launch gets PASSIVE.

A setting the user exported is kept as it is. `default_cpu_threads` makes the same thread choice
inside a process that was not started by the launcher.
"""
from __future__ import annotations

import os
import time
from typing import Mapping

SPIN_COUNT = "3000"


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cpu_times(cores: set[int]) -> dict[int, tuple[int, int]]:
    """(idle + iowait, total) jiffies per core in ``cores`` from /proc/stat."""
    out = {}
    with open("/proc/stat", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *fields = line.split()
                core = int(name[3:])
                if core in cores:
                    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                    out[core] = (values[3] + values[4], sum(values))
    return out


def idle_cores(cores: list[int] | None = None, sample_s: float = 0.2) -> float:
    """How many of ``cores`` are idle now: /proc/stat sampled over ``sample_s`` seconds (a load
    average lags a minute behind, e.g. behind a job that just ended); elsewhere the cores minus
    the 1-minute load average."""
    cores = usable_cores() if cores is None else cores
    try:
        before = _cpu_times(set(cores))
        time.sleep(sample_s)
        after = _cpu_times(set(cores))
    except (OSError, ValueError):
        before = after = {}
    if after:
        idle = 0.0
        for core, (idle_after, total_after) in after.items():
            idle_before, total_before = before.get(core, (idle_after, total_after))
            total = total_after - total_before
            idle += (idle_after - idle_before) / total if total > 0 else 1.0
        return idle
    try:
        return max(0.0, len(cores) - os.getloadavg()[0])
    except OSError:
        return float(len(cores))


def explicit_threads(env: Mapping[str, str]) -> int | None:
    """DLLM_CPU_THREADS when set to a positive number, else None."""
    value = env.get("DLLM_CPU_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def choose_threads(env: Mapping[str, str], workers: int, idle: float, cores: int) -> int:
    """Threads per worker: DLLM_CPU_THREADS if set (exact); else the cores shared among the local
    workers, capped by OMP_NUM_THREADS when set and by the idle cores; at least 1."""
    explicit = explicit_threads(env)
    if explicit:
        return explicit
    workers = max(1, workers)
    share = max(1, cores // workers)
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        share = min(share, int(omp))
    return max(1, min(share, int(idle / workers + 0.5)))


def cpu_worker_env(base_env: Mapping[str, str], workers: int, idle: float | None = None) -> dict[str, str]:
    """Variables for ``workers`` local CPU worker processes (see the module docstring). ``idle``
    (idle cores now) is measured when not given."""
    cores = usable_cores()
    idle = idle_cores(cores) if idle is None else idle
    threads = choose_threads(base_env, workers, idle, len(cores))
    env = {"DLLM_CPU_THREADS": str(threads)}
    if "OMP_NUM_THREADS" not in base_env:
        env["OMP_NUM_THREADS"] = str(threads)
    if "OMP_WAIT_POLICY" not in base_env and "GOMP_SPINCOUNT" not in base_env:
        if threads > 1 and workers * threads <= idle + 0.5:
            env["GOMP_SPINCOUNT"] = SPIN_COUNT
        else:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def default_cpu_threads(local_workers: int | None = None) -> int:
    """Intra-op threads for CPU training in this process (``choose_threads`` for the machine now;
    the launcher has usually decided already and passed DLLM_CPU_THREADS)."""
    env = os.environ
    explicit = explicit_threads(env)
    if explicit:  # without sampling the cores for 0.2 s
        return explicit
    cores = usable_cores()
    workers = local_workers or int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    return choose_threads(env, workers, idle_cores(cores), len(cores))
