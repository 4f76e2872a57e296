"""The bad-input catalogue (docs/errors.md) entries not covered next to their feature: a one-line error, the
documented exit code, and stored work intact."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from comptrust import perspectives as registry
from comptrust.data_sources import mini_dir, mmlu_dir
from comptrust.evaluate import options_for
from comptrust.perspectives.base import EvalOptions


def run(*args: str, env: dict | None = None, preexec=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comptrust", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec, cwd=cwd)


def last_line(p: subprocess.CompletedProcess) -> str:
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error: "), p.stderr[-2000:]
    return lines[-1]


@pytest.mark.model
def test_truncated_safetensors_exit_2(tmp_path):
    from comptrust.models import resolve

    src = Path(resolve(None).path)
    model = tmp_path / "m"
    shutil.copytree(src, model)
    st = model / "model.safetensors"
    os.truncate(st, st.stat().st_size // 2)
    p = run("evaluate", "-p", "stereotype", "--limit", "1", "--model", str(model), "--out", str(tmp_path / "o"),
            "--no-progress")
    assert p.returncode == 2
    line = last_line(p)
    assert str(model) in line and "SafetensorError" in line


@pytest.mark.model
@pytest.mark.parametrize("field, delta, needle", [("num_hidden_layers", 2, "declares weights the files do not hold"),
                                                  ("intermediate_size", 64, "shapes do not match config.json")])
def test_config_that_does_not_match_the_weights_exit_2(tmp_path, field, delta, needle):
    """More layers than the weights hold would silently be random; other shapes would point to a hidden report."""
    import json

    from comptrust.models import resolve

    model = tmp_path / "m"
    shutil.copytree(Path(resolve(None).path), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg[field] += delta
    (model / "config.json").write_text(json.dumps(cfg))
    p = run("evaluate", "-p", "stereotype", "--limit", "1", "--model", str(model), "--out", str(tmp_path / "o"),
            "--no-progress")
    assert p.returncode == 2, p.stderr[-2000:]
    line = last_line(p)
    assert str(model) in line and needle in line, line


def test_scores_path_taken_by_a_folder_is_one_line(tmp_path):
    out = tmp_path / "o"
    (out / "scores.json").mkdir(parents=True)
    p = run("evaluate", "-p", "ethics", "--limit", "1", "--out", str(out), "--no-progress")
    assert p.returncode == 1
    assert last_line(p) == f"error: cannot write {out / 'scores.json'}: Is a directory; work committed so far is kept"
    assert (out / "comptrust.sqlite").is_file()


def test_damaged_results_database_is_one_line(tmp_path):
    out = tmp_path / "o"
    assert run("evaluate", "-p", "ethics", "--limit", "1", "--out", str(out), "--no-progress").returncode == 0
    db = out / "comptrust.sqlite"
    data = bytearray(db.read_bytes())
    page = 4096
    data[3 * page: 6 * page] = os.urandom(3 * page)  # header intact, table pages garbage
    db.write_bytes(bytes(data))
    for extra in ("comptrust.sqlite-wal", "comptrust.sqlite-shm"):
        (out / extra).unlink(missing_ok=True)
    p = run("evaluate", "-p", "ethics", "--limit", "1", "--out", str(out), "--no-progress")
    assert p.returncode in (1, 2), p.stderr[-2000:]
    line = last_line(p)
    assert line.startswith("error:") and "comptrust.sqlite" in line, p.stderr[-2000:]


def test_damaged_study_json_is_one_line(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "study.json").write_text("{broken")
    p = run("study", "--status", str(d))
    assert p.returncode == 2 and last_line(p).startswith(f"error: {d / 'study.json'} is damaged"), p.stderr


def test_unwritable_output_directory_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    p = run("evaluate", "-p", "stereotype", "--out", str(blocker / "sub"))
    assert p.returncode == 2
    assert last_line(p) == f"error: --out {blocker / 'sub'}: cannot create the output directory (Not a directory)"


def _file_size_limit(n: int):
    def apply() -> None:  # in the child: a write past n bytes fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    return apply


@pytest.mark.model
def test_full_disk_mid_run_keeps_committed_work_and_resumes(tmp_path):
    out = tmp_path / "o"
    args = ("evaluate", "-p", "stereotype,ethics", "--limit", "3", "--out", str(out), "--no-progress")
    env = {"COMPTRUST_CHUNK_SIZE": "2"}
    p = run(*args, env=env, preexec=_file_size_limit(150_000))
    assert p.returncode == 1
    line = last_line(p)
    assert "cannot write the results database" in line and "work committed so far is kept" in line
    db = sqlite3.connect(out / "comptrust.sqlite")
    kept = db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    assert kept > 0
    again = run(*args, env=env)  # space is back: the rerun generates only what was lost
    assert again.returncode == 0, again.stderr[-2000:]
    import json

    gen = json.loads((out / "scores.json").read_text())["generation"]
    assert gen["cache_hits"] == kept and gen["generated"] == gen["unique"] - kept


def test_empty_generation_is_parsed_as_no_answer():
    opts = EvalOptions(data_dir=mini_dir(), limit=1, mmlu_dir=mmlu_dir(None, mini_dir()))
    for name in registry.REGISTRY:
        p = registry.get(name)
        popts = options_for(p, opts)
        for it in p.load(popts).items[:5]:
            got = p.parse(it, "", popts)
            if name == "fairness":
                # DecodingTrust's fairness scorer counts no answer as a refusal AND as prediction 0 ("no"), so an
                # item whose true label is 0 comes out correct (protocol section 9): only the refusal is asserted
                assert got.refused, (name, it.id, got)
                continue
            assert got.correct in (False, None), (name, it.id, got)
            assert got.label in (None, "no_response", "unknown", "refusal", -1) or got.refused, (name, it.id, got)


def test_failed_check_leaves_no_empty_out_folder(tmp_path):
    """A check that fails after --out was created (here the DecodingTrust folder; below the engine's environment)
    removes the folder this command made; an --out that existed before stays, with what it held."""
    out = tmp_path / "new" / "o"
    p = run("evaluate", "-p", "ethics", "--suite", "dt", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out),
            "--no-progress")
    assert p.returncode == 2 and "nowhere" in last_line(p)
    assert not out.exists()
    p = run("evaluate", "-p", "ethics", "--limit", "1", "--out", str(out), "--no-progress",
            "--toxicity-scorer", "bogus", env={"COMPTRUST_DECODE_ATTN": "flash"})
    assert p.returncode == 2 and "COMPTRUST_DECODE_ATTN='flash'" in last_line(p)
    assert "warning: --toxicity-scorer bogus is not used" in p.stderr  # toxicity is not evaluated
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    p = run("evaluate", "-p", "ethics", "--suite", "dt", "--data-dir", str(tmp_path / "nowhere"), "--out", str(kept),
            "--no-progress")
    assert p.returncode == 2 and (kept / "notes.txt").read_text() == "mine"


def test_discard_if_unused_keeps_a_folder_with_work(tmp_path):
    from comptrust.evaluate import discard_if_unused
    from comptrust.store import STORE_NAME
    from comptrust.store import Store

    empty = tmp_path / "empty"
    empty.mkdir()
    with Store(empty / STORE_NAME):
        pass
    assert discard_if_unused(empty) and not empty.exists()
    work = tmp_path / "work"
    work.mkdir()
    with Store(work / STORE_NAME) as st:
        st.kv_put_many("toxicity", {"a text": 0.5})
    assert not discard_if_unused(work) and (work / STORE_NAME).exists()
