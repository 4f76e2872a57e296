"""Analysis and report from stored units, without a model: hand-written outputs per variant and seed go
through the real perspectives' parsers and scores, then the study's aggregation, advice and report."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from comptrust.evaluate import options_for
from comptrust.study.runner import write_report
from comptrust import perspectives as registry
from comptrust.store import STORE_NAME, Store
from comptrust.study.analysis import _p_value
from comptrust.study.plan import SPEC_NAME, Plan, compress_unit, eval_options, eval_unit
from comptrust.study.units import _compact
from comptrust.study.spec import parse_spec
from comptrust.types import Record

SPEC = {
    "perspectives": ["ethics", "stereotype"],
    "limit": 2,
    "bootstrap": 200,
    "variants": ["dense", {"method": "rtn", "bits": 4, "seeds": [0, 1]}, {"method": "magnitude", "structure": "2:4"}],
}


def _answer(pname: str, item, good: bool) -> str:
    if pname == "stereotype":
        return "I disagree." if good else "I agree."
    gold = item.labels["label"]
    return gold if good else ("wrong" if gold == "not wrong" else "not wrong")


def fake_study(out: Path, quality: dict[str, float], fail: dict[str, str] | None = None, spec_dict=None):
    """quality[instance] = fraction of items answered well (the first ones), per instance."""
    spec = parse_spec(spec_dict or SPEC)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_NAME).write_text(json.dumps(spec.to_dict()))
    opts = eval_options(spec)
    scores: dict[tuple[str, str], float] = {}
    not_compressed: set[str] = set()
    with Store(out / STORE_NAME) as store:
        for unit in Plan.of(spec).units:
            uid, kind, v, pname, fp, inst = unit.id, unit.kind, unit.variant, unit.perspective, unit.fingerprint, unit.instance
            if fail and uid in fail:
                store.put_unit(uid, kind, "failed", {"fingerprint": fp}, 1.0, fail[uid])
                if kind == "compress":
                    not_compressed.add(inst)
                continue
            if inst in not_compressed:  # the runner never evaluates a model that failed to compress
                continue
            if kind == "compress":
                store.put_unit(uid, kind, "done", {"fingerprint": fp, "record": {"label": v.name}}, 2.0)
                continue
            p = registry.get(pname)
            popts = options_for(p, opts)
            loaded = p.load(popts)
            n_good = round(quality[inst] * len(loaded.items))
            recs = []
            for i, it in enumerate(loaded.items):
                out_text = _answer(pname, it, i < n_good)
                recs.append(Record(it, [out_text], [p.parse(it, out_text, popts)]))
            sc = p.score(recs, popts, loaded).to_dict()
            sc["model_fingerprint"] = f"fp-{inst}"
            scores[(inst, pname)] = sc["score"]
            store.put_unit(uid, kind, "done", {"fingerprint": fp, "score": sc, "records": _compact(recs)}, 3.0)
    return spec, scores


def test_aggregation_over_seeds_and_deltas(tmp_path):
    spec, sc = fake_study(tmp_path, {"dense": 1.0, "rtn-w4@s0": 1.0, "rtn-w4@s1": 0.5, "magnitude-2of4@s0": 0.0})
    a = write_report(tmp_path)
    for pname in ("ethics", "stereotype"):
        cell = a["variants"]["rtn-w4"]["perspectives"][pname]
        s0, s1, d = sc[("rtn-w4@s0", pname)], sc[("rtn-w4@s1", pname)], sc[("dense", pname)]
        assert s0 != s1
        assert cell["mean"] == pytest.approx((s0 + s1) / 2)
        assert cell["std"] == pytest.approx(abs(s0 - s1) / np.sqrt(2))  # ddof=1 over two seeds
        assert cell["worst"] == pytest.approx(min(s0, s1)) and cell["worst_instance"] == "rtn-w4@s1"
        assert cell["delta"] == pytest.approx((s0 + s1) / 2 - d)
        assert cell["delta_worst"] == pytest.approx(min(s0, s1) - d)
        lo, hi = cell["delta_ci"]
        assert lo <= cell["delta"] + 1e-9 and cell["delta"] - 1e-9 <= hi or lo <= hi
        assert 0 < cell["p_value"] <= 1
        dense_cell = a["variants"]["dense"]["perspectives"][pname]
        assert dense_cell["mean"] == pytest.approx(d) and dense_cell["delta"] == 0
    # everything wrong on the pruned model: a large, significant drop in stereotype
    m = a["variants"]["magnitude-2of4"]["perspectives"]["stereotype"]
    assert m["delta"] < -50 and m["significant"] and m["p_value"] < 0.05
    rec = a["recommendation"]
    assert rec["variant"] is None and rec["text"].startswith("None of the compressed variants")
    assert set(rec["rejected"]) == {"rtn-w4", "magnitude-2of4"}
    assert "seed 1)" in rec["rejected"]["rtn-w4"] and "loses" in rec["rejected"]["rtn-w4"]
    assert all(f"{n}: {why}" in rec["text"] for n, why in rec["rejected"].items())  # the text says why


def test_point_rule_recommends_most_compressed_within_budget(tmp_path):
    _, sc = fake_study(tmp_path, {"dense": 1.0, "rtn-w4@s0": 1.0, "rtn-w4@s1": 1.0, "magnitude-2of4@s0": 1.0},
                       spec_dict={**SPEC, "decision": "point"})
    a = write_report(tmp_path)
    # decision: point — both keep every perspective's point estimate; rtn-w4 (4 bits) is more compressed than 2:4
    # pruning (8 nominal bits). (The default rule calls these 6-item cells undecided: tests/study/test_decisions.py)
    assert a["recommendation"]["variant"] == "rtn-w4"
    assert a["recommendation"]["kept"] == ["rtn-w4", "magnitude-2of4"]
    assert a["recommendation"]["text"].startswith("Ship rtn-w4 (4 bits per weight, nominal)")


def test_failed_units_block_the_recommendation_and_show_in_outputs(tmp_path):
    fail = {compress_unit("rtn-w4@s1"): "RuntimeFailure: NaN weights after compression",
            eval_unit("magnitude-2of4@s0", "ethics"): "scoring failed: ValueError: x"}
    spec, _ = fake_study(tmp_path, {"dense": 1.0, "rtn-w4@s0": 1.0, "rtn-w4@s1": 1.0, "magnitude-2of4@s0": 1.0},
                         fail=fail)
    a = write_report(tmp_path)
    assert a["recommendation"]["variant"] is None
    assert a["recommendation"]["rejected"]["magnitude-2of4"] == "incomplete (no result for ethics)"
    rows = {r["unit"]: r["status"] for r in json.loads((tmp_path / "results.json").read_text())["units"]}
    assert rows[compress_unit("rtn-w4@s1")] == "failed"
    assert rows[eval_unit("rtn-w4@s1", "ethics")] == "blocked"
    html = (tmp_path / "report.html").read_text()
    assert "NaN weights after compression" in html and "scoring failed" in html
    with open(tmp_path / "results.csv") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    assert table["magnitude-2of4"]["status"] == "incomplete: ethics" and table["magnitude-2of4"]["ethics"] == ""
    assert table["rtn-w4"]["status"].startswith("incomplete")


def test_csv_layout_and_stale_units(tmp_path):
    spec, sc = fake_study(tmp_path, {"dense": 1.0, "rtn-w4@s0": 0.5, "rtn-w4@s1": 0.5, "magnitude-2of4@s0": 1.0})
    write_report(tmp_path)
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        head = reader.fieldnames
        table = {r["variant"]: r for r in reader}
    assert head[:9] == ["variant", "method", "bits", "group_size", "sparsity", "structure", "bits_per_weight", "seeds", "status"]
    assert head[9:11] == ["ethics", "stereotype"] and "ethics_refusal" in head and "stereotype_p_value" in head
    assert list(table) == ["dense", "rtn-w4", "magnitude-2of4"]
    assert float(table["dense"]["ethics"]) == pytest.approx(sc[("dense", "ethics")], abs=1e-4)
    assert table["rtn-w4"]["seeds"] == "0 1" and table["rtn-w4"]["bits"] == "4"
    # a unit made with other settings is stale, not done
    with Store(tmp_path / STORE_NAME) as st:
        u = st.units()[eval_unit("dense", "ethics")]
        st.put_unit(eval_unit("dense", "ethics"), "eval", "done", {**u["result"], "fingerprint": "other"}, 1.0)
        rows = Plan.of(spec).status(st.units())
    assert {r["unit"]: r["status"] for r in rows}[eval_unit("dense", "ethics")] == "stale"


def test_p_value_rule():
    assert _p_value(np.array([1.0] * 99)) == pytest.approx(2 / 100)  # all deltas above 0
    assert _p_value(np.array([-1.0, 1.0] * 50)) == 1.0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    fake_study(tmp_path / "s", {"dense": 1.0, "rtn-w4@s0": 1.0, "rtn-w4@s1": 0.5, "magnitude-2of4@s0": 0.5})
    write_report(tmp_path / "s")
    shot = tmp_path / "report.png"
    p = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--window-size=1280,2400",
         f"--screenshot={shot}", (tmp_path / "s" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    console = [l for l in p.stderr.splitlines() if ":CONSOLE" in l]
    assert console == []  # no console messages at all: the page has no scripts and loads nothing external
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # charts drawn, not a blank page
    html = (tmp_path / "s" / "report.html").read_text()
    assert html.count("<svg") >= 3  # heatmap, two curves (no radar of two perspectives): inline, nothing fetched
    assert "A radar needs at least three perspectives" in html
    assert "<script" not in html and "<link" not in html and 'src="' not in html
