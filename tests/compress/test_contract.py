"""One contract test over every registered compression method (compress/methods.py), like tests/test_contract.py
over perspectives: a new method is one class plus its tests, and this file holds it to what callers rely on.

The declarations are checked without a model; then each method compresses the tiny random Llama of
tests/compress (no downloads) with its default settings, and the record must match what the method declared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comptrust.compress.config import METHODS, CompressionConfig
from comptrust.compress.methods import REGISTRY, Method, Pruning, Quantization, method
from comptrust.errors import UsageError
from comptrust.study.spec import check_variant_name, parse_spec

NAMES = list(REGISTRY)
# the recipe method runs a file (tests/compress/recipes); every other method runs from its defaults
SETTINGS = {"recipe": {"recipe": str(Path(__file__).parent / "recipes" / "gptq_w4a16.yaml")}}


def test_registry_is_the_list_of_methods():
    assert METHODS == tuple(NAMES)  # the config takes its method names from the registry
    with pytest.raises(UsageError, match=r"^--method 'nope': choose one of " + ", ".join(NAMES) + "$"):
        CompressionConfig.build(method="nope")
    assert all(isinstance(m, Method) and m.name == n for n, m in REGISTRY.items())


@pytest.mark.parametrize("name", NAMES)
def test_declarations(name):
    m = method(name)
    assert m.family in ("quantization", "pruning", "recipe")
    assert isinstance(m, (Quantization, Pruning)) or m.family == "recipe"
    assert m.served_as == "weights" and m.checkpoint_format
    cfg = CompressionConfig.build(method=name, **SETTINGS.get(name, {}))
    # needs_calibration decides whether calibration settings exist at all
    assert (cfg.n_calib is not None) == m.needs_calibration == cfg.needs_calibration
    bits = m.nominal_bits(cfg)
    assert 0 < bits < 16
    # the study names a variant by the method's auto name and orders by its nominal bits
    spec = parse_spec({"variants": [{"method": name, **SETTINGS.get(name, {})}], "perspectives": ["ethics"]})
    v = spec.variants[1]
    assert v.name == m.auto_name(cfg) and v.name.startswith(name) and check_variant_name(v.name) is None
    assert v.bits() == bits
    for cls in type(m).__mro__:  # every method overrides what its family leaves abstract
        if cls in (Quantization, Pruning):
            assert type(m).run is not cls.run, f"{name} must implement run()"
            break


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.compress import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


# llm-compressor 0.14's AWQ divides by zero in its scale search (awq/base.py:830) on the tiny random model; AWQ on
# the embedded model is covered by tests/compress/test_methods.py. Known, not yet fixed: expected to fail here.
_AWQ_TINY = pytest.mark.xfail(reason="llm-compressor AWQ ZeroDivisionError on the tiny random model", strict=False)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_AWQ_TINY) if n == "awq" else n for n in NAMES])
def test_each_method_compresses_the_tiny_model_as_declared(name, tiny, tmp_path):
    from comptrust.compress import compress

    m = method(name)
    extra = dict(n_calib=8, seq_len=64) if m.needs_calibration else {}
    extra |= {"awq_grid": 2} if name == "awq" else {}
    extra |= SETTINGS.get(name, {})
    cfg = CompressionConfig.build(method=name, **extra)
    out = compress(str(tiny), cfg, tmp_path / name)
    rec = json.loads((out / "comptrust.json").read_text())
    assert rec["method"] == name and rec["checkpoint_format"] == m.checkpoint_format
    assert (rec["calibration"] is not None) == m.needs_calibration
    assert (out / "recipe.yaml").is_file() == m.keeps_recipe
    checks = rec["checks"]
    if m.family == "quantization":
        assert checks["levels"]["max"] <= 2 ** cfg.bits
    elif m.family == "recipe":
        assert rec["method_details"]["recipe_sha256"] == cfg.recipe_sha256
    else:
        assert checks["sparsity"]["total"] >= (cfg.sparsity or 0) - 0.005
    assert checks["embeddings_and_lm_head_unchanged"] and checks["finite"]
