"""The side-by-side bench (bench_train.py WORKLOAD --baseline dllm-recipe) at toy size.

It builds its own tiny workload (the llada-tiny fixture + the tiny tokenizer + a few
prompt/completion rows, the layout make_workload.py writes), so a bare clone needs nothing
outside the repository. Smoke test of the measuring code; it asserts nothing about speed.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.slow


def write_tiny_workload(out, fixture, rows=48):
    model = out / "model"
    model.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture / name, model / name)
    make_tiny_tokenizer().save_pretrained(str(model))
    words = ["cat", "dog", "tree", "blue", "runs", "fast", "and", "the"]
    with open(out / "data.jsonl", "w") as fh:
        for i in range(rows):
            prompt = " ".join(words[(i + k) % 8] for k in range(2 + i % 3))
            completion = " ".join(words[(i * 3 + k) % 8] for k in range(1 + i % 5))
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def test_side_by_side_reports_ratios_of_step_differences(tmp_path, llada_tiny):
    wl = tmp_path / "wl"
    write_tiny_workload(wl, llada_tiny)
    out = tmp_path / "sbs.json"
    env = {k: v for k, v in os.environ.items() if k not in ("DLLM_SRC", "DLLM_WORKLOAD_TOOL")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_train.py"), str(wl), "--baseline", "dllm-recipe",
         "--steps", "4,2", "--threads", "1", "--batch-size", "4", "--max-length", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"speedup_vs_dllm_recipe=(-?\d+\.\d\d) memory_ratio_vs_dllm_recipe=(\d+\.\d\d)", last)
    assert m, last
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert set(summary) == {"ours", "dllm-recipe"}  # no DLLM_SRC: no real dllm run
    for side in ("ours", "dllm-recipe"):
        runs = report["runs"][side]
        assert sorted(r["steps"] for r in runs) == [2, 4]
        assert all(r["global_step"] == r["steps"] for r in runs)
        by = {r["steps"]: r for r in runs}
        # s/step is the difference of the two runs' wall clocks over the 2 extra steps
        assert summary[side]["s_per_step"] == pytest.approx((by[4]["wall_s"] - by[2]["wall_s"]) / 2)
        assert summary[side]["peak_rss_mib"] == by[4]["peak_rss_mib"] > 0
        prof = summary[side]["profile_s_per_step"]
        assert prof["forward"] > 0 and prof["backward"] > 0 and prof["head_ce"] > 0
        assert {"data", "noise", "optimizer", "logging", "checkpoint", "other"} <= set(prof)
        assert all(r["threads"] == 1 for r in runs)
    ratio = summary["dllm-recipe"]["s_per_step"] / summary["ours"]["s_per_step"]
    assert float(m.group(1)) == pytest.approx(ratio, abs=5e-3)
    assert report["memory_ratio_vs_dllm_recipe"] == pytest.approx(
        summary["ours"]["peak_rss_mib"] / summary["dllm-recipe"]["peak_rss_mib"])
    # the recipe computes the full padded batch; ours (length-grouped) never more
    assert summary["dllm-recipe"]["tokens_computed_per_step"] >= summary["ours"]["trainable_tokens_per_step"]
    assert report["settings"]["threads"] == 1 and report["workload"]["rows"] == 48


def test_side_by_side_refuses_a_missing_workload_without_a_generator(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DLLM_WORKLOAD_TOOL"}
    env["DLLM_WORKLOAD_TOOL"] = str(tmp_path / "nope.py")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_train.py"), str(tmp_path / "missing"), "--baseline",
         "dllm-recipe"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr and "DLLM_WORKLOAD_TOOL" in proc.stderr


def test_side_by_side_on_a_gpu_says_when_there_is_none(tmp_path, llada_tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    wl = tmp_path / "wl"
    write_tiny_workload(wl, llada_tiny)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_train.py"), str(wl), "--baseline", "dllm-recipe", "--device", "cuda"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "--device cuda: this machine has no CUDA device torch can use"


def test_mfu_counts_six_flops_per_parameter_and_position(llada_tiny):
    sys.path.insert(0, str(REPO / "bench"))
    import side_by_side
    from transformers import AutoModel

    import dllm_trainer.models  # noqa: F401 - registers our LLaDA with AutoModel

    model = AutoModel.from_pretrained(str(llada_tiny))
    n = sum(p.numel() for p in model.parameters())
    assert side_by_side.count_parameters(llada_tiny) == n
    # 1e9 parameters, 4096 positions in 0.5 s: 4.9152e13 FLOP/s of a 989 TFLOP/s peak
    assert side_by_side.model_flops_utilization(10**9, 4096, 0.5, 989.0) == pytest.approx(6 * 4096 / 0.5 / 989e3)
