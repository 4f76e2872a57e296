"""CompressionConfig validation: defaults per method, one-line UsageErrors that name the bad value."""

import pytest

from comptrust.compress.config import CompressionConfig, parse_structure
from comptrust.compress.quantize import group_size_for
from comptrust.errors import UsageError


def test_defaults_per_method():
    q = CompressionConfig.build(method="gptq")
    assert (q.bits, q.group_size, q.sparsity, q.structure, q.n_calib) == (4, 128, None, None, 128)
    p = CompressionConfig.build(method="wanda")
    assert (p.bits, p.group_size, p.sparsity, p.structure) == (None, None, 0.5, "unstructured")
    assert CompressionConfig.build(method="sparsegpt", structure="4:8").sparsity == 0.5
    assert CompressionConfig.build(method="magnitude", structure="1:4").sparsity == 0.75
    assert CompressionConfig.build(method="awq").awq_grid >= 1
    assert CompressionConfig.build(method="rtn").n_calib is None  # data-free
    assert CompressionConfig.build(method="gptq").calib_batch == 16
    assert CompressionConfig.build(method="rtn").calib_batch is None


def test_roundtrip_json():
    c = CompressionConfig.build(method="sparsegpt", structure="2:4", seed=3)
    assert CompressionConfig.model_validate(c.model_dump()) == c
    with pytest.raises(Exception):
        CompressionConfig.model_validate({**c.model_dump(), "unknown": 1})  # extra="forbid"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(method="gptq", bits=1), "--bits 1"),
        (dict(method="gptq", bits=9), "--bits 9"),
        (dict(method="magnitude", sparsity=0.0), "--sparsity 0.0"),
        (dict(method="magnitude", sparsity=1.0), "--sparsity 1.0"),
        (dict(method="wanda", sparsity=-0.2), "--sparsity -0.2"),
        (dict(method="sparsegpt", structure="4:4"), "--structure 4:4"),
        (dict(method="sparsegpt", structure="8:4"), "--structure 8:4"),
        (dict(method="sparsegpt", structure="0:4"), "--structure 0:4"),
        (dict(method="sparsegpt", structure="two:four"), "--structure 'two:four'"),
        (dict(method="sparsegpt", structure="2:4", sparsity=0.7), "--sparsity 0.7"),
        (dict(method="gptq", sparsity=0.5), "--sparsity 0.5"),
        (dict(method="awq", structure="2:4"), "--structure 2:4"),
        (dict(method="wanda", bits=4), "--bits 4"),
        (dict(method="magnitude", group_size=64), "--group-size 64"),
        (dict(method="gptq", awq_grid=5), "--awq-grid 5"),
        (dict(method="rtn", calibration="x.jsonl"), "--calibration x.jsonl"),
        (dict(method="magnitude", n_calib=8), "--n-calib 8"),
        (dict(method="gptq", n_calib=0), "--n-calib 0"),
        (dict(method="gptq", calib_batch=0), "--calib-batch 0"),
        (dict(method="magnitude", calib_batch=4), "--calib-batch 4"),
        (dict(method="gptq", group_size=-1), "--group-size -1"),
        (dict(method="quantum"), "--method 'quantum'"),
    ],
)
def test_bad_settings_one_line(kwargs, needle):
    with pytest.raises(UsageError) as e:
        CompressionConfig.build(**kwargs)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert e.value.exit_code == 2


def test_structure_and_group_rules():
    assert parse_structure("unstructured") is None
    assert parse_structure("2:4") == (2, 4)
    assert group_size_for(576, 128) == 64  # SmolLM2's hidden width
    assert group_size_for(1536, 128) == 128
    assert group_size_for(192, 128) == 64
    assert group_size_for(576, 0) == 0  # per channel


def test_actorder_only_for_gptq():
    from comptrust.compress.config import CompressionConfig

    assert CompressionConfig.build(method="gptq", actorder="group").actorder == "group"
    with pytest.raises(UsageError, match="--actorder group makes no sense with awq"):
        CompressionConfig.build(method="awq", actorder="group")
