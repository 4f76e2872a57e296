"""Non-inferiority verdicts, degenerate-model guards and the published comparison, from stored units without a
model: hand-written outputs go through the real perspectives' parsers and scores, then the study's analysis."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from scipy import stats

from comptrust import perspectives as registry
from comptrust.errors import UsageError
from comptrust.evaluate import options_for
from comptrust.study.runner import write_report
from comptrust.store import STORE_NAME, Store
from comptrust.study.analysis import (
    CONFOUNDED, DEGENERATE, KEEPS, LOSES, UNDECIDED, gs_boundaries, items_to_decide, obf_spending, se_floor,
    verdict_of,
)
from comptrust.study.plan import SPEC_NAME, Plan, eval_options
from comptrust.study.units import _compact
from comptrust.study.spec import parse_spec
from comptrust.types import Record

Answer = Callable[[str, object, int], str]


def good(pname: str, item, i: int) -> str:
    if pname == "stereotype":
        return "I disagree."
    return item.labels["label"]


def bad(pname: str, item, i: int) -> str:
    if pname == "stereotype":
        return "I agree."
    return "wrong" if item.labels["label"] == "not wrong" else "not wrong"


def garbage(pname: str, item, i: int) -> str:
    return "zq zq zq"


def half(pname: str, item, i: int) -> str:
    return good(pname, item, i) if i % 2 == 0 else bad(pname, item, i)


def build(out: Path, spec_dict: dict, answers: dict[str, Answer], ppl: dict[str, tuple[float, float]] | None = None):
    """A study directory whose every unit is done: answers[instance] writes each item's output."""
    spec = parse_spec(spec_dict)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_NAME).write_text(json.dumps(spec.to_dict()))
    opts = eval_options(spec)
    with Store(out / STORE_NAME) as store:
        for unit in Plan.of(spec).units:
            uid, kind, v, seed, pname, fp = unit.id, unit.kind, unit.variant, unit.seed, unit.perspective, unit.fingerprint
            inst = "dense" if v.is_dense else f"{v.name}@s{seed}"
            if kind == "compress":
                before, after = (ppl or {}).get(inst, (30.0, 31.0))
                rec = {"label": v.name, "checks": {"perplexity": {"before": before, "after": after}}}
                store.put_unit(uid, kind, "done", {"fingerprint": fp, "record": rec}, 2.0)
                continue
            p = registry.get(pname)
            popts = options_for(p, opts)
            loaded = p.load(popts)
            recs = []
            for i, it in enumerate(loaded.items):
                text = answers[inst](pname, it, i)
                recs.append(Record(it, [text], [p.parse(it, text, popts)]))
            sc = p.score(recs, popts, loaded).to_dict()
            store.put_unit(uid, kind, "done", {"fingerprint": fp, "score": sc, "records": _compact(recs),
                                               "model": {"name": inst}}, 3.0)
    return spec


BIG = {"perspectives": ["ethics", "stereotype"], "bootstrap": 200,
       "variants": ["dense", {"method": "rtn", "bits": 4}, {"method": "magnitude", "structure": "2:4"}]}


def test_verdict_function_and_items_to_decide():
    z = stats.norm.ppf(0.95)
    assert verdict_of(0.0, 2.0, 5.0, z) == KEEPS  # 0 - 1.645*2 = -3.3 > -5
    assert verdict_of(-12.0, 2.0, 5.0, z) == LOSES  # -12 + 3.3 < -5
    assert verdict_of(-4.0, 2.0, 5.0, z) == UNDECIDED
    assert verdict_of(0.0, 0.0, 5.0, z) == UNDECIDED  # no variance estimate: never certain
    # n' = n (z se / gap)^2: at n' the same delta is exactly on the boundary
    n = items_to_decide(-2.0, 4.0, 50, 5.0, 0.05)
    se_then = 4.0 * math.sqrt(50 / n)
    assert (-2.0 + 5.0) / se_then == pytest.approx(z, rel=0.02)
    assert items_to_decide(-5.0, 4.0, 50, 5.0, 0.05) is None
    assert se_floor(48) == pytest.approx(100 / 48)


def test_many_equal_items_keep_and_many_bad_items_lose(tmp_path):
    build(tmp_path, BIG, {"dense": good, "rtn-w4@s0": good, "magnitude-2of4@s0": bad})
    a = write_report(tmp_path)
    for p in ("ethics", "stereotype"):
        v = a["variants"]["rtn-w4"]["perspectives"][p]["verdict"]
        assert v["verdict"] == KEEPS and v["counts"] and v["lcb"] > -5
        # identical answers: the bootstrap SD is 0, the bound comes from the 100/n floor
        assert v["se"] == pytest.approx(100 / v["n"])
        assert a["variants"]["magnitude-2of4"]["perspectives"][p]["verdict"]["verdict"] == LOSES
    rec = a["recommendation"]
    assert rec["variant"] == "rtn-w4" and rec["text"].startswith("Ship rtn-w4")
    assert "magnitude-2of4" in rec["rejected"] and "loses" in rec["rejected"]["magnitude-2of4"]
    html = (tmp_path / "report.html").read_text()
    assert "Non-inferiority rule" in html and "✓ keeps" in html and "✗ loses" in html


def test_few_items_are_undecided_and_never_say_ship_dense(tmp_path):
    # limit 2: 24 ethics and 6 stereotype items; the variant answers one more ethics item wrong than dense
    small = {**BIG, "limit": 2, "variants": ["dense", {"method": "rtn", "bits": 4}]}

    def one_off(pname, item, i):
        return bad(pname, item, i) if (pname == "ethics" and i == 0) else good(pname, item, i)

    build(tmp_path, small, {"dense": good, "rtn-w4@s0": one_off})
    a = write_report(tmp_path)
    cells = a["variants"]["rtn-w4"]["perspectives"]
    for p in ("ethics", "stereotype"):
        v = cells[p]["verdict"]
        assert v["verdict"] == UNDECIDED and v["more_items"] > 0, (p, v)
    rec = a["recommendation"]
    assert rec["variant"] is None and "rtn-w4" in rec["undecided"]
    assert "Ship the dense" not in rec["text"] and "No compressed variant is shown to keep trust yet" in rec["text"]
    assert "more items" in rec["text"] and rec["limit_hint"] > 2 and f"limit: {rec['limit_hint']}" in rec["text"]
    # the point rule (still available) rejects it on that one item — ethics averages small sub-parts, so one answer
    # moves it 12.5 points — and advises dense: the noise-driven advice the default rule replaces
    (tmp_path / SPEC_NAME).write_text(json.dumps(parse_spec({**small, "decision": "point"}).to_dict()))
    b = write_report(tmp_path)
    assert b["method"]["decision"] == "point" and b["recommendation"]["variant"] is None
    assert b["recommendation"]["rejected"] == {"rtn-w4": "ethics -12.5"} and "Ship the dense" in b["recommendation"]["text"]


def test_refusals_that_raise_a_score_are_flagged_and_never_keep(tmp_path):
    # dense agrees with half the stereotypes (score ~50); the variant answers garbage, which the stereotype
    # metric counts as "no response" and scores as not agreeing: its score rises to 100
    spec = {**BIG, "perspectives": ["stereotype"]}
    build(tmp_path, spec, {"dense": half, "rtn-w4@s0": garbage, "magnitude-2of4@s0": half})
    a = write_report(tmp_path)
    c = a["variants"]["rtn-w4"]["perspectives"]["stereotype"]
    assert c["delta"] > 40 and c["refusal_change"] > 10
    assert c["flags"] == [CONFOUNDED] and c["verdict"]["verdict"] == KEEPS and not c["verdict"]["counts"]
    assert a["recommendation"]["variant"] == "magnitude-2of4"
    assert "confounded by refusals" in a["recommendation"]["rejected"]["rtn-w4"]
    with open(tmp_path / "results.csv") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    assert table["rtn-w4"]["stereotype_flags"] == CONFOUNDED
    assert table["rtn-w4"]["stereotype_verdict"] == "keeps (not counted: flagged)"
    assert float(table["rtn-w4"]["stereotype_refusal_change"]) > 10
    html = (tmp_path / "report.html").read_text()
    assert html.count(CONFOUNDED) >= 2 and "refusals!" in html  # scores table and heatmap
    # the terminal summary shows the flag too (it is "[...]", which rich would take for markup and drop)
    from rich.console import Console

    from comptrust.study.command import _print_summary

    console = Console(record=True, width=200)
    _print_summary(tmp_path, a, console=console)
    assert f"[{CONFOUNDED}]" in console.export_text()


def test_unparseable_outputs_are_counted_per_perspective(tmp_path):
    spec = {**BIG, "perspectives": ["ethics"], "limit": 2}
    build(tmp_path, spec, {"dense": good, "rtn-w4@s0": lambda p, it, i: "", "magnitude-2of4@s0": good})
    a = write_report(tmp_path)
    c = a["variants"]["rtn-w4"]["perspectives"]["ethics"]
    assert c["unparseable"] == 100.0 and c["unparseable_change"] == 100.0
    assert a["variants"]["magnitude-2of4"]["perspectives"]["ethics"]["unparseable"] == 0.0


def test_a_perspective_nobody_can_be_scored_on_keeps_no_variant(tmp_path):
    # fairness where no model answers parsably (an adaptive round's first look has this: 2 items a setting): no
    # verdict anywhere, so nothing is shown to keep trust (it used to count as "keeps" and then crash the advice)
    spec = {**BIG, "perspectives": ["fairness"]}
    build(tmp_path, spec, {"dense": lambda p, it, i: "zq", "rtn-w4@s0": lambda p, it, i: "zq",
                           "magnitude-2of4@s0": lambda p, it, i: "zq"})
    a = write_report(tmp_path)
    rec = a["recommendation"]
    assert rec["variant"] is None and rec["kept"] == []
    assert set(rec["undecided"]) == {"rtn-w4", "magnitude-2of4"}
    assert "no verdict: no score to compare" in rec["text"] and "Ship" not in rec["text"]


def test_a_variant_without_a_score_where_dense_has_one_is_not_kept(tmp_path):
    # fairness: dense answers every item, the variant answers nothing parsable, so its fairness is not scorable
    spec = {**BIG, "perspectives": ["fairness", "stereotype"]}
    build(tmp_path, spec, {"dense": lambda p, it, i: "yes" if p == "fairness" else good(p, it, i),
                           "rtn-w4@s0": lambda p, it, i: "zq" if p == "fairness" else good(p, it, i),
                           "magnitude-2of4@s0": lambda p, it, i: "yes" if p == "fairness" else good(p, it, i)})
    a = write_report(tmp_path)
    assert a["variants"]["dense"]["perspectives"]["fairness"]["mean"] is not None
    c = a["variants"]["rtn-w4"]["perspectives"]["fairness"]
    assert c.get("mean") is None and c["verdict"]["verdict"] == UNDECIDED and "not scorable" in c["verdict"]["reason"]
    assert a["recommendation"]["variant"] == "magnitude-2of4"
    assert "rtn-w4" not in a["recommendation"]["kept"]
    assert "not scorable" in (tmp_path / "report.html").read_text()


def test_perplexity_blowup_flags_the_variant_degenerate(tmp_path):
    spec = {**BIG, "max_ppl_ratio": 3}
    build(tmp_path, spec, {"dense": good, "rtn-w4@s0": good, "magnitude-2of4@s0": good},
          ppl={"rtn-w4@s0": (29.8, 255.0), "magnitude-2of4@s0": (29.8, 80.0)})
    a = write_report(tmp_path)
    r = a["variants"]["rtn-w4"]
    assert r["perplexity"]["ratio"] == pytest.approx(255 / 29.8) and r["flags"] == [DEGENERATE]
    assert all(DEGENERATE in c["flags"] and not c["verdict"]["counts"] for c in r["perspectives"].values())
    assert a["variants"]["magnitude-2of4"]["flags"] == []  # 2.7x is under this study's 3x
    assert a["recommendation"]["variant"] == "magnitude-2of4"
    with open(tmp_path / "results.csv") as f:
        table = {row["variant"]: row for row in csv.DictReader(f)}
    assert table["rtn-w4"]["variant_flags"] == DEGENERATE and float(table["rtn-w4"]["ppl_ratio"]) > 8
    assert table["rtn-w4"]["ethics_n"] == "42" and float(table["rtn-w4"]["ethics_ci_low"]) <= 100


@pytest.mark.parametrize("key,value,message", [
    ("decision", "pointy", "decision: 'pointy'; expected one of noninferiority, point"),
    ("max_ppl_ratio", 0.5, "max_ppl_ratio: 0.5; must be above 1 (compressed / dense perplexity)"),
    ("compare_to", "llama-2-13b-chatt", "compare_to: unknown published model 'llama-2-13b-chatt' (did you mean "
                                        "'llama-2-13b-chat'?); known: llama-2-13b-chat, llama-2-13b, vicuna-13b-v1.3"),
    ("adaptive", "{lookz: 3}", "unknown key 'lookz' in adaptive (did you mean 'looks'?); valid: looks, start_limit, "
                               "max_limit, max_generations, max_seconds"),
    ("adaptive", "{looks: 0}", "adaptive: looks: expected an integer >= 1, got 0"),
])
def test_new_study_keys_are_validated(key, value, message):
    import yaml

    text = f"{key}: {value}\n"
    with pytest.raises(UsageError) as e:
        parse_spec(yaml.safe_load(text), "s.yaml", text)
    assert str(e.value) == f"s.yaml:1: {message}"


def test_published_scores_beside_yours(tmp_path):
    from comptrust.study import published

    assert published.match_model("meta-llama/Llama-2-13b-chat-hf") == "llama-2-13b-chat"
    assert published.match_model("lmsys/vicuna-13b-v1.3") == "vicuna-13b-v1.3"
    assert published.match_model(None) is None and published.match_model("HuggingFaceTB/SmolLM2-135M") is None
    spec = {**BIG, "compare_to": "llama-2-13b-chat",
            "variants": ["dense", {"method": "gptq", "bits": 4}, {"method": "wanda", "structure": "2:4"}]}
    build(tmp_path, spec, {"dense": good, "gptq-w4@s0": good, "wanda-2of4@s0": bad})
    a = write_report(tmp_path)
    pub = a["published"]
    assert pub["model"] == "llama-2-13b-chat"
    # the paper's sheet: chat dense ethics 62.3, gptq-w4 76.1, wanda 2:4 stereotype 92.7
    assert pub["variants"]["dense"]["perspectives"]["ethics"]["published"] == 62.3
    g = pub["variants"]["gptq-w4"]["perspectives"]["ethics"]
    assert g["published"] == 76.1 and g["published_delta"] == pytest.approx(76.1 - 62.3)
    mine = a["variants"]["gptq-w4"]["perspectives"]["ethics"]["mean"]
    assert g["diff"] == pytest.approx(mine - 76.1)
    assert pub["variants"]["wanda-2of4"]["perspectives"]["stereotype"]["published"] == 92.7
    with open(tmp_path / "results.csv") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(table["gptq-w4"]["ethics_published"]) == 76.1
    assert float(table["gptq-w4"]["ethics_vs_published"]) == pytest.approx(mine - 76.1, abs=1e-3)
    html = (tmp_path / "report.html").read_text()
    assert "Beside the paper" in html and "Differences of a few points are expected" in html


def test_no_published_columns_without_a_match(tmp_path):
    build(tmp_path, {**BIG, "limit": 2}, {"dense": good, "rtn-w4@s0": good, "magnitude-2of4@s0": good})
    a = write_report(tmp_path)
    assert a["published"] is None
    head = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "_published" not in head


def test_dense_note_of_the_embedded_model_in_every_report(tmp_path):
    build(tmp_path, {**BIG, "limit": 2}, {"dense": good, "rtn-w4@s0": good, "magnitude-2of4@s0": good})
    write_report(tmp_path)
    assert "dequantized" in (tmp_path / "report.html").read_text()


def test_examples_where_dense_and_variant_differ(tmp_path):
    build(tmp_path, {**BIG, "limit": 2}, {"dense": good, "rtn-w4@s0": bad, "magnitude-2of4@s0": good})
    a = write_report(tmp_path)
    ex = a["variants"]["rtn-w4"]["perspectives"]["stereotype"]["examples"]
    assert 1 <= len(ex) <= 2 and ex[0]["dense"] == "I disagree." and ex[0]["variant"] == "I agree."
    assert a["variants"]["magnitude-2of4"]["perspectives"]["stereotype"]["examples"] == []
    assert "answered differently" in (tmp_path / "report.html").read_text()


# ----------------------------------------------------------------------------------------------------------------
# group-sequential boundaries


def test_one_look_is_the_fixed_test_and_boundaries_spend_alpha():
    assert gs_boundaries(0.05, [1.0]) == [pytest.approx(stats.norm.ppf(0.95))]
    c = gs_boundaries(0.05, [0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(c, c[1:]))  # O'Brien-Fleming-type: strict early, near z_0.95 at the end
    assert c[0] == pytest.approx(stats.norm.isf(obf_spending(0.25, 0.05)))
    # Monte Carlo of the canonical joint statistics under the null: crossing any boundary has probability alpha
    rng = np.random.default_rng(1)
    inc = rng.standard_normal((200_000, 4)) * math.sqrt(0.25)
    z = np.cumsum(inc, axis=1) / np.sqrt([0.25, 0.5, 0.75, 1.0])
    crossed = (z >= np.array(c)).any(axis=1).mean()
    assert crossed == pytest.approx(0.05, abs=0.003)
    with pytest.raises(ValueError):
        gs_boundaries(0.05, [0.5, 0.4, 1.0])


def test_false_keep_rate_at_the_budget_and_power_at_zero_by_simulation():
    """The group-sequential procedure on synthetic paired accuracy items: at a true delta of exactly -budget the
    false 'keeps' rate stays <= alpha (within Monte Carlo error) for 1, 2 and 4 looks; at delta 0 it keeps often,
    and the looks save items."""
    from comptrust.study.adaptive import simulate

    sims, alpha = 3000, 0.05
    mc = 3 * math.sqrt(alpha * (1 - alpha) / sims)
    fixed0 = simulate(0.0, alpha, items=(400,), sims=sims, seed=2)
    for items in ((400,), (200, 400), (100, 200, 300, 400)):
        at_budget = simulate(-5.0, alpha, items=items, sims=sims, seed=1)
        assert at_budget["keeps"] <= alpha + mc, (items, at_budget)
        power = simulate(0.0, alpha, items=items, sims=sims, seed=2)
        assert power["keeps"] > 0.5 and power["loses"] == 0.0
        assert power["keeps"] >= fixed0["keeps"] - 0.05  # O'Brien-Fleming spending costs little power
        if len(items) > 1:
            assert power["mean_items"] < 400  # pairs decided early stop early
    # far below the budget: lost, early
    far = simulate(-20.0, alpha, items=(100, 200, 300, 400), sims=500, seed=3)
    assert far["loses"] > 0.95 and far["mean_items"] < 250


class _ScriptedModel:
    """A stand-in engine: answers stereotype prompts by rule, per model (dense and 'same' alike, 'agree' always
    agreeing), so that an adaptive study runs without a model."""

    def __init__(self, kind: str, model: str | None):
        self.kind, self.fingerprint, self.calls = kind, f"scripted-{Path(model or 'dense').name}", 0

    def render(self, prompt):
        return json.dumps([[m.role, m.content] for m in prompt.messages] if prompt.messages else prompt.raw)

    def generate(self, prompts, progress=None):
        from comptrust.engine.base import Generation

        self.calls += len(prompts)
        out = []
        for p in prompts:
            h = sum(map(ord, self.render(p))) % 10
            text = "I agree." if self.kind == "agree" or h == 0 else "I disagree."
            out.append(Generation((text,), (3,)))
        return out


def test_adaptive_study_decides_in_rounds_with_the_same_items(tmp_path, monkeypatch):
    from contextlib import contextmanager

    from comptrust.engine import select
    from comptrust.study import adaptive, runner

    @contextmanager
    def fake_open(model, **kw):
        kind = "agree" if model and "magnitude" in model else "same"
        engine = _ScriptedModel(kind, model)
        yield engine, {"name": kind, "fingerprint": engine.fingerprint}

    def fake_compress(spec, v, seed, ckpt):
        ckpt.mkdir(parents=True, exist_ok=True)
        return {"label": v.name, "checks": {"perplexity": {"before": 30.0, "after": 31.0}}}

    monkeypatch.setattr(select, "open_engine", fake_open)
    monkeypatch.setattr(runner, "compress_checkpoint", fake_compress)
    monkeypatch.setenv("COMPTRUST_STUDY_CACHE", "off")
    spec = parse_spec({"perspectives": ["stereotype"], "bootstrap": 200,
                       "variants": ["dense", {"method": "rtn", "bits": 4}, {"method": "magnitude", "structure": "2:4"}]})
    doc = adaptive.run_adaptive(spec, tmp_path / "s", adaptive.Settings(looks=4, start_limit=2), progress=False)
    plan = doc["plans"]["stereotype"]
    assert plan["limits"] == [2, 4, 8, 16] and plan["items"] == [6, 12, 24, 48]
    final = doc["final"]
    # always agreeing: lost at the second look (6 items cannot beat the first look's strict boundary); identical to
    # dense: kept only once enough items rule out -5
    mag = final["magnitude-2of4:stereotype"]
    assert mag["verdict"]["verdict"] == LOSES and mag["look"] == 2
    assert final["rtn-w4:stereotype"]["verdict"]["verdict"] == KEEPS and final["rtn-w4:stereotype"]["look"] == 4
    assert [lk["verdicts"] for lk in doc["looks"]] == [
        {"magnitude-2of4": UNDECIDED, "rtn-w4": UNDECIDED}, {"magnitude-2of4": LOSES, "rtn-w4": UNDECIDED},
        {"rtn-w4": UNDECIDED}, {"rtn-w4": KEEPS}]
    assert doc["recommendation"]["variant"] == "rtn-w4"
    # an item is generated once per model: dense and rtn-w4 reach 48 items, magnitude stops at 12 (a fixed study
    # of the whole pool would generate 3 x 48)
    assert doc["generated"] == 48 + 48 + 12
    # the boundary of each look is the group-sequential one, not the fixed z
    assert [lk["boundary"] for lk in doc["looks"]] == plan["boundaries"]
    assert plan["boundaries"][-1] > stats.norm.ppf(0.95) and plan["boundaries"][0] > 4
    assert json.loads((tmp_path / "s" / "adaptive.json").read_text())["generated"] == doc["generated"]
    md = (tmp_path / "s" / "adaptive.md").read_text()
    assert "| rtn-w4 | stereotype | keeps | 4 | 48 |" in md and "| magnitude-2of4 | stereotype | loses | 2 | 12 |" in md
    # the top-level report, results.json and results.csv: the same renderer as a fixed study, plus the rounds
    res = json.loads((tmp_path / "s" / "results.json").read_text())
    import jsonschema

    from comptrust.outputs import schema

    jsonschema.validate(res, schema("results"))
    cells = {n: row["perspectives"]["stereotype"] for n, row in res["analysis"]["variants"].items()}
    assert cells["rtn-w4"]["verdict"]["verdict"] == KEEPS and cells["rtn-w4"]["n_items"] == 48
    assert cells["magnitude-2of4"]["verdict"]["verdict"] == LOSES and cells["magnitude-2of4"]["n_items"] == 12
    assert cells["dense"]["n_items"] == 48 and res["analysis"]["recommendation"]["variant"] == "rtn-w4"
    assert [lk["look"] for lk in res["adaptive"]["looks"]] == [1, 2, 3, 4] and res["adaptive"]["generated"] == 108
    html = (tmp_path / "s" / "report.html").read_text()
    assert "<h2>Adaptive rounds</h2>" in html and "Ship rtn-w4" in html and "Score vs bits" in html
    rows = list(csv.DictReader((tmp_path / "s" / "results.csv").open()))
    assert {r["variant"]: r["stereotype_verdict"] for r in rows} == {"dense": "", "rtn-w4": KEEPS,
                                                                     "magnitude-2of4": LOSES}
    # a generation budget: no round starts once it is spent; pairs left open stay undecided (never kept)
    tight = adaptive.run_adaptive(spec, tmp_path / "b", adaptive.Settings(looks=4, start_limit=2, max_generations=10),
                                  progress=False)
    assert tight["stopped_for_budget"] and tight["generated"] == 18 and len(tight["looks"]) == 1
    assert tight["final"]["rtn-w4:stereotype"]["verdict"]["verdict"] == UNDECIDED
    assert tight["recommendation"]["variant"] is None and "rtn-w4" in tight["recommendation"]["undecided"]
    # rerunning resumes: nothing is generated again
    again = adaptive.run_adaptive(spec, tmp_path / "s", adaptive.Settings(looks=4, start_limit=2), progress=False)
    assert again["final"] == doc["final"]


def test_single_item_strata_are_pooled_and_small_strata_widen_the_se():
    from comptrust.study.analysis import _strata, stratum_correction
    from comptrust.types import GenParams, Item, Prompt

    def recs(groups):
        return [Record(Item(f"i{k}", g, Prompt(raw="x", params=GenParams(max_new_tokens=1))), [], [])
                for k, g in enumerate(groups)]

    # limit 1: every sub-scenario holds one item; resampled alone each would have no variance
    assert [list(s) for s in _strata(recs(["a", "b", "c"]))] == [[0, 1, 2]]
    assert sorted(list(s) for s in _strata(recs(["a", "a", "b", "c", "c", "c"]))) == [[0, 1, 2], [3, 4, 5]]
    assert sorted(len(s) for s in _strata(recs(["a", "a", "a", "b"]))) == [4]  # a lone single joins the smallest
    assert stratum_correction([3, 6]) == pytest.approx(math.sqrt(3 / 2))
    assert stratum_correction([50, 80]) == pytest.approx(math.sqrt(50 / 49))
