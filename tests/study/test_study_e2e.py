"""A real study with the embedded model: compress, evaluate, a variant that fails, resume after Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

STUDY = """\
perspectives: [stereotype, ethics]
limit: 1
bootstrap: 100
variants:
  - dense
  - {method: magnitude, structure: "2:4"}
  - {name: broken, method: gptq, bits: 4, calibration: /nonexistent/calib.jsonl}
"""


def _cli(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comptrust", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    (d / "study.yaml").write_text(STUDY)
    t0 = time.time()
    p = _cli("study", "study.yaml", "--out", "out", "--no-progress", cwd=d)
    return d, p, time.time() - t0


def test_study_runs_records_failures_and_reports(finished):
    d, p, secs = finished
    assert p.returncode == 0, p.stderr[-3000:]
    out = d / "out"
    for name in ("report.html", "results.csv", "results.json", "comptrust.sqlite", "study.json"):
        assert (out / name).is_file(), name
    assert (out / "models" / "magnitude-2of4@s0" / "comptrust.json").is_file()
    doc = json.loads((out / "results.json").read_text())
    units = {u["unit"]: u for u in doc["units"]}
    assert units["compress:broken@s0"]["status"] == "failed"
    assert "nonexistent" in units["compress:broken@s0"]["error"]
    assert units["eval:broken@s0:ethics"]["status"] == "blocked"
    assert units["eval:magnitude-2of4@s0:stereotype"]["status"] == "done"
    v = doc["analysis"]["variants"]
    for name in ("dense", "magnitude-2of4"):
        for pname in ("stereotype", "ethics"):
            cell = v[name]["perspectives"][pname]
            assert 0 <= cell["mean"] <= 100 and cell["n_items"] > 0
    assert v["magnitude-2of4"]["perspectives"]["ethics"]["p_value"] is not None
    assert "broken" in doc["analysis"]["recommendation"]["rejected"]
    assert "FAILED compress broken@s0" in p.stderr
    html = (out / "report.html").read_text()
    assert "broken" in html and doc["analysis"]["recommendation"]["text"][:40] in html
    # the summary table is printed
    assert "study results" in p.stdout and "report:" in p.stdout


def test_status_and_rerun_skip_done_units(finished):
    d, p, _ = finished
    s = _cli("study", "--status", "out", cwd=d)
    assert s.returncode == 0, s.stderr
    assert "compress:broken@s0" in s.stdout and "failed" in s.stdout and "blocked" in s.stdout
    before = (d / "out" / "results.csv").read_text()
    again = _cli("study", "study.yaml", "--out", "out", "--no-progress", cwd=d)
    assert again.returncode == 0, again.stderr[-2000:]
    # only the failed compression is retried (and fails again); nothing is evaluated or compressed anew
    assert "evaluate " not in again.stderr and "compress magnitude" not in again.stderr
    assert "compress broken@s0" in again.stderr
    assert (d / "out" / "results.csv").read_text() == before
    r = _cli("report", "out", cwd=d)
    assert r.returncode == 0 and (d / "out" / "results.csv").read_text() == before


def test_ctrl_c_then_resume_gives_the_same_results(finished, tmp_path):
    d, _, _ = finished
    (tmp_path / "study.yaml").write_text(STUDY)
    proc = subprocess.Popen([sys.executable, "-m", "comptrust", "study", "study.yaml", "--out", "out", "--no-progress"],
                            cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # interrupt once the dense model's units are committed, while magnitude compresses
        lines.append(line)
        if line.startswith("[study] compress magnitude-2of4"):
            time.sleep(2)
            proc.send_signal(signal.SIGINT)
            break
    rest_err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, "".join(lines) + rest_err
    assert "rerun the same command to resume" in rest_err
    assert not (tmp_path / "out" / "models" / "magnitude-2of4@s0").exists()  # no half checkpoint left as done
    p = _cli("study", "study.yaml", "--out", "out", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "evaluate dense" not in p.stderr  # dense was done before the interrupt
    assert (tmp_path / "out" / "results.csv").read_text() == (d / "out" / "results.csv").read_text()


def test_ray_executor_matches_local_and_retries_a_killed_worker(finished, tmp_path):
    pytest.importorskip("ray")
    d, _, _ = finished
    (tmp_path / "study.yaml").write_text(STUDY)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "comptrust", "study", "study.yaml", "--out", "out", "--no-progress",
         "--executor", "ray", "--workers", "2"],
        cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    killed = None
    lines = []
    for line in proc.stderr:  # kill the first evaluation worker mid-unit (while it loads or generates)
        lines.append(line)
        if killed is None and "(eval_task pid=" in line:
            killed = int(line.split("(eval_task pid=")[1].split(")")[0])
            os.kill(killed, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    err = "".join(lines)
    assert proc.returncode == 0, err[-3000:]
    assert killed is not None, err[-3000:]
    # Ray re-ran the unit: every evaluation is done and the numbers equal the local executor's
    assert "worker failed" not in err
    assert (tmp_path / "out" / "results.csv").read_text() == (d / "out" / "results.csv").read_text()


def test_worker_pool_retries_a_killed_worker_stops_on_ctrl_c_and_resumes(finished, tmp_path):
    """--workers 2: units in two worker processes. A worker killed mid-evaluation is replaced and its unit rerun;
    Ctrl-C stops the study and its workers, keeping what was recorded; the resumed study's results equal the
    in-process executor's (one thread per unit in both: the suite runs with OMP_NUM_THREADS=1)."""
    d, _, _ = finished
    (tmp_path / "study.yaml").write_text(STUDY)
    cmd = [sys.executable, "-m", "comptrust", "study", "study.yaml", "--out", "out", "--no-progress", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    killed, workers, lines = None, set(), []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("[worker "):
            workers.add(int(line.split()[1].rstrip("]")))
        if killed is None and line.startswith("[worker ") and " evaluate " in line:
            killed = int(line.split()[1].rstrip("]"))  # the dense model's evaluation, while it loads or generates
            os.kill(killed, signal.SIGKILL)
        if line.startswith("[study] evaluate dense in"):  # dense recorded (after its rerun): interrupt
            proc.send_signal(signal.SIGINT)
            break
    rest_err = proc.communicate(timeout=300)[1]
    err = "".join(lines) + rest_err
    assert proc.returncode == 130, err[-3000:]
    assert killed is not None and "worker died during eval dense; running it again" in err, err[-3000:]
    assert "rerun the same command to resume" in rest_err
    time.sleep(1)
    for pid in workers:  # no worker outlives the study
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with open(f"/proc/{pid}/stat") as f:  # a zombie is gone already; anything else is still running
            assert f.read().split(") ")[1].split()[0] == "Z", f"worker {pid} still runs"
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "eval dense" not in p.stderr  # recorded before the interrupt: not run again
    assert (tmp_path / "out" / "results.csv").read_text() == (d / "out" / "results.csv").read_text()
