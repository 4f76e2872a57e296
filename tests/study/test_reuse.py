"""Studies share compressed checkpoints and generations through $COMPTRUST_HOME (comptrust.study.reuse): a second
study in a fresh --out compresses nothing and generates nothing that the first one made, and `comptrust cache
clear` empties what they share. A tiny random Llama (tests/compress) keeps the real study runs to seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from comptrust.store import Store
from comptrust.study import reuse
from comptrust.types import GenParams


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("COMPTRUST_HOME", str(h))
    monkeypatch.delenv(reuse.ENV, raising=False)
    return h


def _ckpt(d: Path, record: dict) -> Path:
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "comptrust.json").write_text(json.dumps(record))
    return d


def test_checkpoints_are_kept_and_placed_as_links(home, tmp_path):
    src = _ckpt(tmp_path / "study1" / "models" / "v@s0", {"config": {"method": "rtn"}})
    reuse.save_checkpoint("k1", src, "comptrust.json")
    dst = tmp_path / "study2" / "models" / "v@s0"
    assert reuse.restore_checkpoint("k1", dst, "comptrust.json") == {"config": {"method": "rtn"}}
    assert (dst / "model.safetensors").read_bytes() == b"\0" * 64
    assert os.stat(dst / "model.safetensors").st_ino == os.stat(src / "model.safetensors").st_ino  # a hard link
    assert reuse.restore_checkpoint("other-key", tmp_path / "x", "comptrust.json") is None
    assert not (tmp_path / "x").exists()
    # clearing the cache leaves the studies' own links intact
    assert reuse.clear()["checkpoints"] == 1
    assert (dst / "model.safetensors").is_file() and not reuse.cache_root().exists()
    assert reuse.restore_checkpoint("k1", tmp_path / "study3" / "v@s0", "comptrust.json") is None


def test_an_incomplete_cache_entry_is_never_used(home, tmp_path):
    (reuse.cache_root() / "checkpoints" / "k2").mkdir(parents=True)  # no record: a copy that did not finish
    assert reuse.restore_checkpoint("k2", tmp_path / "dst", "comptrust.json") is None
    assert not (tmp_path / "dst").exists()


def test_generations_read_through_the_shared_cache(home, tmp_path):
    p = GenParams(max_new_tokens=4)
    with Store(tmp_path / "a.sqlite") as a, reuse.generations_through_cache(a) as st:
        st.put_generations([("k1", "m1", "prompt 1", p, ["out 1"], [2]), ("k2", "m2", "prompt 2", p, ["out 2"], [3])])
        assert a.count_generations() == 2  # the study's own store has them
    with Store(tmp_path / "b.sqlite") as b, reuse.generations_through_cache(b) as st:
        assert st.get_generations(["k1", "k9"]) == {"k1": (["out 1"], [2])}
        assert st.reused == 1
        # only the hit that was asked for is copied into the study's store, nothing else of the cache
        assert b.get_generations(["k1", "k2"]) == {"k1": (["out 1"], [2])} and b.count_generations() == 1
        assert st.get_generations(["k1"]) == {"k1": (["out 1"], [2])} and st.reused == 1  # now a local hit


def test_cache_off_switch(home, tmp_path, monkeypatch):
    monkeypatch.setenv(reuse.ENV, "off")
    src = _ckpt(tmp_path / "s" / "v", {"config": {}})
    reuse.save_checkpoint("k3", src, "comptrust.json")
    assert not (reuse.cache_root() / "checkpoints" / "k3").exists()
    with Store(tmp_path / "a.sqlite") as a, reuse.generations_through_cache(a) as st:
        assert st is a  # the study's store itself: nothing read from or written to the cache
    assert not (reuse.cache_root() / "generations.sqlite").exists()


def test_cache_command_info_and_clear(home, tmp_path):
    from typer.testing import CliRunner

    from comptrust.cli import app

    reuse.save_checkpoint("k4", _ckpt(tmp_path / "s" / "v", {"config": {}}), "comptrust.json")
    (home / "llama-cpp" / "0.3.36-abc" / "lib").mkdir(parents=True)
    r = CliRunner().invoke(app, ["cache", "info", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["checkpoints"] == 1 and info["llama_cpp_builds"] == ["0.3.36-abc"]
    r = CliRunner().invoke(app, ["cache", "clear"])
    assert r.exit_code == 0 and "1 checkpoints" in r.output
    assert not reuse.cache_root().exists() and (home / "llama-cpp").is_dir()
    r = CliRunner().invoke(app, ["cache", "clear", "--llama-cpp"])
    assert r.exit_code == 0 and not (home / "llama-cpp").exists()


STUDY = {
    "perspectives": ["ethics"],
    "limit": 1,
    "bootstrap": 20,
    "variants": ["dense", {"method": "magnitude", "structure": "2:4"}],
}


def test_a_second_study_reuses_checkpoints_and_generations(home, tmp_path, monkeypatch):
    from comptrust.api import run_study
    from tests.compress import build_tiny

    model = build_tiny(tmp_path / "tiny")
    spec = dict(STUDY, model=str(model))
    first = run_study(spec, tmp_path / "first", progress=False)
    assert reuse.describe()["checkpoints"] == 1 and reuse.describe()["generations"] > 0

    # the second study may neither compress nor generate: both raise if called
    import comptrust.compress.api as capi
    from comptrust.engine.hf import HFEngine

    def refuse(*a, **k):
        raise AssertionError("recomputed what the first study made")

    monkeypatch.setattr(capi, "compress", refuse)
    monkeypatch.setattr(HFEngine, "generate", refuse)
    second = run_study(spec, tmp_path / "second", progress=False)
    assert (tmp_path / "second" / "results.csv").read_text() == (tmp_path / "first" / "results.csv").read_text()
    assert first is not None and second is not None
    ckpt1 = next((tmp_path / "first" / "models").iterdir())
    ckpt2 = next((tmp_path / "second" / "models").iterdir())
    assert ckpt1.name == ckpt2.name
    # (COMPTRUST_STUDY_CACHE=off bypassing both caches is test_cache_off_switch's, without a study run)


def test_a_damaged_generation_cache_only_costs_the_reuse(home, tmp_path, capsys):
    reuse.cache_root().mkdir(parents=True)
    (reuse.cache_root() / "generations.sqlite").write_bytes(b"not a database" * 100)
    p = GenParams(max_new_tokens=1)
    with Store(tmp_path / "a.sqlite") as a, reuse.generations_through_cache(a) as st:
        st.put_generations([("k", "m", "p", p, ["o"], [1])])
        assert st.get_generations(["k", "other"]) == {"k": (["o"], [1])}
        assert a.count_generations() == 1
    err = capsys.readouterr().err
    assert "warning: study cache:" in err and "the study goes on" in err


def test_cache_clear_removes_a_damaged_cache(home):
    from typer.testing import CliRunner

    from comptrust.cli import app

    reuse.cache_root().mkdir(parents=True)
    (reuse.cache_root() / "generations.sqlite").write_bytes(b"garbage" * 100)
    r = CliRunner().invoke(app, ["cache", "info"])
    assert r.exit_code == 0 and "unreadable generations" in r.output
    r = CliRunner().invoke(app, ["cache", "clear"])
    assert r.exit_code == 0 and not reuse.cache_root().exists()
