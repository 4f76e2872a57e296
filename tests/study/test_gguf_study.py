"""A study with gguf variants: the embedded model's own GGUF and a llama.cpp Q8_0 of it, served by llama.cpp servers
that the study starts and stops, next to the transformers copy (dense). Needs llama-cpp-python (the README's test
set-up installs it); skipped with the reason where it could not be built."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from comptrust.engine.llamacpp import llama_cpp_available

pytestmark = pytest.mark.model

STUDY = """\
perspectives: [ethics]
limit: 1
bootstrap: 50
variants:
  - dense
  - {method: gguf}
  - {method: gguf, quant: Q8_0}
"""


@pytest.fixture(scope="module")
def gguf_study(tmp_path_factory):
    why = llama_cpp_available()
    if why:
        pytest.skip(f"llama-cpp-python server not available ({why})")
    d = tmp_path_factory.mktemp("gguf-study")
    (d / "study.yaml").write_text(STUDY)
    p = subprocess.run([sys.executable, "-m", "comptrust", "study", "study.yaml", "--out", "out", "--no-progress"],
                       capture_output=True, text=True, cwd=d, timeout=900)
    return d, p


def test_gguf_variants_are_served_quantized_and_reported(gguf_study):
    d, p = gguf_study
    assert p.returncode == 0, p.stderr[-3000:]
    out = d / "out"
    served = out / "models" / "gguf@s0"
    assert (served / "model.gguf").is_symlink()  # served as is: a link to the embedded GGUF, not a copy
    rec = json.loads((out / "models" / "gguf-q8_0@s0" / "comptrust-gguf.json").read_text())
    assert rec["quant"] == "Q8_0" and rec["source_type"] == "Q4_1"
    assert rec["tensor_types"].get("Q8_0", 0) > 100  # llama.cpp requantized the Q4_1 source's matrices
    doc = json.loads((out / "results.json").read_text())
    units = {u["unit"]: u for u in doc["units"]}
    for inst in ("dense", "gguf@s0", "gguf-q8_0@s0"):
        assert units[f"eval:{inst}:ethics"]["status"] == "done", units[f"eval:{inst}:ethics"]
    variants = doc["analysis"]["variants"]
    assert variants["gguf-q8_0"]["describe"]["bits"] == 8.5 and variants["gguf"]["describe"]["bits"] == 5.0
    html = (out / "report.html").read_text()
    assert "gguf-q8_0" in html
    # the served models were evaluated through llama.cpp, the dense one through transformers
    import sqlite3

    db = sqlite3.connect(out / "comptrust.sqlite")
    models = {json.loads(r[0])["model"]["engine"] for r in db.execute(
        "SELECT result FROM units WHERE kind = 'eval' AND status = 'done'")}
    assert models == {"hf", "llamacpp-server"}


def test_gguf_study_rerun_serves_nothing(gguf_study):
    d, _ = gguf_study
    p = subprocess.run([sys.executable, "-m", "comptrust", "study", "study.yaml", "--out", "out", "--no-progress"],
                       capture_output=True, text=True, cwd=d, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "0 to run" in p.stderr and "llama" not in p.stderr.lower()
