"""Shared fixtures. Data from ../shared/data is read in place, never copied."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before anything imports torch (see comptrust/__init__)
# Under pytest-xdist (`make test PYTEST_ARGS="-q -n 2 --dist loadgroup"`) each worker gets its share of the cores, and so do the CLI
# subprocesses it starts (they inherit the variable; comptrust.cpu.cpu_threads() reads it). Two workers at all
# cores each would put 4 threads on 2 cores, where every OpenMP barrier waits for a descheduled thread.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
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
    # the test home outlives a run: a study test must not find checkpoints or generations that an earlier run (or
    # another test) left in its study cache, or its counts and timings would depend on the order tests ran in.
    # tests/study/test_reuse.py turns it on in a home of its own.
    os.environ.setdefault("COMPTRUST_STUDY_CACHE", "off")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("COMPTRUST_REQUIRE_LLAMACPP") == "1" and not hasattr(config, "workerinput"):
        # CI sets this: there the served-GGUF tests (a real llama.cpp server) must run, never skip silently
        from comptrust.engine.llamacpp import llama_cpp_available

        why = llama_cpp_available()
        if why:
            pytest.exit(f"error: COMPTRUST_REQUIRE_LLAMACPP=1 but llama.cpp cannot be served: {why}", returncode=1)


# Modules whose tests run longest, first: pytest-xdist hands out whole modules in collection order (--dist
# loadscope/loadgroup), so a long module taken last would leave one core idle at the end. The order only schedules;
# every test still runs. Measured with `pytest --durations=0` (see Makefile); a module not named here keeps its
# place after these.
LONG_FIRST = (
    "tests/study/test_study_e2e.py",
    "tests/study/test_crash.py",
    "tests/study/test_gguf_study.py",
    "tests/compress/test_methods.py",
    "tests/test_openai_engine.py",
    "tests/compress/test_cli.py",
    "tests/test_cli.py",
    "tests/test_bad_input.py",
    "tests/test_engine.py",
    "tests/test_fidelity.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Long modules first (stable: the order within a module is kept), each module one xdist group, so that its
    module-scoped fixtures (a model, a finished study) are built once, by one worker."""
    rank = {m: i for i, m in enumerate(LONG_FIRST)}

    def module_of(item) -> str:
        p = Path(str(item.fspath)).resolve()
        return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else p.as_posix()

    items.sort(key=lambda it: rank.get(module_of(it), len(rank)))
    if config.pluginmanager.hasplugin("xdist"):
        for it in items:
            if not any(m.name == "xdist_group" for m in it.iter_markers()):
                it.add_marker(pytest.mark.xdist_group(module_of(it)))
