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

from comptrust.evaluate import STORE_NAME, write_atomic
from comptrust.report import charts
from comptrust.store import Store

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
    from comptrust.study.runner import Plan, eval_options, load_study

    out_dir = Path(out_dir)
    spec = load_study(out_dir)
    with Store(out_dir / STORE_NAME) as store:
        stored = store.units()
    analysis = analyze(spec, stored, eval_options(spec))
    status_rows = Plan.of(spec).status(stored)
    persp = _ordered(spec.perspectives)
    prov = _provenance(spec, stored, status_rows)
    doc = {"study": spec.to_dict(), "perspectives": persp, "analysis": analysis, "units": status_rows,
           "provenance": prov}
    write_atomic(out_dir / "results.json", json.dumps(doc, indent=2, default=str))
    write_atomic(out_dir / "results.csv", _csv(spec, analysis, persp))
    write_atomic(out_dir / "report.html", _html(spec, analysis, persp, status_rows, prov))
    return analysis


def _csv(spec: Any, analysis: dict[str, Any], persp: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["variant", "method", "bits", "group_size", "sparsity", "structure", "bits_per_weight", "seeds", "status"]
    head += persp + [f"{p}_refusal" for p in persp] + [f"{p}_std" for p in persp] + [f"{p}_worst" for p in persp]
    head += [f"{p}_delta" for p in persp] + [f"{p}_p_value" for p in persp]
    w.writerow(head)

    def f(x: Any) -> str:
        return "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))

    for name, row in analysis["variants"].items():
        d = row["describe"]
        cells = row["perspectives"]
        status = "complete" if row["complete"] else "incomplete: " + ", ".join(row["missing"])
        out = [name, d["method"], d.get("bits"), d.get("group_size"), d.get("sparsity"), d.get("structure"),
               d["bits_per_weight"], " ".join(str(s) for s in d["seeds"]) if d["method"] != "dense" else "", status]
        for key in ("mean", "refusal", "std", "worst", "delta", "p_value"):
            out += [cells[p].get(key) for p in persp]
        w.writerow([f(x) for x in out])
    return buf.getvalue()


def _provenance(spec: Any, stored: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for uid, u in stored.items():
        if u["status"] != "done":
            continue
        res = u["result"]
        if u["kind"] == "eval":
            inst = uid.split(":")[1]
            m = models.setdefault(inst, {})
            m["fingerprint"] = res["score"].get("model_fingerprint")
            info = res.get("model") or {}
            m.update({k: info.get(k) for k in ("device", "dtype", "engine") if k in info})
        elif u["kind"] == "compress":
            inst = uid.split(":", 1)[1]
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


def _html(spec: Any, analysis: dict[str, Any], persp: list[str], rows: list[dict[str, Any]],
          prov: dict[str, Any]) -> str:
    import jinja2

    variants = analysis["variants"]
    names = list(variants)
    dense = analysis["dense"]

    def val(name: str, p: str, key: str = "mean") -> Any:
        return variants[name]["perspectives"][p].get(key)

    radar = charts.radar(persp, {n: [val(n, p) for p in persp] for n in names}, dense)
    comp = [n for n in names if n != dense]
    heat = ""
    if comp:
        marks = [["*" if val(n, p, "significant") else "" for p in persp] for n in comp]
        heat = charts.delta_heatmap(comp, persp, [[val(n, p, "delta") for p in persp] for n in comp], marks)

    def points(kind: str) -> dict[str, list[tuple[float, Any, float]]]:
        pts: dict[str, list[tuple[float, Any, float]]] = {p: [] for p in persp}
        for n in names:
            d = variants[n]["describe"]
            if d["method"] == "dense":
                x = 16.0 if kind == "bits" else 0.0
            elif kind == "bits" and d.get("bits"):
                x = float(d["bits"])
            elif kind == "sparsity" and d.get("sparsity") is not None:
                x = float(d["sparsity"])
            else:
                continue
            for p in persp:
                pts[p].append((x, val(n, p), val(n, p, "std") or 0.0))
        return pts

    has_q = any(variants[n]["describe"].get("bits") for n in comp)
    has_s = any(variants[n]["describe"].get("sparsity") is not None for n in comp)
    bits_curve = charts.curves(persp, points("bits"), "bits per weight (dense = 16)", invert=True) if has_q else ""
    sparsity_curve = charts.curves(persp, points("sparsity"), "sparsity (dense = 0)") if has_s else ""

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
    )
