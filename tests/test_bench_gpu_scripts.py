"""bench/gpu/: the prepared GPU side by side (issue 18). The scripts need package downloads
(prepare.sh) and a GPU machine (run.sh); a dry run of both on this CPU box is in their headers and
bench/README.md. Here: they parse, and each refuses what it cannot use before doing any work."""
import shutil
import subprocess

from conftest import REPO

GPU = REPO / "bench" / "gpu"


def test_the_gpu_scripts_parse():
    for script in ("prepare.sh", "run.sh"):
        proc = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def _copy_scripts(tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copytree(GPU, tmp_path / "bench" / "gpu")
    return tmp_path / "bench" / "gpu"


def test_run_without_the_prepared_folder_says_what_to_do(tmp_path):
    gpu = _copy_scripts(tmp_path)
    proc = subprocess.run(["bash", str(gpu / "run.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}, timeout=60)
    assert proc.returncode == 2
    assert "run bash bench/gpu/prepare.sh first" in proc.stdout
    assert (tmp_path / "out" / "gpu_run.log").read_text().count("prepare.sh first") == 1


def test_prepare_refuses_a_folder_that_is_not_a_dllm_checkout_before_downloading(tmp_path):
    gpu = _copy_scripts(tmp_path)
    not_dllm = tmp_path / "not-dllm"
    not_dllm.mkdir()
    proc = subprocess.run(["bash", str(gpu / "prepare.sh"), str(not_dllm)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 2
    assert f"DLLM_SRC={not_dllm} is not a dllm checkout" in proc.stderr
    assert not (tmp_path / ".gpu").exists()  # nothing removed, nothing downloaded
