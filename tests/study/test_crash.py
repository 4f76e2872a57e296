"""kill -9 at several points of a real study; every rerun finishes with the results of an uninterrupted run.

Kill points: during a compression (random moment), inside the store's transaction that commits a chunk of
generations and inside the one that records a unit (failpoints, at randomly drawn passes), and at a random
moment of the run. After each kill the same command is rerun to completion.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

STUDY = """\
perspectives: [stereotype, ethics]
limit: 1
bootstrap: 50
variants:
  - dense
  - {method: magnitude, structure: "2:4"}
"""
RNG = random.Random(20261125)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COMPTRUST_CHUNK_SIZE": "4", **extra}  # several chunks per model: kills land mid-model


def _run(d: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comptrust", "study", "study.yaml", "--out", "out", "--no-progress"],
                          cwd=d, capture_output=True, text=True, timeout=900, env=_env(**env))


def _rows(d: Path) -> dict[str, int]:
    db = sqlite3.connect(d / "out" / "comptrust.sqlite")
    try:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("generations", "units")}
    finally:
        db.close()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    (d / "study.yaml").write_text(STUDY)
    p = _run(d)
    assert p.returncode == 0, p.stderr[-3000:]
    return d


def _resume_and_compare(d: Path, baseline: Path) -> None:
    p = _run(d)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (d / "out" / "results.csv").read_text() == (baseline / "out" / "results.csv").read_text()
    assert _rows(d) == _rows(baseline)  # same generations and units: nothing duplicated, nothing partial
    db = sqlite3.connect(d / "out" / "comptrust.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


@pytest.mark.parametrize("failpoint", ["store.put_generations", "store.put_unit"])
def test_kill_inside_a_store_commit(baseline, tmp_path, failpoint):
    (tmp_path / "study.yaml").write_text(STUDY)
    k = RNG.randint(1, 6)
    p = _run(tmp_path, COMPTRUST_FAILPOINT=f"{failpoint}@{k}")
    assert p.returncode == -signal.SIGKILL, f"failpoint {failpoint}@{k} not reached: {p.stderr[-2000:]}"
    _resume_and_compare(tmp_path, baseline)


def _kill_when(d: Path, marker: str, delay: float) -> str:
    proc = subprocess.Popen([sys.executable, "-m", "comptrust", "study", "study.yaml", "--out", "out", "--no-progress"],
                            cwd=d, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env())
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            proc.kill()
            break
    proc.wait(timeout=60)
    return "".join(seen)


def test_kill_during_compression_leaves_no_checkpoint_treated_as_done(baseline, tmp_path):
    (tmp_path / "study.yaml").write_text(STUDY)
    log = _kill_when(tmp_path, "[study] compress magnitude-2of4@s0", RNG.uniform(0.5, 4.0))
    assert "compress magnitude" in log
    models = tmp_path / "out" / "models"
    assert not (models / "magnitude-2of4@s0" / "comptrust.json").exists()
    st = subprocess.run([sys.executable, "-m", "comptrust", "study", "--status", "out"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert "compress:magnitude-2of4@s0" in st.stdout and "pending" in st.stdout
    _resume_and_compare(tmp_path, baseline)
    assert not list(models.glob(".*partial*"))  # the killed run's temp dir was cleaned up by the rerun


def test_kill_at_a_random_moment(baseline, tmp_path):
    (tmp_path / "study.yaml").write_text(STUDY)
    _kill_when(tmp_path, "[study] 5 units", RNG.uniform(2.0, 25.0))  # first line; then a random moment
    _resume_and_compare(tmp_path, baseline)
