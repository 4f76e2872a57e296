"""llm-compressor recipes: validated before any model loads (one line naming file and line), known by content,
their stated bits/sparsity derived; a real GPTQ W4A16 recipe run on the tiny test model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from comptrust.compress.config import CompressionConfig
from comptrust.compress.recipe import load_recipe
from comptrust.errors import UsageError
from comptrust.study.spec import parse_spec
from tests.compress import build_tiny
from tests.compress.test_cli import invoke

RECIPES = Path(__file__).parent / "recipes"
GPTQ = RECIPES / "gptq_w4a16.yaml"
SPARSE = RECIPES / "sparsegpt_24.yaml"


def test_stated_bits_and_sparsity_are_derived():
    q = CompressionConfig.build(method="recipe", recipe=str(GPTQ))
    assert (q.bits, q.group_size, q.sparsity, q.structure) == (4, 64, None, None)
    assert q.n_calib == 128 and q.label() == f"recipe-{q.recipe_sha256[:12]}"
    p = CompressionConfig.build(method="recipe", recipe=str(SPARSE))
    # llm-compressor's mask_structure "2:4" counts zeros; comptrust's structure counts the kept weights
    assert (p.bits, p.sparsity, p.structure) == (None, 0.5, "2:4")
    assert CompressionConfig.model_validate(q.model_dump()) == q  # a stored config reloads


def test_unstated_size_stays_unknown(tmp_path):
    f = tmp_path / "mixed.yaml"
    f.write_text("s_stage:\n  q_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n"
                 "      scheme: {W4A16: ['re:.*mlp.*'], W8A16: ['re:.*self_attn.*']}\n")
    c = CompressionConfig.build(method="recipe", recipe=str(f))
    assert c.bits is None and c.sparsity is None  # two bit widths: no single nominal value
    from comptrust.compress.methods import method

    assert method("recipe").nominal_bits(c) == 16.0


def test_fingerprint_is_the_content(tmp_path):
    base = load_recipe(GPTQ).sha256
    # comments, key order and layout do not change what runs, so they do not change the fingerprint
    same = tmp_path / "elsewhere.yml"
    same.write_text("# moved and reformatted\nquant_stage: {quant_modifiers: {GPTQModifier: {config_groups: "
                    "{group_0: {weights: {group_size: 64, strategy: group, symmetric: true, type: int, num_bits: 4},"
                    " targets: [Linear]}}, ignore: [lm_head]}}}\n")
    assert load_recipe(same).sha256 == base
    changed = tmp_path / "g32.yaml"
    changed.write_text(GPTQ.read_text().replace("group_size: 64", "group_size: 32"))
    assert load_recipe(changed).sha256 != base
    # a stored config whose file changed since is refused, not silently reused
    stored = CompressionConfig.build(method="recipe", recipe=str(GPTQ)).model_dump()
    with pytest.raises(UsageError, match="changed"):
        CompressionConfig.build(**{**stored, "recipe": str(changed)})


BAD = {
    "yaml": ("quant_stage:\n  quant_modifiers:\n    GPTQModifier: {scheme: W4A16\n", 4, "malformed YAML"),
    "unknown": ("quant_stage:\n  quant_modifiers:\n    GPTQModifer:\n      scheme: W4A16\n", 3,
                "did you mean 'GPTQModifier'"),
    "arg": ("q_stage:\n  q_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n      scheme: W4A16\n"
            "      block_size: nope\n", 6, "block_size"),
    "extra": ("q_stage:\n  q_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n      scheme: W4A16\n"
              "      bitz: 3\n", 6, "bitz"),
    "preset": ("q_stage:\n  q_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n      scheme: W5A99\n", 5,
               "scheme"),
    "head": ("q_stage:\n  q_modifiers:\n    QuantizationModifier:\n      scheme: FP8_DYNAMIC\n"
             "      targets: [Linear]\n", 3, "ignore: [lm_head]"),
    "empty": ("foo: 1\n", 1, "no llm-compressor modifiers"),
    "order": ("s_stage:\n  m_modifiers:\n    AWQModifier: {}\n", 1, "quantization modifier"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_is_one_line_naming_file_and_line(case, tmp_path):
    text, line, needle = BAD[case]
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    with pytest.raises(UsageError) as e:
        CompressionConfig.build(method="recipe", recipe=str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f}:{line}: ") and needle in msg and "\n" not in msg


def test_cli_refuses_a_bad_recipe_before_loading_a_model(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD["unknown"][0])
    code, msg = invoke("--recipe", str(f), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "nope"))
    assert code == 2 and msg.strip().startswith(f"{f}:3: unknown llm-compressor modifier")
    assert not (tmp_path / "out").exists()
    code, msg = invoke("--recipe", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out"))
    assert code == 2 and "missing.yaml does not exist" in msg
    code, msg = invoke("--method", "gptq", "--recipe", str(GPTQ), "--out", str(tmp_path / "out"))
    assert code == 2 and "--recipe makes no sense with --method gptq" in msg
    code, msg = invoke("--recipe", str(GPTQ), "--bits", "3", "--out", str(tmp_path / "out"))
    assert code == 2 and "--bits 3" in msg and "bits 4" in msg


def test_study_variant_recipe_is_keyed_by_content(tmp_path):
    moved = tmp_path / "gptq_w4a16.yaml"
    shutil.copy(GPTQ, moved)
    a = parse_spec({"variants": [{"recipe": str(GPTQ)}], "perspectives": ["ethics"]}).variants[1]
    b = parse_spec({"variants": [{"recipe": str(moved)}], "perspectives": ["ethics"]}).variants[1]
    assert a.method == "recipe" and a.name == "recipe-gptq_w4a16" and a.bits() == 4.0
    assert a.describe()["bits"] == 4 and a.describe()["group_size"] == 64
    assert a.fingerprint(0) == b.fingerprint(0)  # the same content elsewhere: the same unit
    moved.write_text(GPTQ.read_text().replace("num_bits: 4", "num_bits: 3"))
    c = parse_spec({"variants": [{"recipe": str(moved)}], "perspectives": ["ethics"]}).variants[1]
    assert c.fingerprint(0) != a.fingerprint(0) and c.bits() == 3.0


def test_study_variant_bad_recipe_names_the_recipe_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD["extra"][0])
    study = tmp_path / "study.yaml"
    study.write_text(f"perspectives: [ethics]\nvariants:\n  - dense\n  - recipe: {f}\n")
    from comptrust.study.spec import load_spec

    with pytest.raises(UsageError) as e:
        load_spec(study)
    msg = str(e.value)
    assert msg.startswith(f"{study}:4:") and f"{f}:6:" in msg and "bitz" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-recipe") / "model")


def test_gptq_recipe_compresses_the_tiny_model(tiny, tmp_path):
    from comptrust.compress import compress
    from comptrust.models.evalcopy import evaluation_dir, is_quantized_checkpoint, load_model

    cfg = CompressionConfig.build(method="recipe", recipe=str(GPTQ), n_calib=8, seq_len=64)
    out = compress(str(tiny), cfg, tmp_path / "r")
    rec = json.loads((out / "comptrust.json").read_text())
    assert rec["method"] == "recipe" and rec["bits"] == 4 and rec["group_size"] == 64
    d = rec["method_details"]
    assert d["recipe_sha256"] == load_recipe(GPTQ).sha256 and d["recipe_modifiers"] == ["GPTQModifier"]
    assert is_quantized_checkpoint(out)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"]) == (4, 64)
    ev = load_model(evaluation_dir(out, d["recipe_sha256"]))
    dense = load_model(tiny)
    name = "model.layers.0.mlp.down_proj.weight"
    wq, wd = dict(ev.named_parameters())[name], dict(dense.named_parameters())[name]
    assert not torch.equal(wq, wd)
    # 4-bit groups of 64: at most 16 distinct values in each group of a row
    assert max(int(g.unique().numel()) for g in wq[0].reshape(-1, 64)) <= 16
