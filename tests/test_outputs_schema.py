"""scores.json and results.json follow the JSON Schemas shipped in comptrust/schemas/, checked on real outputs:
a real evaluation (every perspective, mini suite, through the command line) and a real study with its report,
both on a scripted engine (deterministic texts that parse into every kind of label), so no model is needed.
Also: the run header (schema version, ISO time, command line, versions), CIs and item counts, per-generation
toxicity in generations.jsonl, and --gen-kwargs marked 'not DecodingTrust'."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")

from comptrust.engine.fake import FakeEngine  # noqa: E402
from comptrust.outputs import SCHEMA_DIR, schema  # noqa: E402
from comptrust.types import Prompt  # noqa: E402

WORDS = ["I agree.", "I disagree.", "A", "B", "C", "D", "Yes", "No", "positive", "negative", "wrong", "not wrong",
         "You are a stupid idiot and I hate you.", "I'm sorry, I cannot help with that.", "john@example.com", "0", "1"]


def _words(prompt: Prompt, params, seed) -> list[str]:
    """Each output is a word picked by a hash of (prompt, sample): stable across runs, varied across items."""
    return [WORDS[int(hashlib.sha256(f"{prompt.identity()}|{j}".encode()).hexdigest(), 16) % len(WORDS)]
            for j in range(params.n)]


@pytest.fixture
def scripted(monkeypatch):
    engine = FakeEngine(_words, fingerprint="scripted-schema-v1")

    @contextmanager
    def fake_open_engine(model, *a, **k):
        yield engine, {"name": "scripted", "kind": "scripted", "fingerprint": engine.fingerprint}

    import comptrust.engine.select as select

    monkeypatch.setattr(select, "open_engine", fake_open_engine)
    return engine


def _validate(doc: dict, kind: str) -> None:
    jsonschema.Draft202012Validator.check_schema(schema(kind))
    errors = sorted(jsonschema.Draft202012Validator(schema(kind)).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def _cli(argv: list[str]) -> None:
    from comptrust.cli import main

    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), e


def test_scores_json_of_a_real_evaluation_follows_the_schema(tmp_path, scripted, monkeypatch):
    out = tmp_path / "run"
    argv = ["evaluate", "-p", "all", "--limit", "2", "--out", str(out), "--no-progress"]
    monkeypatch.setattr("sys.argv", ["comptrust", *argv])
    _cli(argv)
    doc = json.loads((out / "scores.json").read_text())
    _validate(doc, "scores")
    assert doc["schema_version"] == "1.0"
    assert datetime.fromisoformat(doc["created"]).utcoffset() is not None
    assert doc["command"] == "comptrust " + " ".join(argv[:-3]) + f" --out {out} --no-progress"
    assert {"comptrust", "python", "torch", "transformers"} <= set(doc["versions"])
    assert set(doc["perspectives"]) == {"toxicity", "stereotype", "advglue", "ood", "adv_demo", "privacy", "ethics",
                                        "fairness", "mmlu"} - set(doc["not_run"])
    for name, p in doc["perspectives"].items():
        assert sum(p["n_items_by_group"].values()) == p["n_items"], name
        if p["score"] is not None and p["ci95"]["low"] is not None:
            assert p["ci95"]["low"] <= p["score"] + 1e-9 or p["ci95"]["high"] >= p["score"] - 1e-9, name
            assert p["ci95"]["low"] <= p["ci95"]["high"], name
    assert any(p["ci95"] and p["ci95"]["low"] is not None for p in doc["perspectives"].values())
    # toxicity: each generation carries its own score, and the perspective's EMT is made of them
    tox = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    tox = [g for g in tox if g["perspective"] == "toxicity"]
    assert tox and all(isinstance(x["value"], float) and 0 <= x["value"] <= 1 for g in tox for x in g["parsed"])
    emt = doc["perspectives"]["toxicity"]["metrics"]["expected_max_toxicity"]
    by_group: dict[str, list[float]] = {}
    for g in tox:
        by_group.setdefault(g["group"], []).append(max(x["value"] for x in g["parsed"]))
    assert emt == pytest.approx(sum(sum(v) / len(v) for v in by_group.values()) / len(by_group))
    assert "off_protocol" not in doc


def test_gen_kwargs_change_decoding_and_are_marked_not_decodingtrust(tmp_path, scripted, monkeypatch):
    out = tmp_path / "off"
    _cli(["evaluate", "-p", "Stereotype,ETHICS", "--limit", "1", "--out", str(out), "--no-progress",
          "--gen_kwargs", "max_gen_toks=7,temperature=0.7"])
    doc = json.loads((out / "scores.json").read_text())
    _validate(doc, "scores")
    assert doc["off_protocol"]["gen_kwargs"] == {"max_new_tokens": 7, "temperature": 0.7}
    assert "not DecodingTrust" in doc["off_protocol"]["note"]
    assert doc["options"]["gen_kwargs"] == "max_new_tokens=7,temperature=0.7"
    assert {p.params.max_new_tokens for p in scripted.prompts} == {7}
    assert {p.params.temperature for p in scripted.prompts} == {0.7}
    for p in doc["perspectives"].values():
        assert any("not DecodingTrust" in n for n in p["notes"])
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert all(g["params"]["max_new_tokens"] == 7 for g in gens)


def test_results_json_of_a_real_study_follows_the_schema(tmp_path, scripted, monkeypatch):
    pytest.importorskip("matplotlib")
    from comptrust.study.runner import run_study, write_report
    from comptrust.study.spec import parse_spec

    spec = parse_spec({"variants": ["dense"], "perspectives": ["ethics", "stereotype"], "limit": 2}, "<test>")
    out = tmp_path / "study"
    run_study(spec, out, progress=False)
    write_report(out)
    doc = json.loads((out / "results.json").read_text())
    _validate(doc, "results")
    assert doc["schema_version"] == "1.0" and datetime.fromisoformat(doc["created"]).utcoffset() is not None
    assert doc["versions"]["comptrust"]


def test_results_json_with_verdicts_and_flags_follows_the_schema(tmp_path):
    """A study with compressed variants (stored units from scripted answers through the real parsers and scores,
    then the real analysis): its verdicts, flags and recommendation are in results.json and valid; a bad verdict
    or flag is refused by the schema."""
    pytest.importorskip("matplotlib")
    from comptrust.study.runner import write_report
    from tests.report.test_renderer import scripted_study

    scripted_study(tmp_path)
    write_report(tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    _validate(doc, "results")
    cells = {(n, p): c for n, row in doc["analysis"]["variants"].items() for p, c in row["perspectives"].items()}
    verdicts = {c["verdict"]["verdict"] for c in cells.values() if c.get("verdict")}
    assert verdicts == {"keeps", "loses", "undecided"}
    assert "degenerate" in doc["analysis"]["variants"]["magnitude-2of4"]["flags"]
    assert cells[("wanda-50pct", "stereotype")]["flags"] == ["confounded by refusals"]
    assert doc["analysis"]["recommendation"]["text"] and "undecided" in doc["analysis"]["recommendation"]
    v = jsonschema.Draft202012Validator(schema("results"))
    bad = json.loads(json.dumps(doc))
    bad["analysis"]["variants"]["rtn-w8"]["perspectives"]["ethics"]["verdict"]["verdict"] = "ship it"
    assert not v.is_valid(bad)
    bad = json.loads(json.dumps(doc))
    bad["analysis"]["variants"]["rtn-w8"]["perspectives"]["ethics"]["flags"] = ["looks fine"]
    assert not v.is_valid(bad)
    bad = json.loads(json.dumps(doc))
    del bad["analysis"]["recommendation"]["variant"]
    assert not v.is_valid(bad)


def test_schema_rejects_what_it_should(tmp_path):
    """The schemas are not vacuous: a scores.json without its header, or with a bad CI, fails."""
    good = {"schema_version": "1.0", "created": "2026-12-02T00:00:00+00:00", "command": "comptrust evaluate",
            "versions": {"comptrust": "0.1.0", "python": "3.11"}, "comptrust_version": "0.1.0", "model": {},
            "options": {"data_dir": "x", "profile": "mini", "limit": None, "n": None, "seed": 0, "dt_quirks": False,
                        "original_scoring": False},
            "perspectives": {}, "not_run": {},
            "generation": {"requests": 0, "unique": 0, "cache_hits": 0, "generated": 0, "new_tokens": 0,
                           "seconds": 0}, "wall_seconds": 0}
    v = jsonschema.Draft202012Validator(schema("scores"))
    assert v.is_valid(good)
    assert not v.is_valid({k: x for k, x in good.items() if k != "schema_version"})
    assert not v.is_valid({**good, "created": "yesterday"})
    assert not v.is_valid({**good, "perspectives": {"ethics": {"perspective": "ethics", "score": 50}}})


def test_schemas_ship_as_package_data():
    import tomllib

    proj = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "schemas/*.json" in proj["tool"]["setuptools"]["package-data"]["comptrust"]
    assert {p.name for p in SCHEMA_DIR.glob("*.schema.json")} == {"scores.schema.json", "results.schema.json"}


def test_ci_at_limit_1_pools_single_item_sub_scenarios(tmp_path, scripted):
    """At --limit 1 every sub-scenario holds one item; pooled into one stratum they still give an interval (as the
    study's analysis does), instead of the zero-width one a per-sub-scenario resample would give."""
    from comptrust.evaluate import resampling_strata

    out = tmp_path / "l1"
    _cli(["evaluate", "-p", "ethics,ood", "--limit", "1", "--out", str(out), "--no-progress"])
    doc = json.loads((out / "scores.json").read_text())
    _validate(doc, "scores")
    for name in ("ethics", "ood"):
        p = doc["perspectives"][name]
        assert set(p["n_items_by_group"].values()) == {1}
        assert p["ci95"]["low"] is not None and p["ci95"]["low"] < p["ci95"]["high"], (name, p["ci95"])

    class R:  # the pooling rule on its own
        def __init__(self, g):
            self.item = type("I", (), {"group": g})()

    recs = [R(g) for g in ["a", "a", "b", "c", "d", "d", "d"]]
    assert resampling_strata(recs) == [[0, 1], [4, 5, 6], [2, 3]]
    assert resampling_strata([R("a"), R("a"), R("b")]) == [[0, 1, 2]]  # a lone single joins the smallest
