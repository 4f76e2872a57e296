"""From stored units to the comparison: scores, deltas vs dense, seed statistics, CIs, paired tests, advice.

Statistics, and why:
- Seeds: a compressed variant is made once per calibration seed; mean, std (ddof=1) and the worst seed
  describe what calibration luck does (the paper saw std up to 16 points).
- Items: a 95% CI from a bootstrap over items, stratified by sub-scenario so each keeps its size. Each resample
  is scored by the perspective's own score() (so the CI is of the real DecodingTrust metric, not a proxy).
- Paired test vs dense: the same resampled items are scored for dense and for every seed of the variant; the
  distribution of (mean over seeds - dense) gives the delta's CI and a two-sided bootstrap p-value
  (2 x the smaller tail mass at 0, with +1 smoothing). It captures item sampling only; seed spread is reported
  separately through std and worst seed.
- Recommendation: the most compressed variant (fewest nominal bits per weight) whose every perspective stays
  within `budget` points of dense on its worst seed. Variants with a failed or missing unit cannot be
  recommended: their unknown perspective could be the one that collapsed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from comptrust import perspectives as registry
from comptrust.evaluate import options_for
from comptrust.perspectives.base import EvalOptions, MissingData
from comptrust.study.runner import Plan, eval_unit
from comptrust.study.spec import DENSE, StudySpec
from comptrust.types import Parsed, Record


class _MemoScorer:
    """Wraps a toxicity scorer so that bootstrap resamples re-use the scores of texts already seen."""

    def __init__(self, inner: Any):
        self.inner, self.name, self.memo = inner, inner.name, {}

    def score(self, texts: list[str]) -> list[float | None]:
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.inner.score(new)))
        return [self.memo[t] for t in texts]


def _records(unit: dict[str, Any], by_id: dict[str, Any]) -> list[Record]:
    out = []
    for c in unit["result"]["records"]:
        item = by_id.get(c["id"])
        if item is not None:
            out.append(Record(item=item, outputs=c["o"], parsed=[Parsed(*x) for x in c["p"]]))
    return out


def _strata(records: Sequence[Record]) -> list[np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.item.group, []).append(i)
    return [np.asarray(v) for v in groups.values()]


def _p_value(deltas: np.ndarray) -> float:
    b = len(deltas)
    lo = (np.sum(deltas <= 0) + 1) / (b + 1)
    hi = (np.sum(deltas >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(lo, hi)))


def _ci(values: Sequence[float]) -> list[float] | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if len(v) < 2:
        return None
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def _bootstrap(p: Any, popts: EvalOptions, loaded: Any, recs: dict[str, list[Record]], b: int,
               seed: int) -> dict[str, np.ndarray]:
    """Scores of every instance on the same b stratified resamples of the items they share."""
    if b <= 0 or not recs:
        return {}
    common = set.intersection(*({r.item.id for r in rs} for rs in recs.values()))
    first = next(iter(recs.values()))
    order = [r.item.id for r in first if r.item.id in common]
    aligned = {inst: {r.item.id: r for r in rs} for inst, rs in recs.items()}
    cols = {inst: [aligned[inst][i] for i in order] for inst in recs}
    strata = _strata(cols[next(iter(cols))])
    rng = np.random.default_rng(seed)
    out = {inst: np.full(b, np.nan) for inst in recs}
    for k in range(b):
        idx = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata]) if strata else np.array([], int)
        for inst, col in cols.items():
            try:
                sc = p.score([col[i] for i in idx], popts, loaded).score
            except (ZeroDivisionError, ValueError, KeyError):
                sc = None
            out[inst][k] = np.nan if sc is None else sc
    return out


def analyze(spec: StudySpec, stored: dict[str, dict[str, Any]], opts: EvalOptions) -> dict[str, Any]:
    plan = Plan.of(spec)
    status = {r["unit"]: r for r in plan.status(stored)}
    instances = {v.name: ([DENSE] if v.is_dense else [f"{v.name}@s{s}" for s in v.seeds]) for v in spec.variants}
    dense_name = next(v.name for v in spec.variants if v.is_dense)

    per_p: dict[str, dict[str, Any]] = {}
    for pname in spec.perspectives:
        p = registry.get(pname)
        popts = options_for(p, opts)
        if pname == "toxicity":
            from comptrust.perspectives.toxicity import resolve_scorer

            popts = replace(popts, extra={**popts.extra, "toxicity_scorer": _MemoScorer(resolve_scorer(popts))})
        done = {
            inst: stored[eval_unit(inst, pname)]
            for insts in instances.values()
            for inst in insts
            if status[eval_unit(inst, pname)]["status"] == "done"
        }
        boot: dict[str, np.ndarray] = {}
        boot_note = None
        if done and spec.bootstrap > 0:
            try:
                loaded = p.load(popts)
                by_id = {it.id: it for it in loaded.items}
                recs = {inst: _records(u, by_id) for inst, u in done.items()}
                boot = _bootstrap(p, popts, loaded, recs, spec.bootstrap, spec.seed)
            except MissingData as e:
                boot_note = f"no bootstrap: data no longer found ({e})"
        if pname == "toxicity":  # what the toxicity numbers stand for, next to them in the report
            from comptrust.toxicity_scorers import agreement_note

            scorer_note = agreement_note(popts.extra["toxicity_scorer"].name)
            boot_note = f"{scorer_note}; {boot_note}" if boot_note else scorer_note
        per_p[pname] = {"done": done, "boot": boot, "note": boot_note}

    variants: dict[str, Any] = {}
    for v in spec.variants:
        row: dict[str, Any] = {"describe": v.describe(), "instances": instances[v.name], "perspectives": {}}
        missing = []
        for pname in spec.perspectives:
            d = per_p[pname]
            insts = instances[v.name]
            scores = {i: d["done"][i]["result"]["score"] for i in insts if i in d["done"]}
            errors = {i: status[eval_unit(i, pname)]["error"] or status[eval_unit(i, pname)]["status"]
                      for i in insts if i not in d["done"]}
            if errors:
                missing.append(pname)
            cell: dict[str, Any] = {"errors": errors, "seeds": {i: s["score"] for i, s in scores.items()}}
            vals = [s["score"] for s in scores.values() if s["score"] is not None]
            if vals:
                worst_inst = min((i for i in scores if scores[i]["score"] is not None), key=lambda i: scores[i]["score"])
                refusals = [s["refusal_rate"] for s in scores.values() if s["refusal_rate"] is not None]
                cell.update(
                    mean=float(np.mean(vals)),
                    std=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                    worst=float(min(vals)),
                    worst_instance=worst_inst,
                    refusal=float(np.mean(refusals)) if refusals else None,
                    n_items=max(s["n_items"] for s in scores.values()),
                    subscores=_mean_dicts([s.get("subscores") or {} for s in scores.values()]),
                    skipped=sorted({x for s in scores.values() for x in s.get("skipped", [])}),
                )
                boot = d["boot"]
                if boot and all(i in boot for i in scores):
                    mean_b = np.nanmean(np.vstack([boot[i] for i in scores]), axis=0)
                    cell["ci"] = _ci(mean_b)
                    dense_key = instances[dense_name][0]
                    if not v.is_dense and dense_key in boot:
                        deltas = mean_b - boot[dense_key]
                        deltas = deltas[~np.isnan(deltas)]
                        if len(deltas) > 1:
                            cell["delta_ci"] = _ci(deltas)
                            cell["p_value"] = _p_value(deltas)
                            cell["significant"] = cell["p_value"] < spec.alpha
            row["perspectives"][pname] = cell
        row["complete"] = not missing
        row["missing"] = missing
        variants[v.name] = row

    dense_row = variants[dense_name]
    for name, row in variants.items():
        for pname, cell in row["perspectives"].items():
            base = dense_row["perspectives"][pname].get("mean")
            if base is not None and cell.get("mean") is not None:
                cell["delta"] = cell["mean"] - base
                cell["delta_worst"] = cell["worst"] - base

    return {
        "variants": variants,
        "dense": dense_name,
        "recommendation": recommend(spec, variants, dense_name),
        "notes": [f"{p}: {d['note']}" for p, d in per_p.items() if d["note"]],
        "method": {
            "bootstrap": spec.bootstrap,
            "ci": "95% percentile bootstrap over items, stratified by sub-scenario, scored by the perspective's own metric",
            "test": "paired bootstrap vs dense on the same resampled items, two-sided, (mean over seeds - dense)",
            "alpha": spec.alpha,
            "budget": spec.budget,
        },
    }


def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in dict.fromkeys(k for d in ds for k in d)]
    out = {}
    for k in keys:
        vals = [d[k] for d in ds if isinstance(d.get(k), (int, float))]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def recommend(spec: StudySpec, variants: dict[str, Any], dense_name: str) -> dict[str, Any]:
    """The most compressed variant that keeps every perspective within the budget on its worst seed."""
    budget = spec.budget
    dense = variants[dense_name]
    if not dense["complete"]:
        return {"variant": None, "text": f"No recommendation: the dense baseline is incomplete "
                f"(missing {', '.join(dense['missing'])}); rerun the study to finish it.", "kept": [], "rejected": {}}
    kept, rejected = [], {}
    for v in spec.variants:
        if v.is_dense:
            continue
        row = variants[v.name]
        if not row["complete"]:
            rejected[v.name] = f"incomplete (no result for {', '.join(row['missing'])})"
            continue
        drops = {p: c["delta_worst"] for p, c in row["perspectives"].items() if c.get("delta_worst") is not None}
        worst_p = min(drops, key=drops.get) if drops else None
        if worst_p is not None and drops[worst_p] < -budget:
            over = sorted((p for p in drops if drops[p] < -budget), key=drops.get)
            rejected[v.name] = ", ".join(
                f"{p} {drops[p]:+.1f}" + (f" (seed {row['perspectives'][p]['worst_instance'].split('@s')[-1]})"
                                          if len(v.seeds) > 1 else "")
                for p in over
            )
            continue
        kept.append((v.bits(), -(drops[worst_p] if worst_p else 0.0), v.name, worst_p, drops.get(worst_p, 0.0)))
    if not kept:
        closest = None
        if rejected:
            closest = min(
                (n for n in rejected if variants[n]["complete"]),
                key=lambda n: -min(c.get("delta_worst", 0.0) for c in variants[n]["perspectives"].values()),
                default=None,
            )
        text = (f"None of the compressed variants keeps every perspective within {budget:g} points of dense"
                + (" on every seed" if any(len(v.seeds) > 1 for v in spec.variants) else "") + ". "
                + (f"Closest: {closest} ({rejected[closest]}). " if closest else "")
                + "Ship the dense model, or widen the search (more bits, other methods).")
        return {"variant": None, "text": text, "kept": [], "rejected": rejected}
    kept.sort()
    bits, _, name, worst_p, worst_d = kept[0]
    sig = [p for p, c in variants[name]["perspectives"].items() if c.get("significant") and c.get("delta", 0) < 0]
    text = (f"Ship {name} ({bits:g} bits per weight, nominal): every perspective stays within {budget:g} points of "
            f"dense" + (" on every seed" if len(spec.variant(name).seeds) > 1 else "")
            + (f"; its largest drop is {worst_p} {worst_d:+.1f}" if worst_p and worst_d < 0 else "") + ".")
    if sig:
        text += f" Significant (p < {spec.alpha:g}) but within budget: {', '.join(sig)}."
    return {"variant": name, "text": text, "kept": [k[2] for k in kept], "rejected": rejected}
