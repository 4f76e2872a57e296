"""The study report: results.json (everything), results.csv (one row per variant), report.html (one file).

Built only from the study directory (study.json + the store), so ``comptrust report DIR`` rebuilds it at any
time, including mid-study: unfinished units show as pending, failed ones as failed with their error.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from comptrust.errors import UsageError
from comptrust.report import charts
from comptrust.store import STORE_NAME, Store, write_atomic

# the paper's result sheet order: benign accuracy first, then the eight trust perspectives
COLUMN_ORDER = ["mmlu", "advglue", "ood", "adv_demo", "ethics", "fairness", "toxicity", "privacy", "stereotype"]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("comptrust", "torch", "transformers", "llmcompressor", "compressed-tensors", "alt-profanity-check"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _ordered(perspectives: list[str]) -> list[str]:
    return [p for p in COLUMN_ORDER if p in perspectives] + [p for p in perspectives if p not in COLUMN_ORDER]


def write_report(out_dir: Path) -> dict[str, Any]:
    from comptrust.study.analysis import analyze
    from comptrust.study.plan import Plan, eval_options, load_study

    out_dir = Path(out_dir)
    spec = load_study(out_dir)
    if not (out_dir / STORE_NAME).is_file():  # an empty report would replace the good one: refuse
        raise UsageError(f"{out_dir} has no {STORE_NAME}: nothing to report from; report.html, results.csv and "
                         "results.json are left as they are")
    with Store(out_dir / STORE_NAME, readonly=True) as store:
        stored = store.units()
    analysis = analyze(spec, stored, eval_options(spec))
    status_rows = Plan.of(spec).status(stored)
    persp = _ordered(spec.perspectives)
    prov = _provenance(spec, stored, status_rows)
    from comptrust.outputs import run_header

    doc = {**run_header("results"), "study": spec.to_dict(), "perspectives": persp, "analysis": analysis,
           "units": status_rows, "provenance": prov}
    write_atomic(out_dir / "results.json", json.dumps(doc, indent=2, default=str))
    write_atomic(out_dir / "results.csv", _csv(spec, analysis, persp))
    write_atomic(out_dir / "report.html", _html(spec, analysis, persp, status_rows, prov))
    return analysis


CSV_GROUPS = (
    # (column suffix, cell key) — every perspective gets each group, in this order, after its score column
    ("refusal", "refusal"), ("std", "std"), ("worst", "worst"), ("delta", "delta"), ("p_value", "p_value"),
    ("n", "n_items"), ("ci_low", "ci_low"), ("ci_high", "ci_high"), ("verdict", "verdict"), ("lcb", "lcb"),
    ("ucb", "ucb"), ("more_items", "more_items"), ("unparseable", "unparseable"), ("refusal_change", "refusal_change"),
    ("unparseable_change", "unparseable_change"), ("flags", "flags"),
)


def _cell_value(cell: dict[str, Any], key: str) -> Any:
    v = cell.get("verdict") or {}
    if key == "ci_low":
        return (cell.get("ci") or [None, None])[0]
    if key == "ci_high":
        return (cell.get("ci") or [None, None])[1]
    if key == "verdict":
        if not v:
            return None
        return v["verdict"] + ("" if v.get("counts") or v["verdict"] != "keeps" else " (not counted: flagged)")
    if key in ("lcb", "ucb", "more_items"):
        return v.get(key)
    if key == "flags":
        return "; ".join(cell.get("flags") or []) or None
    return cell.get(key)


def _csv(spec: Any, analysis: dict[str, Any], persp: list[str]) -> str:
    """One row per variant. Columns: the variant's settings and status, each perspective's score, then per
    perspective every CSV_GROUPS column, then perplexity and variant flags, then (when the study compares with
    the paper) the published score, yours - published, and the published delta vs dense."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["variant", "method", "bits", "group_size", "sparsity", "structure", "bits_per_weight", "seeds", "status"]
    head += persp
    for suffix, _ in CSV_GROUPS:
        head += [f"{p}_{suffix}" for p in persp]
    head += ["ppl_before", "ppl_after", "ppl_ratio", "variant_flags"]
    pub = analysis.get("published")
    if pub:
        for suffix in ("published", "vs_published", "published_delta"):
            head += [f"{p}_{suffix}" for p in persp]
    w.writerow(head)

    def f(x: Any) -> str:
        return "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))

    for name, row in analysis["variants"].items():
        d = row["describe"]
        cells = row["perspectives"]
        status = "complete" if row["complete"] else "incomplete: " + ", ".join(row["missing"])
        out = [name, d["method"], d.get("bits"), d.get("group_size"), d.get("sparsity"), d.get("structure"),
               d["bits_per_weight"], " ".join(str(s) for s in d["seeds"]) if d["method"] != "dense" else "", status]
        out += [cells[p].get("mean") for p in persp]
        for _, key in CSV_GROUPS:
            out += [_cell_value(cells[p], key) for p in persp]
        ppl = row.get("perplexity") or {}
        out += [ppl.get("before"), ppl.get("after"), ppl.get("ratio"), "; ".join(row.get("flags") or []) or None]
        if pub:
            pv = (pub["variants"].get(name) or {}).get("perspectives", {})
            for key in ("published", "diff", "published_delta"):
                out += [(pv.get(p) or {}).get(key) for p in persp]
        w.writerow([f(x) for x in out])
    return buf.getvalue()


def _provenance(spec: Any, stored: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    from comptrust.study.plan import Plan

    models: dict[str, Any] = {}
    instance_of = {unit.id: unit.instance for unit in Plan.of(spec).units}  # ids are never parsed back
    for uid, u in stored.items():
        inst = instance_of.get(uid)
        if u["status"] != "done" or inst is None:  # None: a unit of a variant no longer in the study
            continue
        res = u["result"]
        if u["kind"] == "eval":
            m = models.setdefault(inst, {})
            m["fingerprint"] = res["score"].get("model_fingerprint")
            info = res.get("model") or {}
            m.update({k: info.get(k) for k in ("device", "dtype", "engine") if k in info})
        elif u["kind"] == "compress":
            rec = res.get("record") or {}
            m = models.setdefault(inst, {})
            m["compression"] = {
                "label": rec.get("label"),
                "config": rec.get("config"),
                "wall_time_s": rec.get("wall_time_s"),
                "perplexity": (rec.get("checks") or {}).get("perplexity"),
                "source_fingerprint": (rec.get("source") or {}).get("fingerprint") if isinstance(rec.get("source"), dict) else None,
            }
    wall: dict[str, float] = {}
    for r in rows:
        if r["seconds"]:
            wall[r["instance"]] = wall.get(r["instance"], 0.0) + r["seconds"]
    return {"versions": _versions(), "models": models, "unit_seconds_by_model": wall,
            "total_unit_seconds": sum(wall.values()), "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


VERDICT_MARK = {"keeps": "✓ keeps", "loses": "✗ loses", "undecided": "? undecided"}
SHORT_FLAG = {"confounded by refusals": "refusals!", "degenerate": "degen."}
SHORT_VERDICT = {"keeps": "keeps", "loses": "loses", "undecided": "undec."}


def _family(d: dict[str, Any], kind: str) -> str:
    """The line a variant belongs to in the score-vs-bits / -sparsity charts: its method, plus what else would put
    two of its variants at the same x (a group size other than 128; an N:M pattern)."""
    if kind == "bits":
        gs = d.get("group_size")
        return d["method"] + ("" if gs in (None, 128) else (" per-row" if gs == 0 else f" g{gs}"))
    st = d.get("structure")
    return d["method"] + (f" {st}" if st and st != "unstructured" else "")


def _html(spec: Any, analysis: dict[str, Any], persp: list[str], rows: list[dict[str, Any]],
          prov: dict[str, Any]) -> str:
    import jinja2

    variants = analysis["variants"]
    names = list(variants)
    dense = analysis["dense"]

    def val(name: str, p: str, key: str = "mean") -> Any:
        return variants[name]["perspectives"][p].get(key)

    # a radar of one or two axes is a line, not a profile
    radar = charts.radar(persp, {n: [val(n, p) for p in persp] for n in names}, dense) if len(persp) >= 3 else ""
    comp = [n for n in names if n != dense]
    heat = ""
    if comp:
        marks = [["*" if val(n, p, "significant") else "" for p in persp] for n in comp]
        notes = []
        for n in comp:
            row = []
            for p in persp:
                c = variants[n]["perspectives"][p]
                bits = []
                if c.get("verdict"):
                    bits.append(SHORT_VERDICT[c["verdict"]["verdict"]] if spec.decision != "point" else "")
                bits += [SHORT_FLAG.get(f, f) for f in c.get("flags") or []]
                row.append(" ".join(b for b in bits if b))
            notes.append(row)
        heat = charts.delta_heatmap(comp, persp, [[val(n, p, "delta") for p in persp] for n in comp], marks, notes)

    def series(kind: str) -> tuple[dict[str, dict[str, list[tuple]]], bool]:
        out: dict[str, dict[str, list[tuple]]] = {p: {} for p in persp}
        any_x = False
        for n in comp:
            d = variants[n]["describe"]
            if kind == "bits" and d.get("bits") and not d.get("sparsity"):
                x = float(d["bits"])
            elif kind == "sparsity" and d.get("sparsity") is not None:
                x = float(d["sparsity"])
            else:
                continue
            any_x = True
            for p in persp:
                y = val(n, p)
                if y is None:
                    continue
                ci = val(n, p, "ci") or [None, None]
                out[p].setdefault(_family(d, kind), []).append((x, y, ci[0], ci[1]))
        return out, any_x

    dense_pts = {p: ((val(dense, p), *(val(dense, p, "ci") or [None, None])) if val(dense, p) is not None else None)
                 for p in persp}
    bits_s, has_q = series("bits")
    sparse_s, has_s = series("sparsity")
    bits_curve = charts.curves(persp, bits_s, dense_pts, "bits per weight (dense: dashed line)", invert=True) if has_q else ""
    sparsity_curve = charts.curves(persp, sparse_s, dense_pts, "sparsity (dense: dashed line)") if has_s else ""

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = lambda x, d=1: "–" if x is None else f"{x:.{d}f}"
    env.filters["signed"] = lambda x: "–" if x is None else f"{x:+.1f}"
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return env.get_template("template.html.j2").render(
        spec=spec,
        analysis=analysis,
        variants=variants,
        names=names,
        comp=comp,
        dense=dense,
        persp=persp,
        titles=charts.TITLES,
        radar=radar,
        heat=heat,
        bits_curve=bits_curve,
        sparsity_curve=sparsity_curve,
        rows=rows,
        counts=counts,
        prov=prov,
        prov_json=json.dumps(prov, indent=2, default=str),
        verdict_mark=VERDICT_MARK,
        published=analysis.get("published"),
    )
