"""The SQLite store: real database files, WAL, round trips, and the cache key's ingredients."""

from __future__ import annotations

import sqlite3

import pytest

from comptrust.errors import UsageError
from comptrust.store import Store, generation_key
from comptrust.types import GenParams


def test_roundtrip_and_persistence(tmp_path):
    p = GenParams(max_new_tokens=8)
    with Store(tmp_path / "s.sqlite") as s:
        k = generation_key("fp", "hello", p)
        s.put_generations([(k, "fp", "hello", p, ["a", "b"], [1, 2])])
        assert s.get_generations([k, "missing"]) == {k: (["a", "b"], [1, 2])}
    with Store(tmp_path / "s.sqlite") as s:  # reopened: committed data is there
        assert s.count_generations("fp") == 1
        mode = s.db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_key_names_model_prompt_params_and_seed():
    g = GenParams(max_new_tokens=8, temperature=1.0, seed=0)
    base = generation_key("m1", "p", g)
    assert generation_key("m2", "p", g) != base
    assert generation_key("m1", "q", g) != base
    assert generation_key("m1", "p", GenParams(max_new_tokens=9, temperature=1.0)) != base
    assert generation_key("m1", "p", GenParams(max_new_tokens=8, temperature=1.0, seed=1)) != base
    assert generation_key("m1", "p", GenParams(max_new_tokens=8, temperature=1.0, n=2)) != base


def test_greedy_key_ignores_sampling_knobs():
    a = generation_key("m", "p", GenParams(max_new_tokens=8, temperature=0.0, seed=1, top_p=0.5))
    b = generation_key("m", "p", GenParams(max_new_tokens=8, temperature=0.0, seed=2))
    assert a == b


def test_scores_latest_per_key(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        s.put_score("fp", "stereotype", {"limit": 1}, {"score": 1})
        s.put_score("fp", "stereotype", {"limit": 1}, {"score": 2})
        s.put_score("fp", "stereotype", {"limit": 2}, {"score": 3})
        got = sorted(x["score"]["score"] for x in s.latest_scores("fp"))
    assert got == [2, 3]


def test_kv_cache(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        s.kv_put_many("tox:x", {"a": 0.5, "b": None})
        assert s.kv_get_many("tox:x", ["a", "b", "c"]) == {"a": 0.5, "b": None}


def test_not_a_database_is_a_usage_error(tmp_path):
    bad = tmp_path / "s.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(UsageError, match="not a comptrust results database"):
        Store(bad)


def test_committed_rows_survive_a_crashed_writer(tmp_path):
    """A transaction that never commits leaves earlier commits intact and adds nothing."""
    p = GenParams(max_new_tokens=8)
    s = Store(tmp_path / "s.sqlite")
    s.put_generations([("k1", "fp", "x", p, ["a"], [1])])
    s.db.execute("BEGIN")
    s.db.execute(
        "INSERT INTO generations(key, model, prompt, params, outputs, n_tokens, created) VALUES ('k2','fp','y','{}','[]','[]',0)"
    )
    s.db.close()  # no commit: like a kill in the middle of a chunk
    with Store(tmp_path / "s.sqlite") as s2:
        assert set(s2.get_generations(["k1", "k2"])) == {"k1"}
    assert sqlite3.connect(tmp_path / "s.sqlite").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
