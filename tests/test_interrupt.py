"""Ctrl-C end to end: a real `comptrust evaluate` / `comptrust study` on the embedded model, interrupted the way a
terminal does it (SIGINT to the whole process group) once work has been committed.

What a user must be able to count on: exit 130 within seconds, one line on stderr (no traceback, no "Exception
ignored"), nothing committed lost, no temp file left, and a rerun that generates only what was never committed.
Run these under the model lock (flock /tmp/comptrust-model.lock pytest -m model tests/test_interrupt.py).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

INTERRUPTED_LINE = "interrupted: finished work is saved; rerun the same command to resume"
EXIT_WITHIN_S = 15.0  # from SIGINT to the process gone (the interpreter's own teardown included), under load
PERSPECTIVES = "mmlu,ethics"  # --limit 1: 4 + 12 short-answer prompts, one committed chunk each (chunk size 1)


def _env() -> dict[str, str]:
    return {**os.environ, "COMPTRUST_CHUNK_SIZE": "1", "COLUMNS": "200"}


def _count(db: Path, sql: str) -> int:
    if not db.is_file():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute(sql).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # not created yet / being created
        return 0


class _Run:
    """A comptrust subprocess in its own process group (as a shell starts a foreground job), stderr collected."""

    def __init__(self, args: list[str], cwd: Path, sigint_ignored: bool = False):
        def setup() -> None:
            os.setsid()
            if sigint_ignored:  # what a non-interactive shell gives a background job (`cmd &`, make test &)
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        self.proc = subprocess.Popen([sys.executable, "-m", "comptrust", *args], cwd=cwd, env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=setup)
        self.err: list[str] = []
        self.out: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stderr, self.err), (self.proc.stdout, self.out))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, cond, what: str, timeout: float = 600) -> None:
        t0 = time.time()
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"exited {self.proc.returncode} before {what}: {self.stderr()[-3000:]}")
            if time.time() - t0 > timeout:
                self.kill()
                pytest.fail(f"no {what} within {timeout} s: {self.stderr()[-3000:]}")
            time.sleep(0.1)

    def ctrl_c(self) -> float:
        """SIGINT to the process group, as the terminal sends it on Ctrl-C; returns the seconds until it was gone."""
        t0 = time.time()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {EXIT_WITHIN_S} s after Ctrl-C: {self.stderr()[-3000:]}")
        for t in self._threads:
            t.join(10)
        return time.time() - t0

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stderr(self) -> str:
        return "".join(self.err)

    def group_gone(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False


def _assert_one_line_interrupt(run: _Run, secs: float) -> None:
    err = run.stderr()
    assert run.proc.returncode == 130, err[-3000:]
    assert secs < EXIT_WITHIN_S, (secs, err[-3000:])
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1] == INTERRUPTED_LINE, err[-3000:]
    assert sum(INTERRUPTED_LINE in ln for ln in lines) == 1, err[-3000:]
    deadline = time.time() + 5  # children of the run (a llama.cpp server, workers) go with it
    while not run.group_gone() and time.time() < deadline:
        time.sleep(0.1)
    assert run.group_gone(), "a process of the interrupted run's group is still alive"


def _leftovers(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name)


def _integrity(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def test_ctrl_c_during_evaluate_keeps_committed_work_and_resumes(tmp_path):
    out = tmp_path / "out"
    db = out / "comptrust.sqlite"
    args = ["evaluate", "-p", PERSPECTIVES, "--limit", "1", "--out", "out"]
    run = _Run(args, tmp_path)
    # after the first committed chunk, while the next prompts generate (a progress line has been shown)
    run.wait_for(lambda: _count(db, "SELECT COUNT(*) FROM generations") >= 1, "a committed chunk")
    run.wait_for(lambda: any("prompts (" in ln for ln in run.err), "a progress line", timeout=60)
    before = _count(db, "SELECT COUNT(*) FROM generations")
    secs = run.ctrl_c()
    _assert_one_line_interrupt(run, secs)
    committed = _count(db, "SELECT COUNT(*) FROM generations")
    assert before <= committed, (before, committed, run.stderr()[-2000:])  # nothing committed lost
    assert _integrity(db) == "ok"
    assert _leftovers(out) == []
    assert not (out / "scores.json").exists()  # the run did not finish: no result files pretend it did

    again = subprocess.run([sys.executable, "-m", "comptrust", *args], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    m = re.search(r"generated (\d+) prompts .*?, (\d+) cache hits", again.stdout)
    assert m, again.stdout[-2000:]
    # the rerun generated exactly what was never committed, and took the committed rest from the store
    total = _count(db, "SELECT COUNT(*) FROM generations")
    assert committed < total, (committed, total)  # the interrupt came before the end
    assert (int(m.group(1)), int(m.group(2))) == (total - committed, committed), again.stdout[-2000:]
    assert (out / "scores.json").is_file() and _leftovers(out) == []


STUDY = """\
perspectives: [mmlu]
limit: 1
bootstrap: 100
variants:
  - dense
  - {method: magnitude, structure: "2:4"}
"""


def test_ctrl_c_during_a_study_compression_stops_it_and_resumes(tmp_path):
    """Started the way a script starts a background job: SIGINT ignored on entry. Python keeps an inherited
    SIG_IGN (it installs its KeyboardInterrupt handler only over SIG_DFL), so before cli.main installed its own
    handler this study ignored the Ctrl-C, ran on and exited 0 (the swallowed Ctrl-C of issue 21)."""
    (tmp_path / "study.yaml").write_text(STUDY)
    out = tmp_path / "out"
    db = out / "comptrust.sqlite"
    args = ["study", "study.yaml", "--out", "out", "--no-progress"]
    run = _Run(args, tmp_path, sigint_ignored=True)
    # the dense model's evaluation is committed; magnitude's compression is running
    run.wait_for(lambda: any(ln.startswith("[study] compress magnitude-2of4") for ln in run.err), "the compression")
    run.wait_for(lambda: any(ln.startswith("[compress] perplexity before") for ln in run.err),
                 "the compression's first measurement", timeout=300)
    done = _count(db, "SELECT COUNT(*) FROM units WHERE status = 'done'")
    gens = _count(db, "SELECT COUNT(*) FROM generations")
    assert done >= 1 and gens == 4, (done, gens)
    secs = run.ctrl_c()
    _assert_one_line_interrupt(run, secs)
    assert _count(db, "SELECT COUNT(*) FROM units WHERE status = 'done'") == done  # the dense unit is kept
    assert _count(db, "SELECT COUNT(*) FROM generations") == gens
    assert _integrity(db) == "ok"
    assert _leftovers(tmp_path) == []  # no half checkpoint (.partial-*) and no temp file
    assert not (out / "models" / "magnitude-2of4@s0").exists()

    again = subprocess.run([sys.executable, "-m", "comptrust", *args], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "evaluate dense" not in again.stderr  # committed before the interrupt: not evaluated again
    assert "compress magnitude-2of4" in again.stderr and "evaluate magnitude-2of4" in again.stderr
    assert _count(db, "SELECT COUNT(*) FROM generations") == 2 * gens
    assert (out / "models" / "magnitude-2of4@s0").is_dir() and _leftovers(tmp_path) == []
