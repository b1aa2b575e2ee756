"""The bench scripts run end to end at toy sizes and report what their docstrings promise.

These are smoke tests of the measuring code (output format, JSON fields, invariants that hold
at any size); they assert nothing about speed.
"""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )


def test_sampling_bench_pools_agreement_over_prompts(tmp_path):
    out = tmp_path / "sampling.json"
    proc = run_bench(
        "bench_sampling.py", "--threads", "1", "--out", str(out),
        "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--vocab", "128",
        "--fit-steps", "3", "--prompt-length", "8", "--gen-length", "32", "--block-length", "16",
        "--steps", "32", "--prompts", "3",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"sample_speedup=(\d+\.\d\d) agreement=(\d\.\d\d\d)", last)
    assert m, last
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"vanilla", "prefix", "dual", "threshold", "threshold_prefix", "threshold_dual"}
    assert res["vanilla"]["agreement"] == 1.0 and res["vanilla"]["speedup"] == 1.0
    # vanilla decodes one token per step: steps forwards for each of the 3 prompts
    assert res["vanilla"]["nfe"] == 3 * 32
    for name, r in res.items():
        per_prompt = r["agreement_per_prompt"]
        assert len(per_prompt) == 3
        # pooled agreement over equal-length prompts is the mean of the per-prompt values
        assert r["agreement"] == pytest.approx(sum(per_prompt) / 3)
        assert r["agreement_min"] == min(per_prompt)
    assert float(m.group(2)) == pytest.approx(res["threshold_dual"]["agreement"], abs=5e-4)
    assert report["settings"]["prompts"] == 3


def test_sampling_bench_rejects_zero_prompts(tmp_path):
    proc = run_bench("bench_sampling.py", "--prompts", "0", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert "--prompts" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_train_bench_reports_ratios(tmp_path):
    out = tmp_path / "train.json"
    proc = run_bench(
        "bench_train.py", "--threads", "1", "--out", str(out), "--d-model", "32", "--layers", "1",
        "--heads", "2", "--mlp", "64", "--vocab", "256", "--max-length", "64", "--min-length", "8",
        "--median-length", "24", "--batch-size", "4", "--steps", "1", "--repeats", "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"train_speedup=(\d+\.\d+) memory_ratio=(\d+\.\d+)", last)
    assert m, last
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert set(summary) == {"baseline", "packed"}
    # the printed ratios are the JSON's, computed from the two variants' medians
    assert report["train_speedup"] == pytest.approx(summary["packed"]["tokens_per_s"] / summary["baseline"]["tokens_per_s"])
    assert report["memory_ratio"] == pytest.approx(summary["packed"]["peak_mib"] / summary["baseline"]["peak_mib"])
    assert float(m.group(1)) == pytest.approx(report["train_speedup"], abs=5e-3)
    assert float(m.group(2)) == pytest.approx(report["memory_ratio"], abs=5e-3)
    # both variants trained on the same rows: the same count of trainable tokens
    assert report["runs"]["baseline"][0]["trainable_tokens"] == report["runs"]["packed"][0]["trainable_tokens"]


def test_startup_bench_reports_the_three_figures(tmp_path):
    out = tmp_path / "startup.json"
    proc = run_bench("bench_startup.py", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"help_s=(\d+\.\d\d) bad_config_s=(\d+\.\d\d) first_step_s=(\d+\.\d\d) import_torch_s=(\d+\.\d\d)", last)
    assert m, last
    report = json.loads(out.read_text())
    med = report["median_s"]
    assert set(med) == {"import_torch", "this:help", "this:bad_config", "this:first_step"}
    assert float(m.group(3)) == pytest.approx(med["this:first_step"], abs=5e-3)
    assert report["ratio_to_import_torch"]["this:help"] == pytest.approx(med["this:help"] / med["import_torch"])
