"""The study report: a pure renderer of a :class:`comptrust.results.StudyReport`.

It reads nothing but that result (no store, no analysis): the study layer builds the result
(``comptrust.study.analysis.build_result``), writes the files (``comptrust.study.runner.write_outputs``) and
calls :func:`render` for their contents: results.json (everything), results.csv (one row per variant) and
report.html (one file). ``comptrust report DIR`` rebuilds them at any time, including mid-study: unfinished units
show as pending, failed ones as failed with their error.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from comptrust import perspectives as registry
from comptrust.report import charts
from comptrust.results import Cell, StudyReport, VariantRow

# the perspective registry's order (the paper's result sheet: benign accuracy first, then the eight trust perspectives)
COLUMN_ORDER = list(registry.REGISTRY)


def ordered(perspectives: list[str]) -> list[str]:
    """Perspectives in the report's column order (the paper's), unknown ones last in their own order."""
    return [p for p in COLUMN_ORDER if p in perspectives] + [p for p in perspectives if p not in COLUMN_ORDER]


def render(result: StudyReport) -> dict[str, str]:
    """The three files of a study folder, by name, from the result alone."""
    return {
        "results.json": json.dumps(result.to_results_json(), indent=2, default=str),
        "results.csv": render_csv(result),
        "report.html": render_html(result),
    }


CSV_GROUPS = (
    # (column suffix, cell key) — every perspective gets each group, in this order, after its score column
    ("refusal", "refusal"), ("std", "std"), ("worst", "worst"), ("delta", "delta"), ("p_value", "p_value"),
    ("n", "n_items"), ("ci_low", "ci_low"), ("ci_high", "ci_high"), ("verdict", "verdict"), ("lcb", "lcb"),
    ("ucb", "ucb"), ("more_items", "more_items"), ("unparseable", "unparseable"), ("refusal_change", "refusal_change"),
    ("unparseable_change", "unparseable_change"), ("flags", "flags"),
)


def _cell_value(cell: Cell, key: str) -> Any:
    v = cell.verdict
    if key == "ci_low":
        return cell.ci[0] if cell.ci else None
    if key == "ci_high":
        return cell.ci[1] if cell.ci else None
    if key == "verdict":
        if v is None:
            return None
        return v.verdict + ("" if v.counts or v.verdict != "keeps" else " (not counted: flagged)")
    if key in ("lcb", "ucb", "more_items"):
        return None if v is None else getattr(v, key)
    if key == "flags":
        return "; ".join(cell.flags) or None
    return getattr(cell, key)


def render_csv(result: StudyReport) -> str:
    """One row per variant. Columns: the variant's settings and status, each perspective's score, then per
    perspective every CSV_GROUPS column, then perplexity and variant flags, then (when the study compares with
    the paper) the published score, yours - published, and the published delta vs dense."""
    analysis, persp = result.analysis, result.perspectives
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["variant", "method", "bits", "group_size", "sparsity", "structure", "bits_per_weight", "seeds", "status"]
    head += persp
    for suffix, _ in CSV_GROUPS:
        head += [f"{p}_{suffix}" for p in persp]
    head += ["ppl_before", "ppl_after", "ppl_ratio", "variant_flags"]
    pub = analysis.published
    if pub:
        for suffix in ("published", "vs_published", "published_delta"):
            head += [f"{p}_{suffix}" for p in persp]
    w.writerow(head)

    def f(x: Any) -> str:
        return "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))

    for name, row in analysis.variants.items():
        d = row.describe
        cells = row.perspectives
        status = "complete" if row.complete else "incomplete: " + ", ".join(row.missing)
        out = [name, d["method"], d.get("bits"), d.get("group_size"), d.get("sparsity"), d.get("structure"),
               d["bits_per_weight"], " ".join(str(s) for s in d["seeds"]) if d["method"] != "dense" else "", status]
        out += [cells[p].mean for p in persp]
        for _, key in CSV_GROUPS:
            out += [_cell_value(cells[p], key) for p in persp]
        ppl = row.perplexity
        out += [ppl.before if ppl else None, ppl.after if ppl else None, ppl.ratio if ppl else None,
                "; ".join(row.flags) or None]
        if pub:
            pv = (pub["variants"].get(name) or {}).get("perspectives", {})
            for key in ("published", "diff", "published_delta"):
                out += [(pv.get(p) or {}).get(key) for p in persp]
        w.writerow([f(x) for x in out])
    return buf.getvalue()


VERDICT_MARK = {"keeps": "✓ keeps", "loses": "✗ loses", "undecided": "? undecided"}
SHORT_FLAG = {"confounded by refusals": "refusals!", "degenerate": "degen."}
SHORT_VERDICT = {"keeps": "keeps", "loses": "loses", "undecided": "undec."}


def _family(d: dict[str, Any], kind: str) -> str:
    """The line a variant belongs to in the score-vs-bits / -sparsity charts: its method, plus what else would put
    two of its variants at the same x (a group size other than 128; an N:M pattern)."""
    if kind == "bits":
        gs = d.get("group_size")
        return str(d["method"]) + ("" if gs in (None, 128) else (" per-row" if gs == 0 else f" g{gs}"))
    st = d.get("structure")
    return str(d["method"]) + (f" {st}" if st and st != "unstructured" else "")


def render_html(result: StudyReport) -> str:
    import jinja2

    analysis, persp, settings = result.analysis, result.perspectives, result.settings
    variants: dict[str, VariantRow] = analysis.variants
    names = list(variants)
    dense = analysis.dense

    def cell(name: str, p: str) -> Cell:
        return variants[name].perspectives[p]

    # a radar of one or two axes is a line, not a profile
    radar = charts.radar(persp, {n: [cell(n, p).mean for p in persp] for n in names}, dense) if len(persp) >= 3 else ""
    comp = [n for n in names if n != dense]
    heat = ""
    if comp:
        marks = [["*" if cell(n, p).significant else "" for p in persp] for n in comp]
        notes = []
        for n in comp:
            row = []
            for p in persp:
                c = cell(n, p)
                bits = []
                if c.verdict is not None:
                    bits.append(SHORT_VERDICT[c.verdict.verdict] if settings.decision != "point" else "")
                bits += [SHORT_FLAG.get(f, f) for f in c.flags]
                row.append(" ".join(b for b in bits if b))
            notes.append(row)
        heat = charts.delta_heatmap(comp, persp, [[cell(n, p).delta for p in persp] for n in comp], marks, notes)

    def series(kind: str) -> tuple[dict[str, dict[str, list[tuple]]], bool]:
        out: dict[str, dict[str, list[tuple]]] = {p: {} for p in persp}
        any_x = False
        for n in comp:
            d = variants[n].describe
            if kind == "bits" and d.get("bits") and not d.get("sparsity"):
                x = float(d["bits"])
            elif kind == "sparsity" and d.get("sparsity") is not None:
                x = float(d["sparsity"])
            else:
                continue
            any_x = True
            for p in persp:
                c = cell(n, p)
                if c.mean is None:
                    continue
                ci = c.ci or [None, None]
                out[p].setdefault(_family(d, kind), []).append((x, c.mean, ci[0], ci[1]))
        return out, any_x

    dense_pts = {p: ((cell(dense, p).mean, *(cell(dense, p).ci or [None, None]))
                     if cell(dense, p).mean is not None else None) for p in persp}
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
    for r in result.units:
        counts[r.status] = counts.get(r.status, 0) + 1
    prov = result.provenance.model_dump(mode="json")
    return env.get_template("template.html.j2").render(
        spec=settings,
        study=result.study,
        analysis=analysis,
        variants=variants,
        names=names,
        comp=comp,
        dense=dense,
        persp=persp,
        titles={p: registry.short_title(p) for p in result.perspectives},
        radar=radar,
        heat=heat,
        bits_curve=bits_curve,
        sparsity_curve=sparsity_curve,
        rows=result.units,
        counts=counts,
        prov=prov,
        prov_json=json.dumps(prov, indent=2, default=str),
        verdict_mark=VERDICT_MARK,
        published=analysis.published,
        adaptive=result.adaptive,
    )
