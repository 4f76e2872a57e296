"""Study presets: the paper's grid by name, printed as a study file, overridden key by key, run on the embedded model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comptrust.errors import UsageError
from comptrust.study.presets import PRESETS, preset_data
from comptrust.study.spec import load_spec, parse_spec


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comptrust", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_is_the_papers_grid(name):
    spec = parse_spec({}, f"<preset {name}>", preset=name)
    assert spec.model == PRESETS[name].model and spec.compare_to == PRESETS[name].compare_to
    assert (spec.suite, spec.profile, spec.data_dir) == ("dt", "full", "hf:AI-Secure/DecodingTrust")
    by = {v.name: v for v in spec.variants}
    for m in ("gptq", "awq"):
        for b in (8, 4, 3):
            v = by[f"{m}-w{b}"]
            assert v.settings["bits"] == b and v.settings["group_size"] == 128
            assert v.seeds == ((0, 1, 2) if b in (3, 4) else (0,))
    assert all(by[f"gptq-w{b}"].settings["actorder"] == "group" for b in (8, 4, 3))
    for m in ("magnitude", "sparsegpt", "wanda"):
        assert {by[f"{m}-{s}"].settings["structure"] for s in ("2of4", "4of8", "1of2")} == {"2:4", "4:8", "1:2"}
    assert all(v.settings.get("n_calib") == 128 for v in spec.variants if v.method in ("gptq", "awq", "sparsegpt", "wanda"))
    assert len(spec.variants) == 16


def test_init_prints_the_preset_and_the_printed_file_is_the_preset(tmp_path):
    p = _cli("study", "--init", "--preset", "dct-vicuna-13b")
    assert p.returncode == 0 and p.stdout.startswith("# comptrust study preset 'dct-vicuna-13b'")
    f = tmp_path / "paper.yaml"
    f.write_text(p.stdout)
    printed, preset = load_spec(f), parse_spec({}, "<preset>", preset="dct-vicuna-13b")
    assert [(v.name, v.method, v.settings, v.seeds) for v in printed.variants] == \
        [(v.name, v.method, v.settings, v.seeds) for v in preset.variants]
    assert (printed.model, printed.compare_to, printed.profile) == (preset.model, preset.compare_to, preset.profile)
    # --init with a file name writes the preset there
    q = _cli("study", "--init", "--preset", "dct-vicuna-13b", str(tmp_path / "w.yaml"))
    assert q.returncode == 0 and (tmp_path / "w.yaml").read_text() == p.stdout


def test_unknown_preset_lists_the_known_ones(tmp_path):
    p = _cli("study", "--preset", "dct-llama2-70b", "--out", str(tmp_path / "o"))
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error: unknown preset 'dct-llama2-70b'") and "known: " + ", ".join(PRESETS) in err
    with pytest.raises(UsageError, match="preset: expected a preset name"):
        parse_spec({"preset": 3})


def test_a_file_overrides_preset_keys_and_another_suite_drops_the_data_keys(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("preset: dct-llama2-13b-chat\nmodel: ~\nsuite: mini\nlimit: 2\n")
    spec = load_spec(f)
    assert spec.model is None and spec.suite == "mini" and spec.limit == 2
    assert spec.data_dir is None and spec.mmlu_dir is None and spec.profile is None  # no Hub data for the mini suite
    assert spec.compare_to == "llama-2-13b-chat" and len(spec.variants) == 16
    assert preset_data("dct-llama2-13b-chat")["model"] == "meta-llama/Llama-2-13b-chat-hf"


@pytest.mark.model
def test_preset_runs_on_the_embedded_model_beside_the_published_scores(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(
        "preset: dct-llama2-13b-chat\nmodel: ~\nsuite: mini\nlimit: 1\nperspectives: [stereotype]\nbootstrap: 50\n"
        "variants:\n  - dense\n"
        "  - {name: gptq-w4, method: gptq, bits: 4, group_size: 128, actorder: group, n_calib: 8, seq_len: 64}\n"
    )
    out = tmp_path / "study"
    p = _cli("study", str(f), "--out", str(out), "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["dense", "gptq-w4"]
    published = [c for c in rows[0] if "published" in c]
    assert published, list(rows[0])
    assert float(rows[0]["stereotype_published"]) == 97.7  # the paper's dense LLAMA2 13b Chat stereotype score
    assert "Published" in (out / "report.html").read_text()
