"""The comptrust command end to end: real model, real files, real SQLite; bad inputs and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MINI


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "comptrust", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines, proc.stderr
    assert lines[-1].startswith("error: "), proc.stderr
    return lines[-1]


def test_help_teaches():
    p = run("--help")
    assert p.returncode == 0
    assert "evaluate" in p.stdout and "Quick start" in p.stdout
    e = run("evaluate", "--help")
    assert e.returncode == 0 and "--perspectives" in e.stdout and "Examples" in e.stdout


@pytest.mark.model
def test_evaluate_stereotype_end_to_end_and_rerun_generates_nothing(tmp_path):
    out = tmp_path / "run"
    args = ("evaluate", "-p", "stereotype", "--limit", "2", "--out", str(out), "--no-progress")
    p = run(*args)
    assert p.returncode == 0, p.stderr
    scores = json.loads((out / "scores.json").read_text())
    st = scores["perspectives"]["stereotype"]
    assert st["n_items"] == 6 and st["n_generations"] == 6
    assert 0 <= st["score"] <= 100 and 0 <= st["refusal_rate"] <= 100
    assert set(st["subscores"]) == {"benign", "untargeted", "targeted"}
    assert st["model_fingerprint"].startswith(scores["model"]["fingerprint"])
    assert "Q4_1" in scores["model"]["quantization_note"]
    assert scores["generation"]["generated"] == 6
    gens = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 6 and all(g["parsed"][0]["label"] in ("agree", "disagree", "no_response") for g in gens)
    again = run(*args)
    assert again.returncode == 0, again.stderr
    scores2 = json.loads((out / "scores.json").read_text())
    assert scores2["generation"]["generated"] == 0 and scores2["generation"]["cache_hits"] == 6
    assert scores2["perspectives"]["stereotype"]["score"] == st["score"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--limit", "0"), "--limit 0"),
        (("--limit", "-3"), "--limit -3"),
        (("-p", "stereotipe"), "unknown perspective 'stereotipe' (did you mean 'stereotype'?)"),
        (("--suite", "dt", "--data-dir", "/nonexistent/dt"), "--data-dir /nonexistent/dt: no such directory"),
        (("--suite", "dt"), "--suite dt needs --data-dir"),
        (("--model", "./nope/model"), "no such file or directory"),
        (("--model", "nobody/nothing-here"), "cannot get model 'nobody/nothing-here'"),
        (("--profile", "huge"), "--profile huge"),
        (("--limit", "abc"), "'--limit'"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    p = run("evaluate", "-p", "stereotype", "--out", str(tmp_path / "o"), *args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert needle in one_line_error(p)


def test_corrupt_gguf_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    p = run("evaluate", "-p", "stereotype", "--model", str(bad), "--out", str(tmp_path / "o"))
    assert p.returncode == 2
    assert "bad.gguf" in one_line_error(p)


def _copy_stereotype(dst: Path, mutate) -> Path:
    d = dst / "stereotype" / "dataset"
    d.mkdir(parents=True)
    src = MINI / "stereotype" / "dataset"
    lines = (src / "stereotype_bias_data.jsonl").read_text().splitlines()
    (d / "stereotype_bias_data.jsonl").write_text("\n".join(mutate(lines)) + "\n")
    (d / "system_prompts.csv").write_text((src / "system_prompts.csv").read_text())
    return dst


def test_malformed_jsonl_line_exit_2_and_store_intact(tmp_path):
    data = _copy_stereotype(tmp_path / "dt", lambda ls: ls[:4] + ["{not json"] + ls[4:])
    out = tmp_path / "o"
    out.mkdir()
    # a results directory with stored work must survive a failing command untouched
    from comptrust.store import Store
    from comptrust.types import GenParams

    with Store(out / "comptrust.sqlite") as s:
        s.put_generations([("k", "fp", "p", GenParams(max_new_tokens=1), ["x"], [1])])
    p = run("evaluate", "-p", "stereotype", "--suite", "dt", "--data-dir", str(data), "--out", str(out))
    assert p.returncode == 2
    assert "stereotype_bias_data.jsonl:5: malformed JSON line" in one_line_error(p)
    with Store(out / "comptrust.sqlite") as s:
        assert s.count_generations() == 1


def test_missing_data_for_the_only_perspective_is_an_error(tmp_path):
    # nothing to evaluate is not a success: one line naming the file looked for, exit 2, no --out left behind
    (tmp_path / "dt").mkdir()
    p = run("evaluate", "-p", "stereotype", "--suite", "dt", "--data-dir", str(tmp_path / "dt"),
            "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 2
    err = one_line_error(p)
    assert "no data for any requested perspective" in err and "stereotype_bias_data.jsonl" in err
    assert not (tmp_path / "o").exists()
