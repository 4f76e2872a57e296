"""Study files: the default study, the example, and one-line errors that name the line for every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from comptrust.errors import UsageError
from comptrust.study.spec import DEFAULT_VARIANTS, example_yaml, load_spec, parse_spec


def _load(tmp_path: Path, text: str):
    f = tmp_path / "study.yaml"
    f.write_text(text)
    return load_spec(f)


def _err(tmp_path: Path, text: str) -> str:
    with pytest.raises(UsageError) as e:
        _load(tmp_path, text)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_default_study_matches_the_issue():
    spec = load_spec(None)
    assert [v.name for v in spec.variants] == [
        "dense", "gptq-w8", "gptq-w4", "gptq-w3", "awq-w4", "magnitude-2of4", "sparsegpt-2of4", "wanda-2of4"
    ]
    assert len(spec.variants) == len(DEFAULT_VARIANTS)
    assert spec.perspectives == ["mmlu", "advglue", "ood", "adv_demo", "ethics", "fairness", "toxicity", "privacy",
                                 "stereotype"]
    assert (spec.suite, spec.resolved_profile, spec.budget) == ("mini", "mini", 5.0)
    assert [v.bits() for v in spec.variants] == [16, 8, 4, 3, 4, 8, 8, 8]


def test_example_parses_and_dense_comes_first(tmp_path):
    spec = _load(tmp_path, example_yaml())
    assert spec.variants[0].name == "dense"
    assert spec.variant("gptq-w4").seeds == (0, 1, 2)
    assert spec.variant("gptq-w4").instances() == ["gptq-w4@s0", "gptq-w4@s1", "gptq-w4@s2"]
    # dense is added when missing, and put first when listed later
    s = _load(tmp_path, "variants:\n  - {method: rtn, bits: 4}\n")
    assert [v.name for v in s.variants] == ["dense", "rtn-w4"]
    s = _load(tmp_path, "variants:\n  - {method: wanda, sparsity: 0.5}\n  - dense\n")
    assert [v.name for v in s.variants] == ["dense", "wanda-50pct"]


def test_round_trip_through_to_dict():
    spec = load_spec(None)
    again = parse_spec({k: v for k, v in spec.to_dict().items() if k != "source"})
    assert again.to_dict() | {"source": ""} == spec.to_dict() | {"source": ""}


def test_malformed_yaml_names_the_line(tmp_path):
    msg = _err(tmp_path, "suite: mini\nvariants:\n  - dense\n  - {method: gptq, bits: 4\nbudget: 5\n")
    assert msg.startswith(f"{tmp_path / 'study.yaml'}:") and "malformed YAML" in msg
    line = int(msg.split(":")[1])
    assert line in (4, 5)


def test_unknown_keys_list_the_valid_ones_with_line(tmp_path):
    msg = _err(tmp_path, "suite: mini\nbudgte: 3\n")
    assert ":2: unknown key 'budgte' in the study (did you mean 'budget'?); valid: model, suite," in msg
    msg = _err(tmp_path, "variants:\n  - dense\n  - method: gptq\n    bitz: 4\n")
    assert ":4: unknown key 'bitz' in variants[1] (did you mean 'bits'?)" in msg and "group_size" in msg


def test_unknown_method_and_perspective(tmp_path):
    msg = _err(tmp_path, "variants:\n  - dense\n  - {method: gptqq, bits: 4}\n")
    assert ":3: variants[1]: unknown method 'gptqq' (did you mean 'gptq'?); valid: dense, gguf, gptq, awq" in msg
    msg = _err(tmp_path, "perspectives: [ethics, toxcity]\n")
    assert ":1: unknown perspective 'toxcity' (did you mean 'toxicity'?); known: mmlu, advglue, ood" in msg


def test_bad_values_name_the_setting_and_line(tmp_path):
    msg = _err(tmp_path, "variants:\n  - dense\n  - method: gptq\n    bits: 12\n")
    assert ":4: variants[1]: bits 12 is outside 2..8" in msg
    msg = _err(tmp_path, "variants:\n  - {method: magnitude, structure: '4:4'}\n")
    assert "variants[0]" in msg and "1 <= N < M" in msg
    assert ":3: budget: 0 is outside (0, 100)" in _err(tmp_path, "suite: mini\nperspectives: all\nbudget: 0\n")
    assert "suite dt needs data_dir" in _err(tmp_path, "suite: dt\n")
    assert "seeds: expected a list of non-negative integers" in _err(
        tmp_path, "variants:\n  - {method: gptq, seeds: [0, -1]}\n")
    assert "is used twice" in _err(tmp_path, "variants:\n  - {method: rtn}\n  - {method: rtn, seeds: [1]}\n")
    assert "dense takes no compression settings" in _err(tmp_path, "variants:\n  - {method: dense, bits: 4}\n")
    assert "a study is a mapping" in _err(tmp_path, "- dense\n")


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist .*--init"):
        load_spec(tmp_path / "nope.yaml")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comptrust", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_init_and_errors(tmp_path):
    p = _cli("study", "--init", "my.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "my.yaml").read_text() == example_yaml()
    p = _cli("study", "--init", "my.yaml", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == "error: my.yaml already exists; choose another name or remove it"
    (tmp_path / "bad.yaml").write_text("variants:\n  - {method: prune}\n")
    p = _cli("study", "bad.yaml", "--out", "o", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: bad.yaml:2: variants[0]: unknown method 'prune'")
    assert not (tmp_path / "o").exists()  # validated before anything is created
    p = _cli("study", "--status", "nowhere", cwd=tmp_path)
    assert p.returncode == 2 and "is not a study directory" in p.stderr
    p = _cli("report", "nowhere", cwd=tmp_path)
    assert p.returncode == 2 and "is not a study directory" in p.stderr
    p = _cli("study", "--help", cwd=tmp_path)
    assert p.returncode == 0 and "--init" in p.stdout and "Resumable" in p.stdout


def test_gguf_variants_parse_with_names_bits_and_no_seeds(tmp_path):
    spec = _load(tmp_path, "variants:\n  - dense\n  - {method: gguf}\n  - {method: gguf, quant: q8_0}\n")
    names = [v.name for v in spec.variants]
    assert names == ["dense", "gguf", "gguf-q8_0"]
    gg, q8 = spec.variants[1], spec.variants[2]
    assert gg.is_gguf and q8.settings == {"quant": "Q8_0"} and q8.seeds == (0,)
    assert q8.bits() == 8.5
    assert gg.bits() == 5.0  # the embedded model's own GGUF is Q4_1: 4 bits + a 16-bit scale and min per 32
    assert q8.describe()["quant"] == "Q8_0"
    again = parse_spec({k: v for k, v in spec.to_dict().items() if k != "source"})
    assert [(v.name, v.settings, v.seeds) for v in again.variants] == [(v.name, v.settings, v.seeds)
                                                                        for v in spec.variants]


@pytest.mark.parametrize(
    "variant, needle",
    [
        ("{method: gguf, quant: Q9_9}", "quant: 'Q9_9'"),
        ("{method: gguf, seeds: [0, 1]}", "take no seeds"),
        ("{method: gguf, file: /nonexistent.gguf}", "is not a GGUF file"),
        ("{method: gguf, quant: Q8_0, file: x.gguf}", "not both"),
        ("{method: gptq, bits: 4, quant: Q8_0}", "quant is a setting of gguf variants"),
        ("{method: gguff}", "did you mean 'gguf'"),
    ],
)
def test_bad_gguf_variants_name_the_line(tmp_path, variant, needle):
    msg = _err(tmp_path, f"variants:\n  - dense\n  - {variant}\n")
    assert msg.startswith(f"{tmp_path / 'study.yaml'}:3: variants[1]"), msg
    assert needle in msg, msg


def test_gguf_variant_needs_a_gguf_model(tmp_path):
    msg = _err(tmp_path, "model: HuggingFaceTB/SmolLM2-135M-Instruct\nvariants:\n  - {method: gguf, quant: Q8_0}\n")
    assert "gguf variants need a GGUF model" in msg and ":3:" in msg


def test_backend_key(tmp_path):
    assert _load(tmp_path, "backend: hf\n").backend == "hf"
    assert "backend: 'tensorrt'" in _err(tmp_path, "backend: tensorrt\n")


def test_missing_local_model_is_refused_before_any_work(tmp_path):
    msg = _err(tmp_path, "suite: mini\nmodel: ./nope/model.gguf\n")
    assert msg.endswith("model: ./nope/model.gguf does not exist (a .gguf file, a model directory, or a Hub id org/name)")
    assert ":2:" in msg


RECIPE = Path(__file__).parents[1] / "compress" / "recipes" / "gptq_w4a16.yaml"


def test_recipe_variant_key(tmp_path):
    """{recipe: FILE} implies method recipe; its stated size is read; a misspelt key gets the hint."""
    spec = _load(tmp_path, f"perspectives: [ethics]\nvariants:\n  - dense\n  - recipe: {RECIPE}\n"
                           f"  - {{method: recipe, recipe: {RECIPE}, name: mine, seeds: [0, 1]}}\n")
    a, b = spec.variants[1:]
    assert (a.name, a.method, a.bits()) == ("recipe-gptq_w4a16", "recipe", 4.0)
    assert b.name == "mine" and b.instances() == ["mine@s0", "mine@s1"]
    assert a.settings["recipe_sha256"] == b.settings["recipe_sha256"] and a.fingerprint(0) == b.fingerprint(0)
    msg = _err(tmp_path, "variants:\n  - dense\n  - recip: r.yaml\n")
    assert ":3: unknown key 'recip' in variants[1] (did you mean 'recipe'?)" in msg
    msg = _err(tmp_path, f"variants:\n  - dense\n  - {{method: gptq, recipe: {RECIPE}}}\n")
    assert ":3: variants[1]: recipe makes no sense with method gptq" in msg
    msg = _err(tmp_path, "variants:\n  - dense\n  - {method: recipe}\n")
    assert ":3: variants[1]: method recipe needs recipe FILE" in msg


def test_variant_fingerprint_hashes_the_resolved_config(monkeypatch):
    """A unit's fingerprint follows what the compression would run with: writing out a default gives the same
    unit, and changing a default (here the calibration batch) makes units stored under the old one stale."""
    from comptrust.compress import config as cc
    from comptrust.study.spec import Variant

    implicit = Variant("gptq-w4", "gptq", {"bits": 4})
    explicit = Variant("gptq-w4", "gptq", {"bits": 4, "group_size": cc.DEFAULT_GROUP_SIZE,
                                           "calib_batch": cc.DEFAULT_CALIB_BATCH})
    assert implicit.fingerprint(0) == explicit.fingerprint(0)
    assert implicit.fingerprint(0) != implicit.fingerprint(1)
    before = implicit.fingerprint(0)
    monkeypatch.setattr(cc, "DEFAULT_CALIB_BATCH", cc.DEFAULT_CALIB_BATCH * 2)
    assert implicit.fingerprint(0) != before
    assert explicit.fingerprint(0) == before  # the written-out setting did not change
