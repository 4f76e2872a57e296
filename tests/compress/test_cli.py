"""`comptrust compress` bad input: one-line error, exit 2, nothing left behind; failures clean up too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from comptrust.errors import ComptrustError
from tests.compress import build_tiny


def _app() -> typer.Typer:
    try:
        from comptrust.cli import app  # the lead's CLI, once it exists

        return app
    except ImportError:
        from comptrust.compress.command import register

        app = typer.Typer()
        register(app)

        @app.callback()
        def _root() -> None:  # keep "compress" a subcommand
            pass

        return app


def invoke(*args: str) -> tuple[int, str]:
    """-> (exit code, message). Works whether the app turns ComptrustError into an exit code or lets it out."""
    res = CliRunner().invoke(_app(), ["compress", *args])
    if isinstance(res.exception, ComptrustError):
        return res.exception.exit_code, str(res.exception)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-cli") / "model")


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "gptq", "--bits", "9"], "--bits 9"),
        (["--method", "gptq", "--bits", "1"], "--bits 1"),
        (["--method", "wanda", "--sparsity", "1.5"], "--sparsity 1.5"),
        (["--method", "wanda", "--sparsity", "0"], "--sparsity 0.0"),
        (["--method", "sparsegpt", "--structure", "4:2"], "--structure 4:2"),
        (["--method", "sparsegpt", "--structure", "4:4"], "--structure 4:4"),
        (["--method", "gptq", "--sparsity", "0.5"], "makes no sense"),
        (["--method", "magnitude", "--bits", "4"], "makes no sense"),
        (["--method", "rtn", "--calibration", "x.jsonl"], "makes no sense"),
        (["--method", "wanda", "--awq-grid", "4"], "makes no sense"),
        (["--method", "zip"], "--method 'zip'"),
    ],
)
def test_bad_settings_exit_2(tmp_path, args, needle):
    code, msg = invoke("--out", str(tmp_path / "out"), *args)
    assert code == 2, msg
    assert needle in msg and len(msg.strip().splitlines()) == 1
    assert _leftovers(tmp_path) == []


def test_existing_non_checkpoint_out_is_refused(tiny, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, msg = invoke("--model", str(tiny), "--method", "magnitude", "--out", str(out))
    assert code == 2 and "not a comptrust checkpoint" in msg
    assert _leftovers(out) == ["notes.txt"] and _leftovers(tmp_path) == ["precious"]
    f = tmp_path / "a-file"
    f.write_text("x")
    code, msg = invoke("--model", str(tiny), "--method", "magnitude", "--out", str(f))
    assert code == 2 and f.read_text() == "x"


@pytest.mark.parametrize("content, needle", [("", "is empty"), ('{"text": "ok"}\n{oops\n', "bad.jsonl:2: malformed JSON")])
def test_bad_calibration_file_exit_2(tiny, tmp_path, content, needle):
    calib = tmp_path / "bad.jsonl"
    calib.write_text(content)
    out = tmp_path / "out"
    code, msg = invoke("--model", str(tiny), "--method", "gptq", "--calibration", str(calib), "--out", str(out))
    assert code == 2 and needle in msg and len(msg.strip().splitlines()) == 1
    assert _leftovers(tmp_path) == ["bad.jsonl"]


def test_success_then_rerun_replaces_checkpoint(tiny, tmp_path):
    out = tmp_path / "m"
    code, msg = invoke("--model", str(tiny), "--method", "magnitude", "--structure", "2:4", "--out", str(out))
    assert code == 0, msg
    assert "2:4 pattern: valid" in msg
    first = json.loads((out / "comptrust.json").read_text())
    code, msg = invoke("--model", str(tiny), "--method", "magnitude", "--sparsity", "0.25", "--out", str(out))
    assert code == 0, msg
    second = json.loads((out / "comptrust.json").read_text())
    assert (first["structure"], second["sparsity"]) == ("2:4", 0.25)
    assert _leftovers(tmp_path) == ["m"]


def test_nan_weights_refused_and_nothing_left(tiny, tmp_path, monkeypatch):
    from comptrust.compress import prune

    def poison(w, sparsity, nm):
        w[0, 0] = float("nan")

    monkeypatch.setattr(prune, "magnitude_prune_", poison)
    code, msg = invoke("--model", str(tiny), "--method", "magnitude", "--out", str(tmp_path / "out"))
    assert code == 1 and "NaN" in msg and "refusing to save" in msg
    assert _leftovers(tmp_path) == []


def test_library_crash_becomes_runtime_failure(tiny, tmp_path, monkeypatch):
    from comptrust.compress import quantize

    def boom(*a, **k):
        raise ValueError("simulated library failure\nwith a second line")

    monkeypatch.setattr(quantize, "run_oneshot", boom)
    code, msg = invoke("--model", str(tiny), "--method", "rtn", "--out", str(tmp_path / "out"))
    assert code == 1 and "simulated library failure" in msg and "second line" not in msg
    assert _leftovers(tmp_path) == []


def test_sigterm_removes_partial_dir(tiny, tmp_path):
    script = f"""
import time, comptrust.compress.quantize as q
from comptrust.compress import CompressionConfig, compress
q.run_oneshot = lambda *a, **k: time.sleep(60)
compress({str(tiny)!r}, CompressionConfig.build(method="rtn"), {str(tmp_path / "out")!r})
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.partial-*")):
            assert proc.poll() is None and time.time() < deadline, "compress never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _leftovers(tmp_path) == []


def test_stale_partial_of_dead_process_is_removed(tiny, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    stale.mkdir()
    code, msg = invoke("--model", str(tiny), "--method", "magnitude", "--out", str(tmp_path / "out"))
    assert code == 0, msg
    assert _leftovers(tmp_path) == ["out"]
