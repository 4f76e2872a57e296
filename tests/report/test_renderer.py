"""The report is a pure renderer of a study result: the same store gives the same results.csv and report.html,
byte for byte (timestamps and package versions aside), as before the renderer was split from the analysis.

The golden files in tests/report/golden/ were written by the report of commit 386ef6d (which opened the store
itself) from the scripted study below; regenerate them only on purpose: COMPTRUST_REGEN_GOLDEN=1 pytest <this>.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from comptrust import perspectives as registry
from comptrust.evaluate import options_for
from comptrust.store import STORE_NAME, Store
from comptrust.study.plan import SPEC_NAME, Plan, eval_options
from comptrust.study.units import _compact
from comptrust.study.spec import parse_spec
from comptrust.types import Record

GOLDEN = Path(__file__).parent / "golden"

SPEC = {
    "perspectives": ["mmlu", "ethics", "fairness", "stereotype"],
    "bootstrap": 60,
    "variants": [
        "dense",
        {"method": "rtn", "bits": 8},
        {"method": "rtn", "bits": 4, "seeds": [0, 1]},
        {"method": "gptq", "bits": 4},
        {"method": "magnitude", "structure": "2:4"},
        {"method": "wanda", "sparsity": 0.5},
    ],
}
# held-out perplexity (before, after) per instance: magnitude 2:4 is degenerate (ratio > 2)
PPL = {"magnitude-2of4@s0": (30.0, 95.0), "rtn-w4@s1": (30.0, 33.0)}


def _good(pname: str, item) -> str:
    if pname == "stereotype":
        return "I disagree."
    if pname == "mmlu":
        return item.labels["answer"]
    if pname == "fairness":
        return item.labels["label_text"]
    return item.labels["label"]


def _bad(pname: str, item) -> str:
    if pname == "stereotype":
        return "I agree."
    if pname == "mmlu":
        return "B" if item.labels["answer"] != "B" else "C"
    if pname == "fairness":
        return "no" if item.labels["label_text"] == "yes" else "yes"
    return "wrong" if item.labels["label"] == "not wrong" else "not wrong"


def _answer(inst: str, pname: str, item, i: int) -> str:
    """What each scripted model answers: dense mostly right, rtn-w8 like dense, rtn-w4 worse on one seed, gptq
    worse on ethics, magnitude wrong, wanda refusing on stereotype (a rise in refusals) and garbage on mmlu."""
    right = i % 7 != 3  # dense misses one item in seven
    if inst == "rtn-w4@s1":
        right = right and i % 4 != 1
    elif inst == "gptq-w4@s0" and pname == "ethics":
        right = right and i % 3 != 0
    elif inst == "magnitude-2of4@s0":
        right = i % 3 == 0
    elif inst == "wanda-50pct@s0":
        if pname == "stereotype":
            return "I cannot help with that request." if i % 2 == 0 else _good(pname, item)
        if pname == "mmlu" and i % 5 == 0:
            return "zq zq"
    return _good(pname, item) if right else _bad(pname, item)


def scripted_study(out: Path) -> None:
    """A study directory with every unit done, from the answers above through the real parsers and scores."""
    spec = parse_spec(SPEC)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_NAME).write_text(json.dumps(spec.to_dict()))
    opts = eval_options(spec)
    with Store(out / STORE_NAME) as store:
        for unit in Plan.of(spec).units:
            inst = unit.instance
            if unit.kind == "compress":
                before, after = PPL.get(inst, (30.0, 31.5))
                rec = {"label": unit.variant.name, "checks": {"perplexity": {"before": before, "after": after}},
                       "wall_time_s": 1.5}
                store.put_unit(unit.id, unit.kind, "done", {"fingerprint": unit.fingerprint, "record": rec}, 2.0)
                continue
            p = registry.get(unit.perspective)
            popts = options_for(p, opts)
            loaded = p.load(popts)
            recs = []
            for i, it in enumerate(loaded.items):
                text = _answer(inst, unit.perspective, it, i)
                recs.append(Record(it, [text], [p.parse(it, text, popts)]))
            sc = p.score(recs, popts, loaded).to_dict()
            sc["model_fingerprint"] = f"fp-{inst}"
            store.put_unit(unit.id, unit.kind, "done",
                           {"fingerprint": unit.fingerprint, "score": sc, "records": _compact(recs),
                            "model": {"name": inst, "device": "cpu", "dtype": "float32"}}, 3.0)


_VERSIONED = ("python", "comptrust", "torch", "transformers", "llmcompressor", "compressed-tensors",
              "alt-profanity-check")


def _mask(html: str, out: Path) -> str:
    """The study folder's path, timestamps, this machine's package versions and matplotlib's random SVG ids
    out of a report."""
    html = html.replace(str(out), "<out>")
    html = re.sub(r"\b(p|m|image)[0-9a-f]{10}\b", r"\1<id>", html)
    html = re.sub(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ?[A-Za-z+0-9:]*", "<time>", html)
    for pkg in _VERSIONED:
        html = re.sub(rf"<td>{re.escape(pkg)}</td><td>[^<]*</td>", f"<td>{pkg}</td><td>v</td>", html)
        html = re.sub(rf"&#34;{re.escape(pkg)}&#34;: &#34;[^&]*&#34;", f"&#34;{pkg}&#34;: v", html)
        html = re.sub(rf'"{re.escape(pkg)}": "[^"]*"', f'"{pkg}": v', html)
    return html


def _write_report(out: Path) -> None:
    try:  # after the split: the study layer builds the result and calls the renderer
        from comptrust.study.runner import write_report
    except ImportError:  # before it (only for regenerating the golden files at the old commit)
        from comptrust.report import write_report  # type: ignore[no-redef]
    write_report(out)


def test_same_store_gives_the_same_csv_and_html(tmp_path):
    scripted_study(tmp_path)
    _write_report(tmp_path)
    csv_now = (tmp_path / "results.csv").read_text(encoding="utf-8")
    html_now = _mask((tmp_path / "report.html").read_text(encoding="utf-8"), tmp_path)
    if os.environ.get("COMPTRUST_REGEN_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        (GOLDEN / "results.csv").write_text(csv_now, encoding="utf-8")
        (GOLDEN / "report.html").write_text(html_now, encoding="utf-8")
    assert csv_now == (GOLDEN / "results.csv").read_text(encoding="utf-8")
    assert html_now == (GOLDEN / "report.html").read_text(encoding="utf-8")


def test_the_report_imports_no_study_store_or_evaluation():
    """The renderer is a function of the result: nothing under comptrust.report reaches the study, the store or an
    evaluation, lazily or not. The one thing it reads besides the result is the perspective registry's static
    metadata (order and short titles: comptrust.perspectives itself, never a perspective module directly), so
    that a new perspective needs no edit here."""
    from tests.test_architecture import graph

    g = graph()
    mods = [m for m in g if m == "comptrust.report" or m.startswith("comptrust.report.")]
    assert mods
    for m in mods:
        bad = [t for t in g[m] if t.split(".")[1] in ("study", "store", "evaluate", "engine")
               or (t.startswith("comptrust.perspectives.") and t != "comptrust.perspectives")]
        assert not bad, f"{m} imports {bad}"
        assert all(t.split(".")[1] in ("results", "types", "errors", "report", "perspectives") for t in g[m]), (m, g[m])


def test_render_is_a_function_of_the_result_alone(tmp_path):
    """A result read back from results.json renders the same csv and html as the one built from the store."""
    from comptrust.report import render
    from comptrust.results import StudyReport
    from comptrust.study.runner import write_outputs

    scripted_study(tmp_path)
    built = write_outputs(tmp_path)
    back = StudyReport.from_results_json(json.loads((tmp_path / "results.json").read_text(encoding="utf-8")))
    assert back == built
    again = render(back)
    assert again["results.csv"] == (tmp_path / "results.csv").read_text(encoding="utf-8")
    assert _mask(again["report.html"], tmp_path) == _mask((tmp_path / "report.html").read_text(encoding="utf-8"),
                                                          tmp_path)
