"""Adaptive evaluation: rounds of further items, only for the (variant, perspective) pairs still undecided.

Why: at the item counts people run, most verdicts are *undecided*; running every pair on the full pool spends
most generations on pairs a small sample already decided. Here a study runs in looks k = 1..K at growing
per-sub-scenario limits L_1 < ... < L_K (geometric, L_K = the pool or `max_limit`). Items are drawn by the
perspectives' own subsampling (a hash of seed and item key per sub-scenario), so the items of a look contain
those of the previous one and are the same for dense and every variant (stratified, deterministic, paired).

Validity under repeated looks: a group-sequential design. At look k a pair's statistic Z = (d + budget) / se is
compared with the Lan-DeMets O'Brien-Fleming-type boundary c_k of information fraction t_k = n_k / n_K (items at
look k over items at the last look; analysis.gs_boundaries), for both one-sided tests (keeps: Z >= c_k; loses:
-Z >= c_k). A pair stops at its first crossing; its verdict is that look's. The look schedule is fixed before any
data is seen, so the chance of a false "keeps" over all looks is at most alpha (tests/study/test_decisions.py
checks this by simulation). Stopping early because the generation budget ran out leaves pairs undecided, which
only makes the procedure more conservative.

Layout: DIR/rounds/r<k>-<perspective>/ is an ordinary study (dense + the variants undecided on that perspective,
limit L_k), so each round resumes like any study; generations and finished compressions are copied between
rounds, so an item is generated once per model. DIR/adaptive.json holds the schedule, every look, the final
verdicts and the generations spent; rerunning the command resumes from the rounds already in DIR.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from comptrust.evaluate import check_out_dir, options_for
from comptrust.results import StudyReport
from comptrust.store import STORE_NAME, write_atomic_many
from comptrust.study.analysis import (
    KEEPS,
    LOSES,
    UNDECIDED,
    combine_se,
    gs_boundaries,
    recommend_noninferiority,
    verdict_of,
)
from comptrust.study.spec import DENSE, StudySpec

DEFAULT_LOOKS = 4
ADAPTIVE_NAME = "adaptive.json"


@dataclass(frozen=True)
class Settings:
    looks: int = DEFAULT_LOOKS
    start_limit: int | None = None  # default: the study's limit, else 2
    max_limit: int | None = None  # default: the whole pool
    max_generations: int | None = None  # stop starting rounds once this many new generations were made
    max_seconds: int | None = None  # ... or once the adaptive run has taken this long

    @classmethod
    def of(cls, value: Any) -> "Settings":
        if value is True or value is None:
            return cls()
        return cls(**value)


def schedule(start: int, pool: int, looks: int) -> list[int]:
    """Per-sub-scenario limits of the looks: geometric from start to pool, strictly increasing, at most `looks`."""
    start = max(1, min(start, pool))
    if looks <= 1 or start >= pool:
        return [pool]
    r = (pool / start) ** (1 / (looks - 1))
    out = sorted({min(pool, max(start, int(round(start * r ** k)))) for k in range(looks)})
    if out[-1] != pool:
        out.append(pool)
    return out


def _pool_and_counts(spec: StudySpec, pname: str, limits: Sequence[int] | None = None) -> tuple[int, list[int]]:
    """(largest sub-scenario size, items at each limit) of one perspective on the study's data."""
    from comptrust import perspectives as registry
    from comptrust.study.plan import eval_options

    p = registry.get(pname)
    full = p.load(options_for(p, eval_options(replace(spec, limit=None))))
    sizes: dict[str, int] = {}
    for it in full.items:
        sizes[it.group] = sizes.get(it.group, 0) + 1
    pool = max(sizes.values()) if sizes else 0
    counts = [len(p.load(options_for(p, eval_options(replace(spec, limit=lim)))).items) for lim in (limits or [])]
    return pool, counts


def _say(msg: str) -> None:
    print(f"[adaptive] {msg}", file=sys.stderr, flush=True)


def run_adaptive(spec: StudySpec, out_dir: Path, settings: Settings, progress: bool | None = None) -> dict[str, Any]:
    """Run the study adaptively into out_dir; returns the adaptive summary (also in DIR/adaptive.json)."""
    from comptrust.store import Store
    from comptrust.study.runner import run_study

    out_dir = check_out_dir(Path(out_dir))
    start = settings.start_limit or spec.limit or 2
    plans: dict[str, dict[str, Any]] = {}
    for pname in spec.perspectives:
        pool, _ = _pool_and_counts(spec, pname)
        top = min(pool, settings.max_limit) if settings.max_limit else pool
        limits = schedule(start, top, settings.looks)
        _, counts = _pool_and_counts(spec, pname, limits)
        plans[pname] = {"limits": limits, "items": counts, "fractions": [c / counts[-1] for c in counts],
                        "boundaries": gs_boundaries(spec.alpha, [c / counts[-1] for c in counts])}
    compressed = [v for v in spec.variants if not v.is_dense]
    open_pairs = {(v.name, p) for v in compressed for p in spec.perspectives}
    final: dict[str, dict[str, Any]] = {}
    looks_log: list[dict[str, Any]] = []
    spent = 0
    max_k = max(len(pl["limits"]) for pl in plans.values())
    carried_generations: list[tuple] = []
    carried_compress: dict[str, dict[str, Any]] = {}
    stopped_for_budget = False
    latest: dict[str, StudyReport] = {}  # perspective -> the result of its latest look
    decided: dict[str, StudyReport] = {}  # "variant:perspective" -> the result of the look that gave its verdict
    t_start = time.time()
    for k in range(max_k):
        for pname in spec.perspectives:
            pl = plans[pname]
            names = [n for n, p in sorted(open_pairs) if p == pname]
            if k >= len(pl["limits"]) or not names:
                continue
            if (settings.max_generations is not None and spent >= settings.max_generations) or \
                    (settings.max_seconds is not None and time.time() - t_start >= settings.max_seconds):
                stopped_for_budget = True
                break
            keep = {DENSE, *names}
            sub = replace(spec, limit=pl["limits"][k], perspectives=[pname],
                          variants=[v for v in spec.variants if v.name in keep or v.is_dense])
            rdir = out_dir / "rounds" / f"r{k + 1}-{pname}"
            rdir.mkdir(parents=True, exist_ok=True)
            with Store(rdir / STORE_NAME) as st:  # what earlier rounds made: generations and checkpoints
                if carried_generations:
                    st.put_generation_rows(carried_generations)
                for uid, u in carried_compress.items():
                    if uid not in st.units(with_results=False):
                        st.put_unit(uid, "compress", "done", u["result"], u["seconds"] or 0.0)
            _say(f"look {k + 1}/{len(pl['limits'])} of {pname}: limit {pl['limits'][k]} ({pl['items'][k]} items), "
                 f"{len(names)} undecided variant(s): {', '.join(names)}")
            run_study(sub, rdir, progress=progress)
            with Store(rdir / STORE_NAME) as st:
                made = generated(st.units())
                carried_generations = st.generation_rows()
                for uid, u in st.units().items():
                    if u["kind"] == "compress" and u["status"] == "done":
                        carried_compress[uid] = u
            spent += max(made, 0)
            look_result = _analyze_look(sub, rdir, pl, k)
            a = look_result.analysis.model_dump(mode="json")
            latest[pname] = look_result
            look = {"look": k + 1, "perspective": pname, "limit": pl["limits"][k], "items": pl["items"][k],
                    "boundary": pl["boundaries"][k], "generated": made, "verdicts": {}}
            for n in names:
                cell = a["variants"][n]["perspectives"][pname]
                v = (cell.get("verdict") or {}).get("verdict", UNDECIDED)
                look["verdicts"][n] = v
                final[f"{n}:{pname}"] = {**_slim(cell), "look": k + 1, "limit": pl["limits"][k]}
                decided[f"{n}:{pname}"] = look_result
                if v != UNDECIDED or k == len(pl["limits"]) - 1:  # stopped: this look's verdict is final
                    open_pairs.discard((n, pname))
            looks_log.append(look)
            _write(out_dir, spec, settings, plans, looks_log, final, open_pairs, spent, stopped_for_budget)
            _write_report(out_dir, spec, looks_log, final, open_pairs, spent, stopped_for_budget, latest, decided)
        if stopped_for_budget or not open_pairs:
            break
    doc = _write(out_dir, spec, settings, plans, looks_log, final, open_pairs, spent, stopped_for_budget)
    _write_report(out_dir, spec, looks_log, final, open_pairs, spent, stopped_for_budget, latest, decided)
    return doc


DESIGN = ("group-sequential, Lan-DeMets O'Brien-Fleming-type alpha spending over a fixed maximum number of looks, "
          "both one-sided tests (keeps / loses)")


def _write_report(out_dir: Path, spec: StudySpec, looks: list[dict[str, Any]], final: dict[str, Any],
                  open_pairs: set, spent: int, stopped_for_budget: bool, latest: dict[str, StudyReport],
                  decided: dict[str, StudyReport]) -> StudyReport | None:
    """DIR/report.html, results.csv and results.json of the adaptive study, through the same renderer as a fixed
    study: each (variant, perspective) cell comes from the look that decided it (or its last look), dense's from
    the latest look of each perspective, plus the rounds (looks) section."""
    from comptrust.report import ordered
    from comptrust.results import (
        AdaptiveLook,
        AdaptiveSummary,
        Cell,
        Provenance,
        StudyAnalysis,
        UnitRow,
        VariantRow,
    )
    from comptrust.study.analysis import recommend_noninferiority, settings_of
    from comptrust.study.runner import write_outputs

    if not latest:
        return None
    from comptrust.outputs import run_header

    rows: dict[str, VariantRow] = {}
    units: list[UnitRow] = []
    for pname, res in latest.items():
        units += [u.model_copy(update={"unit": f"r-{pname}/{u.unit}"}) for u in res.units]
    for v in spec.variants:
        cells: dict[str, Cell] = {}
        base: VariantRow | None = None
        for pname in spec.perspectives:
            key = f"{v.name}:{pname}"
            src = latest.get(pname) if v.is_dense else decided.get(key)
            row = src.analysis.variants.get(v.name) if src is not None else None
            if row is None:
                cells[pname] = Cell(errors={v.name: "not evaluated (the budget ran out first)"})
                continue
            base = base or row
            cells[pname] = row.perspectives[pname]
        missing = [p for p, c in cells.items() if c.errors]
        rows[v.name] = VariantRow(describe=v.describe(), instances=base.instances if base else [], perspectives=cells,
                                  perplexity=base.perplexity if base else None, flags=base.flags if base else [],
                                  complete=not missing, missing=missing)
    rec = recommend_noninferiority(spec, {n: r.model_dump(mode="json") for n, r in rows.items()}, DENSE)
    last = latest[next(reversed(latest))]
    method = last.analysis.method.model_copy(update={"rule": last.analysis.method.rule + (
        " Adaptive study: each cell's verdict is the one of the look that decided it (or of its last look); the "
        "boundary z of each look is in the rounds table.")})
    analysis = StudyAnalysis(variants=rows, dense=DENSE, recommendation=rec, method=method,
                             notes=list(dict.fromkeys(n for r in latest.values() for n in r.analysis.notes)),
                             dense_note=last.analysis.dense_note)
    summary = AdaptiveSummary(design=DESIGN, looks=[AdaptiveLook.model_validate(lk) for lk in looks],
                              decided_at={k: c["look"] for k, c in final.items()},
                              still_open=sorted(f"{n}:{p}" for n, p in open_pairs), generated=spent,
                              stopped_for_budget=stopped_for_budget)
    prov = last.provenance.model_dump()
    for r in latest.values():
        prov["models"] = {**r.provenance.models, **prov["models"]}
    result = StudyReport(header=run_header("results"), study=spec.to_dict(), settings=settings_of(spec),
                         perspectives=ordered(spec.perspectives), analysis=analysis, units=units,
                         provenance=Provenance.model_validate(prov), adaptive=summary)
    return write_outputs(out_dir, result)


def generated(units: dict[str, dict[str, Any]]) -> int:
    """Prompts the engine generated (cache misses) for the done eval units of one study directory. The units of
    one model share one engine call and its counts: each model is counted once."""
    seen: dict[str, int] = {}
    for uid, u in units.items():
        if u["kind"] == "eval" and u["status"] == "done":
            inst = uid.split(":")[1]
            seen[inst] = int(((u["result"].get("generation") or {}).get("generated")) or 0)
    return sum(seen.values())


def _analyze_look(sub: StudySpec, rdir: Path, plan: dict[str, Any], k: int) -> StudyReport:
    """The round's result with look k's group-sequential boundary in place of the fixed z."""
    from comptrust.store import Store
    from comptrust.study.analysis import build_result

    with Store(rdir / STORE_NAME) as st:
        stored = st.units()
    return build_result(sub, stored,
                        looks={"fractions": plan["fractions"][:k + 1], "max_looks": len(plan["fractions"])})


def _slim(cell: dict[str, Any]) -> dict[str, Any]:
    v = cell.get("verdict") or {}
    return {"mean": cell.get("mean"), "delta": cell.get("delta"), "flags": cell.get("flags") or [],
            "verdict": {k: v.get(k) for k in ("verdict", "counts", "delta", "se", "lcb", "ucb", "n", "more_items",
                                              "seed", "reason")}}


def _write(out_dir: Path, spec: StudySpec, settings: Settings, plans: dict[str, Any], looks: list[dict[str, Any]],
           final: dict[str, Any], open_pairs: set, spent: int, stopped_for_budget: bool) -> dict[str, Any]:
    variants: dict[str, Any] = {v.name: {"describe": v.describe(), "complete": True, "missing": [], "perspectives": {}}
                                for v in spec.variants}
    for key, cell in final.items():
        n, p = key.rsplit(":", 1)
        variants[n]["perspectives"][p] = cell
    for v in spec.variants:
        if v.is_dense:
            continue
        missing = [p for p in spec.perspectives if p not in variants[v.name]["perspectives"]]
        variants[v.name]["complete"] = not missing
        variants[v.name]["missing"] = missing
    rec = recommend_noninferiority(spec, variants, DENSE)
    doc = {"settings": settings.__dict__, "design": DESIGN, "alpha": spec.alpha,
           "budget": spec.budget, "plans": plans, "looks": looks, "final": final,
           "still_open": sorted(f"{n}:{p}" for n, p in open_pairs), "generated": spent,
           "stopped_for_budget": stopped_for_budget, "recommendation": rec}
    write_atomic_many([(out_dir / ADAPTIVE_NAME, json.dumps(doc, indent=2, default=str)),
                       (out_dir / "adaptive.md", _markdown(doc))])
    return doc


def _markdown(doc: dict[str, Any]) -> str:
    """adaptive.md: the recommendation, the final verdict of every pair with the look that decided it, the looks."""
    lines = ["# Adaptive study", "", doc["recommendation"]["text"], "",
             f"Design: {doc['design']}; alpha {doc['alpha']:g}, budget {doc['budget']:g} points; "
             f"{doc['generated']} generations" + (" (stopped: generation budget spent)" if doc["stopped_for_budget"]
                                                  else "") + ".", "",
             "| variant | perspective | verdict | look | items | delta | lower bound | upper bound | flags |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any) -> str:
        return "" if x is None else f"{x:+.1f}"

    for key, c in doc["final"].items():
        n, p = key.rsplit(":", 1)
        v = c["verdict"]
        lines.append(f"| {n} | {p} | {v.get('verdict')} | {c['look']} | {v.get('n')} | {f(v.get('delta'))} | "
                     f"{f(v.get('lcb'))} | {f(v.get('ucb'))} | {', '.join(c.get('flags') or [])} |")
    lines += ["", "| look | perspective | limit | items | boundary z | generated | verdicts |", "|---|---|---|---|---|---|---|"]
    for lk in doc["looks"]:
        lines.append(f"| {lk['look']} | {lk['perspective']} | {lk['limit']} | {lk['items']} | {lk['boundary']:.2f} | "
                     f"{lk['generated']} | {', '.join(f'{n}: {v}' for n, v in lk['verdicts'].items())} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# simulation: the procedure on synthetic paired item scores


def simulate(delta: float, alpha: float = 0.05, budget: float = 5.0, items: Sequence[int] = (50, 100, 200, 400),
             sims: int = 4000, p_dense: float = 0.7, rho: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Rate of keeps / loses verdicts, and mean items used, when the true (variant - dense) accuracy difference is
    `delta` points, for the group-sequential procedure with looks at `items` (one look = the fixed design).

    Items are paired 0/1 outcomes (an accuracy metric, as in ethics, MMLU, AdvGLUE, OOD) with correlation about
    rho between dense and variant on an item (the same question is hard for both); the statistic and its se
    (analytic here: for a mean, the bootstrap SD estimates the same quantity; combined with 100/n as in the
    analysis, combine_se) go through the analysis' own verdict_of and gs_boundaries."""
    rng = np.random.default_rng(seed)
    n_max = items[-1]
    bounds = gs_boundaries(alpha, [n / n_max for n in items])
    p_var = p_dense + delta / 100.0
    keeps = loses = 0
    used = 0.0
    for _ in range(sims):
        # a shared latent per item gives the pairing: dense and variant correct with their marginal probabilities
        u = rng.random(n_max)
        same = rng.random(n_max) < rho
        v_u = np.where(same, u, rng.random(n_max))
        d = (u < p_dense).astype(float)
        v = (v_u < p_var).astype(float)
        verdict = UNDECIDED
        for n, c in zip(items, bounds):
            diff = v[:n] - d[:n]
            est = 100.0 * diff.mean()
            se = combine_se(100.0 * diff.std(ddof=1) / math.sqrt(n), n)
            verdict = verdict_of(est, se, budget, c)
            if verdict != UNDECIDED:
                used += n
                break
        else:
            used += n_max
        keeps += verdict == KEEPS
        loses += verdict == LOSES
    return {"keeps": keeps / sims, "loses": loses / sims, "mean_items": used / sims, "sims": sims}
