"""Model resolution: embedded default, GGUF conversion cache, local dirs, bad inputs, Hub offline."""

from __future__ import annotations

import shutil
import time

import pytest

from comptrust.errors import UsageError
from comptrust.models import resolve
from comptrust.models.gguf_convert import inspect_gguf
from comptrust.models.resolve import embedded_gguf


@pytest.fixture(scope="module")
def embedded():
    return resolve(None)


def test_embedded_default_resolves_with_fingerprint_and_q4_note(embedded):
    assert embedded.kind == "embedded"
    assert (embedded.path / "model.safetensors").is_file()
    assert (embedded.path / "tokenizer_config.json").is_file()
    assert len(embedded.fingerprint) == 64
    assert "Q4_1" in embedded.meta["quantization_note"]
    assert embedded.meta["gguf"]["tensor_types"]["Q4_1"] == 210


def test_second_resolve_skips_conversion(embedded, monkeypatch):
    import comptrust.models.gguf_convert as gc

    def boom(*a, **k):  # any attempt to load the GGUF through transformers again fails the test
        raise AssertionError("converted twice")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", boom)
    t = time.time()
    again = resolve(None)
    assert again.path == embedded.path and again.fingerprint == embedded.fingerprint
    assert time.time() - t < 10
    assert gc.META_NAME


def test_gguf_path_and_local_dir(embedded):
    g = resolve(str(embedded_gguf()))
    assert g.kind == "gguf" and g.fingerprint == embedded.fingerprint
    d = resolve(str(embedded.path))
    assert d.kind == "dir" and len(d.fingerprint) == 64


def test_dir_fingerprint_changes_with_content(embedded, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(embedded.path, copy)
    a = resolve(str(copy)).fingerprint
    cfg = copy / "generation_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "comptrust_test": 1}', 1))
    assert resolve(str(copy)).fingerprint != a


def test_truncated_gguf(tmp_path):
    src = embedded_gguf()
    bad = tmp_path / "trunc.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    with pytest.raises(UsageError, match="trunc.gguf"):
        resolve(str(bad))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(UsageError, match="not a GGUF file"):
        resolve(str(bad))


def test_corrupt_gguf_header(tmp_path):
    bad = tmp_path / "c.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 200)
    with pytest.raises(UsageError, match="c.gguf"):
        inspect_gguf(bad)


def test_unknown_path():
    with pytest.raises(UsageError, match="no such file or directory"):
        resolve("./definitely/not/here")


def test_dir_without_config(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        resolve(str(tmp_path))


def test_hub_id_offline_fails_clearly():
    t = time.time()
    with pytest.raises(UsageError, match="cannot get model 'someorg/somemodel' from the Hugging Face Hub"):
        resolve("someorg/somemodel")
    assert time.time() - t < 30
