"""Simulation of the verdict procedure (comptrust.study.adaptive.simulate): false-keep rate at true delta = -budget
and power at delta 0, for the fixed design (1 look) and group-sequential designs (2 and 4 looks, Lan-DeMets
O'Brien-Fleming-type spending), on synthetic paired accuracy items (dense accuracy 70%, item correlation 0.5).

    .venv/bin/python bench/adaptive_sim.py [--sims 4000] [--out bench/results/adaptive_sim.md]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from comptrust.study.adaptive import simulate


def simulate_metric(pname: str, delta: float, alpha: float, budget: float, sims: int, boot: int, p_dense: float = 0.8,
                    rho: float = 0.5, seed: int = 0, correct: bool = True) -> dict[str, float]:
    """The fixed-design verdict with a perspective's real metric and the analysis' own paired bootstrap: synthetic
    outputs on the perspective's mini items (correct with probability p_dense for dense, p_dense + delta/100 for
    the variant, correlated per item), scored by the perspective, se from analysis._bootstrap."""
    import numpy as np
    from scipy import stats

    from comptrust import perspectives as registry
    from comptrust.evaluate import options_for
    from comptrust.study.analysis import _bootstrap, combine_se, verdict_of
    from comptrust.study.plan import eval_options
    from comptrust.study.spec import parse_spec
    from comptrust.types import Record

    spec = parse_spec({"perspectives": [pname]})
    p = registry.get(pname)
    popts = options_for(p, eval_options(spec))
    loaded = p.load(popts)
    items = loaded.items

    def text(it, ok: bool) -> str:
        if pname == "stereotype":
            return "I disagree." if ok else "I agree."
        gold = it.labels["label"]
        return gold if ok else ("wrong" if gold == "not wrong" else "not wrong")

    rng = np.random.default_rng(seed)
    z = float(stats.norm.ppf(1 - alpha))
    keeps = 0
    for k in range(sims):
        u = rng.random(len(items))
        v_u = np.where(rng.random(len(items)) < rho, u, rng.random(len(items)))
        recs = {}
        for name, uu, pr in (("dense", u, p_dense), ("variant", v_u, p_dense + delta / 100)):
            rs = []
            for it, x in zip(items, uu):
                t = text(it, bool(x < pr))
                rs.append(Record(it, [t], [p.parse(it, t, popts)]))
            recs[name] = rs
        d_hat = p.score(recs["variant"], popts, loaded).score - p.score(recs["dense"], popts, loaded).score
        b, n, corr = _bootstrap(p, popts, loaded, recs, boot, seed + k)
        diffs = b["variant"] - b["dense"]
        diffs = diffs[~np.isnan(diffs)]
        sd = float(np.std(diffs, ddof=1))
        se = combine_se(sd * (corr if correct else 1.0), n)
        keeps += verdict_of(d_hat, se, budget, z) == "keeps"
    return {"keeps": keeps / sims, "n": len(items), "sims": sims}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=4000)
    ap.add_argument("--budget", type=float, default=5.0)
    ap.add_argument("--n-max", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--metric-sims", type=int, default=0, help="also simulate with ethics' real metric (fixed design)")
    ap.add_argument("--metric-boot", type=int, default=200)
    a = ap.parse_args()
    t0 = time.time()
    rows = ["| true delta | alpha | looks (items) | keeps (false-keep rate at -budget; power at 0) | loses | mean items |",
            "|---|---|---|---|---|---|"]
    n = a.n_max
    for alpha in (0.05, 0.10):
        for looks in ((n,), (n // 2, n), (n // 4, n // 2, 3 * n // 4, n)):
            for delta in (-a.budget, 0.0):
                r = simulate(delta, alpha, a.budget, looks, sims=a.sims, seed=7)
                mc = 1.96 * math.sqrt(max(r["keeps"] * (1 - r["keeps"]), 1e-9) / a.sims)
                rows.append(f"| {delta:+g} | {alpha:g} | {len(looks)} ({', '.join(map(str, looks))}) | "
                            f"{r['keeps']:.3f} ± {mc:.3f} | {r['loses']:.3f} | {r['mean_items']:.0f} |")
    text = (f"Simulated verdicts, {a.sims} studies per row, budget {a.budget:g} points, paired 0/1 items "
            f"(dense 70% correct, item correlation 0.5), se = sqrt(sd^2 + (100/n)^2) ({time.time() - t0:.0f} s).\n\n"
            + "\n".join(rows) + "\n")
    if a.metric_sims:
        rows = ["| perspective (real metric) | items | true delta | alpha | keeps |", "|---|---|---|---|---|"]
        rows[0] = "| perspective (real metric) | items | se | true delta | alpha | keeps |"
        rows[1] = "|---|---|---|---|---|---|"
        for correct in (False, True):
            for delta in (-a.budget, 0.0):
                r = simulate_metric("ethics", delta, 0.05, a.budget, a.metric_sims, a.metric_boot, seed=11,
                                    correct=correct)
                mc = 1.96 * math.sqrt(max(r["keeps"] * (1 - r["keeps"]), 1e-9) / r["sims"])
                how = "bootstrap SD x sqrt(m/(m-1))" if correct else "bootstrap SD (uncorrected)"
                rows.append(f"| ethics (mini, full pool) | {r['n']} | {how} | {delta:+g} | 0.05 | "
                            f"{r['keeps']:.3f} ± {mc:.3f} |")
        text += ("\nWith ethics' own metric and the analysis' paired bootstrap (" + str(a.metric_sims) + " studies, "
                 + str(a.metric_boot) + " resamples each; dense 80% correct):\n\n" + "\n".join(rows) + "\n")
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
