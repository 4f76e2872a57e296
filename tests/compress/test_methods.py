"""Each method's invariant on a tiny random-weight Llama built here (no downloads, no real weights).

Run: pytest tests/compress -q   (about a minute: each compression of the tiny model takes 1-8 s)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comptrust.compress import CompressionConfig, compress
from comptrust.compress.calibration import load_calibration
from comptrust.compress.checks import decoder_linears
from comptrust.models.evalcopy import evaluation_dir, is_quantized_checkpoint, load_model
from comptrust.compress.quantize import awq_cpu_workaround
from tests.compress import build_tiny

CALIB = dict(n_calib=16, seq_len=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Compress once per settings within this module: made(tiny, **settings) -> (out dir, comptrust.json)."""
    root = tmp_path_factory.mktemp("compressed")
    cache: dict[str, tuple[Path, dict]] = {}

    def run(model: Path, **settings):
        key = json.dumps(settings, sort_keys=True)
        if key not in cache:
            method = settings["method"]
            extra = {} if method in ("rtn", "magnitude") else CALIB
            cfg = CompressionConfig.build(**{**extra, **settings})
            out = compress(str(model), cfg, root / f"m{len(cache)}")
            cache[key] = (out, json.loads((out / "comptrust.json").read_text()))
        return cache[key]

    return run


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


# -- quantization -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, bits", [("gptq", 4), ("gptq", 3), ("gptq", 8), ("awq", 4), ("rtn", 4)])
def test_quantized_levels_per_group(tiny, made, method, bits):
    settings = dict(method=method, bits=bits) if method != "awq" else dict(method=method, bits=bits, awq_grid=4)
    out, rec = made(tiny, **settings)
    assert is_quantized_checkpoint(out)
    assert rec["group_size_by_width"] == {"192": 64, "384": 128}  # gcd rule for --group-size 128
    lv = rec["checks"]["levels"]
    assert 1 < lv["max"] <= 2**bits
    # independent recount on the reloaded, dequantized weights
    model = load_model(out)
    for name, mod in decoder_linears(model).items():
        g = rec["group_size_by_layer"][name]
        groups = mod.weight.detach().reshape(-1, g)
        assert max(len(torch.unique(r)) for r in groups) <= 2**bits, name
    assert rec["checks"]["sample_generation"]["output"] is not None
    assert rec["source_model"]["fingerprint"] and rec["versions"]["llmcompressor"]


def test_per_channel(tiny, made):
    out, rec = made(tiny, method="rtn", bits=3, group_size=0)
    assert rec["group_size_by_width"] == {"192": 0, "384": 0}
    assert rec["checks"]["levels"]["max"] <= 8


def test_awq_runs_on_cpu_with_workaround_recorded(tiny, made):
    _, rec = made(tiny, method="awq", bits=4, awq_grid=4)
    awq = rec["method_details"]["awq"]
    assert awq["n_grid"] == 4
    if not torch.accelerator.is_available():
        assert awq["cpu_pin_memory_workaround"] is True


def test_awq_workaround_is_scoped():
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.__dict__["pin_memory"]
    with awq_cpu_workaround() as patched:
        if patched:
            assert IntermediatesCache.pin_memory is not original
            assert IntermediatesCache.pin_memory(object(), 0) is None
    assert IntermediatesCache.__dict__["pin_memory"] is original


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the workaround is only needed without an accelerator")
def test_awq_workaround_still_needed():
    """If this starts failing, llm-compressor fixed pinning on CPU and the workaround can go."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    cache = IntermediatesCache.from_dataloader([{"x": torch.ones(2)}])
    with pytest.raises(RuntimeError, match="accelerator"):
        cache.pin_memory(0)


@torch.no_grad()
def _layer0_inputs(model_dir: Path, calib) -> dict[str, torch.Tensor]:
    """Inputs to layer 0's Linears in the dense model on the calibration set (identical for every method)."""
    model = load_model(model_dir)
    lin = {n: m for n, m in decoder_linears(model).items() if n.startswith("model.layers.0.")}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in lin}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n, m in lin.items()]
    for ids in calib.input_ids:
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_gptq_beats_round_to_nearest_on_calibration_inputs(tiny, made):
    from transformers import AutoTokenizer

    gptq, rec = made(tiny, method="gptq", bits=3)
    rtn, _ = made(tiny, method="rtn", bits=3)
    # the inputs GPTQ saw: the same samples, batched (grouped and cut) as its record says
    calib = load_calibration(None, AutoTokenizer.from_pretrained(str(tiny)), n=16, seq_len=64, seed=0,
                             batch=rec["calibration"]["batch"])
    assert calib.sha256() == rec["calibration"]["sha256_token_ids"]
    xs = _layer0_inputs(tiny, calib)
    dense = {n: m.weight for n, m in decoder_linears(load_model(tiny)).items()}
    wg = {n: m.weight for n, m in decoder_linears(load_model(gptq)).items()}
    wr = {n: m.weight for n, m in decoder_linears(load_model(rtn)).items()}
    for name, x in xs.items():
        err_gptq = torch.linalg.norm(x @ (wg[name] - dense[name]).T)
        err_rtn = torch.linalg.norm(x @ (wr[name] - dense[name]).T)
        assert err_gptq < err_rtn, (name, float(err_gptq), float(err_rtn))


def test_seed_determinism(tiny, made, tmp_path):
    a, rec_a = made(tiny, method="gptq", bits=4)
    b = compress(str(tiny), CompressionConfig.build(method="gptq", bits=4, **CALIB), tmp_path / "again")
    c, rec_c = made(tiny, method="gptq", bits=4, seed=7)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed: identical checkpoint
    assert rec_a["calibration"]["sha256_token_ids"] != rec_c["calibration"]["sha256_token_ids"]
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # another sample, other weights


# -- pruning ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "wanda"])
def test_unstructured_exact_sparsity(tiny, made, method):
    out, rec = made(tiny, method=method, sparsity=0.5)
    assert not is_quantized_checkpoint(out)
    sp = rec["checks"]["sparsity"]
    assert sp["total"] == pytest.approx(0.5, abs=2e-4)
    assert sp["min_layer"] >= 0.5 - 1e-3
    w = _weights(out)
    for name in rec["checks"]["sparsity"]["per_layer"]:
        t = w[f"{name}.weight"]
        assert float((t == 0).float().mean()) == pytest.approx(0.5, abs=2e-3)
    # embeddings (and the tied lm_head) are untouched
    assert torch.equal(w["model.embed_tokens.weight"], _weights(tiny)["model.embed_tokens.weight"])


def test_magnitude_exact_per_row(tiny, made):
    out, _ = made(tiny, method="magnitude", sparsity=0.3)
    for name, t in _weights(out).items():
        if name.endswith("proj.weight"):
            k = round(0.3 * t.shape[1])
            assert ((t == 0).sum(1) == k).all(), name  # exactly k zeros in every row (random weights: no ties)


@pytest.mark.parametrize("method, structure", [("magnitude", "2:4"), ("sparsegpt", "2:4"), ("wanda", "4:8"), ("magnitude", "1:4")])
def test_nm_pattern(tiny, made, method, structure):
    out, rec = made(tiny, method=method, structure=structure)
    n, m = map(int, structure.split(":"))
    assert rec["checks"]["nm"]["valid"] and rec["checks"]["nm"]["violations"] == 0
    for name, t in _weights(out).items():
        if name.endswith("proj.weight"):
            nnz = (t.reshape(t.shape[0], -1, m) != 0).sum(-1)
            assert (nnz <= n).all(), name
    assert rec["checks"]["sparsity"]["total"] == pytest.approx(1 - n / m, abs=1e-3)


def test_magnitude_sparsity_is_verified(tiny, tmp_path, monkeypatch):
    """A pruning step that silently does nothing (like llm-compressor's MagnitudePruningModifier) is refused."""
    from comptrust.compress import prune
    from comptrust.errors import RuntimeFailure

    monkeypatch.setattr(prune, "magnitude_prune_", lambda w, s, nm: None)
    with pytest.raises(RuntimeFailure, match="did not take effect"):
        compress(str(tiny), CompressionConfig.build(method="magnitude"), tmp_path / "noop")
    assert not (tmp_path / "noop").exists() and list(tmp_path.iterdir()) == []


# -- outputs ----------------------------------------------------------------------------------------------------
def test_record_fields(tiny, made):
    _, rec = made(tiny, method="wanda", structure="4:8")
    for key in ("method", "bits", "group_size", "sparsity", "structure", "seed", "calibration", "source_model",
                "wall_time_s", "peak_rss_bytes", "versions", "checks", "config"):
        assert key in rec, key
    assert rec["calibration"]["n_used"] == 16 and rec["calibration"]["source"] == "comptrust-instruct-v1"
    p = rec["checks"]["perplexity"]
    assert p["before"] > 1 and p["after"] > 1 and p["tokens"] > 100
    assert CompressionConfig.model_validate(rec["config"]).structure == "4:8"


def test_evaluation_dir_dense_copy(tiny, made):
    out, rec = made(tiny, method="gptq", bits=4)
    d = evaluation_dir(out, "fp-test-" + rec["checks"]["perplexity"]["text_sha256"])
    assert d != out and not is_quantized_checkpoint(d)
    assert evaluation_dir(out, "fp-test-" + rec["checks"]["perplexity"]["text_sha256"]) == d  # cached
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    w = _weights(d)
    assert not any(k.endswith(("weight_scale", "weight_zero_point", "weight_shape")) for k in w)
    deq = load_model(out)
    for name, mod in decoder_linears(deq).items():
        assert torch.equal(w[f"{name}.weight"], mod.weight.detach()), name
    pruned, _ = made(tiny, method="magnitude", structure="2:4")
    assert evaluation_dir(pruned, "whatever") == pruned


def test_compressed_checkpoint_is_a_valid_model_spec(tiny, made):
    from comptrust.models.resolve import resolve

    out, rec = made(tiny, method="gptq", bits=4)
    r = resolve(str(out))
    assert r.meta["compression"]["method"] == "gptq" and r.fingerprint != rec["source_model"]["fingerprint"]
