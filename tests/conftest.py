"""Shared fixtures. Data from ../shared/data is read in place, never copied."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before anything imports torch (see comptrust/__init__)
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPTRUST_SHARED_DATA", ROOT.parent / "shared" / "data"))
DT_DATA = SHARED / "decodingtrust"
MMLU_DATA = SHARED / "mmlu"
MINI = ROOT / "src" / "comptrust" / "suites" / "mini"


@pytest.fixture
def dt_data() -> Path:
    if not DT_DATA.is_dir():
        pytest.skip(f"shared DecodingTrust data not found at {DT_DATA}")
    return DT_DATA


@pytest.fixture
def mmlu_data() -> Path:
    if not MMLU_DATA.is_dir():
        pytest.skip(f"shared MMLU data not found at {MMLU_DATA}")
    return MMLU_DATA


@pytest.fixture
def mini_data() -> Path:
    return MINI


def pytest_configure(config):
    """Keep caches out of the user's home, but share the converted embedded model across test runs.

    Set for the whole session (module-scoped fixtures resolve models before function fixtures run).
    """
    home = os.environ.get("COMPTRUST_TEST_HOME") or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"comptrust-test-home-{os.getuid()}"
    )
    os.environ["COMPTRUST_HOME"] = home
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
