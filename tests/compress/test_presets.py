"""Scheme presets beyond weight-only (gptq-w8a8: SmoothQuant + GPTQ W8A8 INT8; fp8-dynamic: FP8_DYNAMIC) and
2:4-pruned checkpoints' compressed-tensors sparse-24-bitmask copy, on the tiny random Llama of tests/compress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comptrust.compress.config import CompressionConfig
from comptrust.compress.sparse24 import FORMAT, SPARSE_DIR, compress_24, decompress_24, read_sparse24
from comptrust.errors import UsageError
from tests.compress import build_tiny


# -- presets: configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, calibrated", [("gptq-w8a8", True), ("fp8-dynamic", False)])
def test_preset_defaults(name, calibrated):
    c = CompressionConfig.build(method=name)
    assert (c.bits, c.group_size, c.label()) == (8, 0, name)
    assert (c.n_calib is not None) == calibrated
    assert CompressionConfig.build(method=name, bits=8, group_size=0) == c  # a stored config reloads


@pytest.mark.parametrize("kwargs, needle", [
    (dict(method="gptq-w8a8", bits=4), "--bits 4 makes no sense with gptq-w8a8"),
    (dict(method="fp8-dynamic", group_size=128), "--group-size 128 makes no sense with fp8-dynamic"),
    (dict(method="fp8-dynamic", calibration="x.jsonl"), "uses no calibration data"),
    (dict(method="gptq-w8a8", sparsity=0.5), "--sparsity 0.5"),
])
def test_preset_refusals(kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        CompressionConfig.build(**kwargs)


def test_study_variant_presets():
    from comptrust.study.spec import parse_spec

    spec = parse_spec({"variants": [{"method": "gptq-w8a8"}, {"method": "fp8-dynamic"}], "perspectives": ["ethics"]})
    assert [(v.name, v.bits()) for v in spec.variants[1:]] == [("gptq-w8a8", 8.0), ("fp8-dynamic", 8.0)]


# -- presets: real runs on the tiny model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-presets") / "model")


def _logits(model_dir: Path) -> torch.Tensor:
    from comptrust.models.evalcopy import load_model

    m = load_model(model_dir)
    m.eval()
    with torch.no_grad():
        return m(torch.arange(3, 40).unsqueeze(0)).logits


@pytest.mark.parametrize("name, fmt, wtype", [("gptq-w8a8", "int-quantized", "int"),
                                              ("fp8-dynamic", "float-quantized", "float")])
def test_preset_runs_saves_and_its_evaluation_copy_loads(name, fmt, wtype, tiny, tmp_path):
    from comptrust.compress import compress
    from comptrust.models.evalcopy import evaluation_dir, is_quantized_checkpoint

    extra = dict(n_calib=8, seq_len=64) if name == "gptq-w8a8" else {}
    out = compress(str(tiny), CompressionConfig.build(method=name, **extra), tmp_path / name)
    rec = json.loads((out / "comptrust.json").read_text())
    assert rec["bits"] == 8 and rec["group_size"] == 0 and rec["checks"]["levels"]["max"] <= 256
    assert "not quantized in comptrust's CPU evaluation" in rec["method_details"]["scheme"]["activations"]
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    g = q["config_groups"]["group_0"]
    assert g["format"] == fmt and g["weights"]["type"] == wtype and g["weights"]["num_bits"] == 8
    act = g["input_activations"]  # stored for the server: 8-bit, dynamic, per token
    assert act["num_bits"] == 8 and act["dynamic"] is True and act["strategy"] == "token"
    assert is_quantized_checkpoint(out)
    ev = evaluation_dir(out, f"test-{name}-{tmp_path.name}")
    assert not is_quantized_checkpoint(ev)  # the plain dense copy evaluation runs on
    dense, compressed = _logits(tiny), _logits(ev)
    assert torch.isfinite(compressed).all()
    assert not torch.allclose(dense, compressed)  # the quantization changed the outputs
    # the dense copy holds the checkpoint's (dequantized) weight values, bit for bit
    ckpt = dict(load_model(out).named_parameters())
    copy = dict(load_model(ev).named_parameters())
    assert all(torch.equal(copy[k], ckpt[k]) for k in copy if k.endswith(".weight"))
    # the README's deviation, measured: transformers' decompressed load still rounds activations to 8 bits per
    # token (the scheme stays attached), the dense copy comptrust evaluates does not, so their outputs differ
    assert not torch.allclose(_logits(out), compressed)


def load_model(d: Path):
    from comptrust.models.evalcopy import load_model as load

    return load(d)


# -- 2:4 sparse format -----------------------------------------------------------------------------------------
def test_24_round_trip_is_exact():
    torch.manual_seed(0)
    w = torch.randn(6, 16, dtype=torch.bfloat16)
    groups = w.view(6, 4, 4)
    groups.scatter_(-1, groups.abs().float().topk(2, dim=-1, largest=False).indices, 0)
    w[0, :4] = 0  # a group with no nonzero at all
    w[1, 4:8] = torch.tensor([0, 0, 0, 1.5])  # and one with a single nonzero
    parts = compress_24(w)
    assert parts["compressed"].shape == (6, 8) and parts["bitmask"].shape == (6, 2)
    assert parts["bitmask"].dtype == torch.uint8 and parts["shape"].flatten().tolist() == [6, 16]
    assert torch.equal(decompress_24(**parts), w)


def test_24_refuses_a_weight_that_is_not_24():
    from comptrust.errors import RuntimeFailure

    with pytest.raises(RuntimeFailure, match="more than 2 nonzeros"):
        compress_24(torch.ones(2, 8))


@pytest.mark.parametrize("structure, sparse_copy", [("2:4", True), ("4:8", False)])
def test_pruned_24_checkpoint_gets_a_sparse_24_bitmask_copy(structure, sparse_copy, tiny, tmp_path):
    from compressed_tensors.config import SparsityCompressionConfig

    from comptrust.compress import compress
    from comptrust.models.evalcopy import evaluation_dir

    out = compress(str(tiny), CompressionConfig.build(method="magnitude", structure=structure), tmp_path / "p")
    rec = json.loads((out / "comptrust.json").read_text())
    assert (out / SPARSE_DIR).is_dir() == sparse_copy == ("sparse_2of4" in rec)
    assert evaluation_dir(out, "unused") == out  # evaluation keeps the dense checkpoint
    if not sparse_copy:
        return
    cfg = json.loads((out / SPARSE_DIR / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sc["format"] == FORMAT == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    # compressed-tensors' own config class (registered under the format name) accepts it
    parsed = SparsityCompressionConfig.load_from_registry(sc["format"], **{k: v for k, v in sc.items() if k != "format"})
    assert parsed.format == FORMAT and abs(parsed.global_sparsity - 0.5) < 0.01
    dense = load_file(str(out / "model.safetensors"))
    back = read_sparse24(out / SPARSE_DIR)
    assert set(back) == set(dense)
    assert all(torch.equal(back[k], dense[k]) for k in dense)  # the same dense weights, bit for bit
    raw = load_file(str(out / SPARSE_DIR / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.compressed" in raw and "model.layers.0.mlp.down_proj.weight" not in raw
    assert (out / SPARSE_DIR / "tokenizer.json").is_file()
    assert rec["sparse_2of4"]["weights_bytes"] < (out / "model.safetensors").stat().st_size
