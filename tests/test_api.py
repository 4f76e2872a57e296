"""The public API: `import comptrust` is light, its functions are the CLI's, its results are typed and
round-trip through JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import comptrust
from comptrust.errors import UsageError
from comptrust.results import EvalResult, PerspectiveResult, StudyResult
from tests.study.test_analysis import fake_study


def test_import_is_lazy_and_names_are_public():
    code = ("import sys, comptrust; heavy = [m for m in ('torch', 'transformers', 'comptrust.api', 'pandas') "
            "if m in sys.modules]; print(heavy); print(sorted(n for n in comptrust.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]"
    for name in ("evaluate", "compress", "run_study", "load_study", "build_report", "EvalConfig"):
        assert name in out[1]
    with pytest.raises(AttributeError):
        comptrust.no_such_thing  # noqa: B018


def test_evaluate_and_compress_are_callable_and_still_modules():
    import comptrust.evaluate as ev  # the submodule, used as before

    assert ev is sys.modules["comptrust.evaluate"] and hasattr(ev, "check_out_dir")
    assert callable(comptrust.evaluate) and callable(comptrust.compress)
    assert comptrust.compress is sys.modules["comptrust.compress"]
    import inspect

    assert {"model", "perspectives", "out", "config"} <= set(inspect.signature(comptrust.evaluate).parameters)
    assert {"model", "method", "out"} <= set(inspect.signature(comptrust.compress).parameters)
    # calling runs the API function: its argument checks answer, before any model is touched
    with pytest.raises(UsageError, match="out: the results folder is required"):
        comptrust.evaluate(perspectives=["ethics"])
    with pytest.raises(UsageError, match="unknown key 'limt'"):
        comptrust.evaluate(perspectives=["ethics"], out="unused", limt=1)
    with pytest.raises(UsageError, match="method 'gptqq': choose one of gptq"):
        comptrust.compress(method="gptqq", out="unused")
    with pytest.raises(UsageError, match="--bits 9 is outside 2..8"):
        comptrust.compress(method="gptq", bits=9, out="unused")


def test_cli_evaluate_calls_the_api(monkeypatch, tmp_path):
    """`comptrust evaluate` builds an EvalConfig from its options and hands it to comptrust.api.evaluate."""
    import comptrust.api as api
    from comptrust.cli import main

    seen = {}

    def fake(model, perspectives, out, config=None, progress=None, cli_names=False):
        seen.update(model=model, perspectives=perspectives, out=out, config=config, cli_names=cli_names)
        return EvalResult(out_dir=out, perspectives={}, generation={"generated": 0, "new_tokens": 0,
                                                                      "tokens_per_s": 0, "cache_hits": 0})

    monkeypatch.setattr(api, "evaluate", fake)
    main(["evaluate", "-p", "ethics", "--limit", "2", "--n", "3", "--dt-quirks", "--out", str(tmp_path / "o")])
    cfg = seen["config"]
    assert (cfg.limit, cfg.n, cfg.dt_quirks, seen["perspectives"], seen["cli_names"]) == (2, 3, True, "ethics", True)


def test_eval_result_json_round_trip(tmp_path):
    r = EvalResult(
        out_dir=tmp_path,
        perspectives={"ethics": PerspectiveResult(perspective="ethics", score=61.5, refusal_rate=2.0, n_items=8,
                                                  n_generations=8, subscores={"jiminy": 50.0},
                                                  future_key={"kept": True})},
        not_run={"privacy": "missing data file x"},
        config=comptrust.EvalConfig.build(limit=2).model_dump(mode="json"),
        config_fingerprint=comptrust.EvalConfig.build(limit=2).fingerprint(),
    )
    back = EvalResult.model_validate_json(r.model_dump_json())
    assert back == r and back.score("ethics") == 61.5
    assert back.perspectives["ethics"].model_extra == {"future_key": {"kept": True}}
    with pytest.raises(KeyError, match="'toxicity' was not scored; scored: ethics"):
        back.score("toxicity")
    # and from a scores.json on disk
    (tmp_path / "scores.json").write_text(json.dumps({
        "perspectives": {"ethics": r.perspectives["ethics"].model_dump()}, "not_run": r.not_run,
        "config": r.config, "config_fingerprint": r.config_fingerprint}))
    loaded = EvalResult.load(tmp_path)
    assert loaded.perspectives == r.perspectives and loaded.config_fingerprint == r.config_fingerprint
    with pytest.raises(UsageError, match="holds no scores.json"):
        EvalResult.load(tmp_path / "nowhere")


def test_load_study_long_form_matches_the_analysis(tmp_path):
    pytest.importorskip("pandas")
    spec, scores = fake_study(tmp_path, {"dense": 1.0, "rtn-w4@s0": 1.0, "rtn-w4@s1": 0.5,
                                         "magnitude-2of4@s0": 0.0})
    s = comptrust.build_report(tmp_path)  # writes results.json, then reads it back with the store
    assert isinstance(s, StudyResult) and s.dense == "dense"
    df = s.to_pandas()
    # one row per variant x seed x perspective
    assert len(df) == (1 + 2 + 1) * 2
    assert list(df.columns)[:5] == ["variant", "instance", "seed", "perspective", "status"]
    for (inst, pname), sc in scores.items():
        row = df[(df.instance == inst) & (df.perspective == pname)].iloc[0]
        assert row.score == pytest.approx(sc) and row.status == "done"
        assert row.ci_low <= row.ci_high and row.n_items > 0
    assert set(df[df.variant == "rtn-w4"].seed) == {0, 1} and df[df.variant == "dense"].seed.isna().all()
    # the recommendation and the per-variant summaries come with it; JSON round trip
    assert s.recommendation.variant is None and s.recommendation.rejected
    assert StudyResult.model_validate_json(s.to_json()) == s
    assert comptrust.load_study(tmp_path) == s
    with pytest.raises(UsageError, match="is not a study directory"):
        comptrust.load_study(tmp_path / "nothing")


def test_run_study_takes_a_dict_and_refuses_bad_keys(tmp_path):
    with pytest.raises(UsageError, match="unknown key 'bitz' in the study"):
        comptrust.run_study({"bitz": 4}, out=tmp_path / "s")
    with pytest.raises(UsageError, match="n 0: must be a positive number of samples"):
        comptrust.run_study({"n": 0}, out=tmp_path / "s")
    with pytest.raises(UsageError, match="out: the study folder is required"):
        comptrust.run_study({"variants": ["dense"]})


@pytest.mark.model
def test_evaluate_for_real_writes_config_and_fingerprint(tmp_path):
    r = comptrust.evaluate(perspectives=["ethics"], out=tmp_path / "o", limit=1, progress=False)
    assert set(r.perspectives) == {"ethics"} and r.perspectives["ethics"].n_items > 0
    doc = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert doc["config"]["limit"] == 1
    assert doc["config_fingerprint"] == comptrust.EvalConfig.build(limit=1).fingerprint() == r.config_fingerprint
    assert EvalResult.load(tmp_path / "o").perspectives["ethics"].score == r.score("ethics")


def test_compress_with_a_recipe_needs_no_method(tmp_path):
    # like `comptrust compress --recipe FILE`: recipe= alone means method recipe, validated before any model loads
    import comptrust

    bad = tmp_path / "r.yaml"
    bad.write_text("stage:\n  modifiers:\n    NoSuchModifier: {}\n")
    with pytest.raises(comptrust.UsageError, match=r"r\.yaml"):
        comptrust.compress(recipe=str(bad), out=tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    with pytest.raises(comptrust.UsageError, match="method None"):
        comptrust.compress(out=tmp_path / "ck")
