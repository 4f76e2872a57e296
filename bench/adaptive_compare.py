#!/usr/bin/env python
"""Generations an adaptive study used vs a fixed one, per perspective, and whether their verdicts agree.

    python bench/adaptive_compare.py FIXED_DIR ADAPTIVE_DIR [ADAPTIVE_DIR ...]

Counts outputs per (model, perspective, item) in the done eval units of the fixed study's store and of every round
of the adaptive one(s) (bench/results/adaptive_default_study.md says how they were run)."""
import json, sys
from pathlib import Path
from comptrust.store import Store

def outputs(store_path, persps):
    """(instance, perspective, item id) -> number of outputs, over the done eval units of one store."""
    with Store(store_path, readonly=True) as st:
        u = st.units()
    out = {}
    for uid, v in u.items():
        if v["kind"] != "eval" or v["status"] != "done":
            continue
        _, inst, p = uid.split(":")
        if p in persps:
            for r in v["result"]["records"]:
                out[(inst, p, r["id"])] = len(r["o"])
    return out

fixed_dir = Path(sys.argv[1]); ad_dirs = [Path(d) for d in sys.argv[2:]]
rows = []
fixed_res = json.loads((fixed_dir / "results.json").read_text())["analysis"]["variants"]
tot_f = tot_a = 0
agree = disagree = 0
lines = []
for ad in ad_dirs:
    doc = json.loads((ad / "adaptive.json").read_text())
    res = json.loads((ad / "results.json").read_text())
    persps = res["perspectives"]
    used = {}
    for store in sorted((ad / "rounds").glob("*/comptrust.sqlite")):
        used.update(outputs(store, persps))
    fixed = outputs(fixed_dir / "comptrust.sqlite", persps)
    for p in persps:
        nf = sum(n for k, n in fixed.items() if k[1] == p); na = sum(n for k, n in used.items() if k[1] == p)
        tot_f += nf; tot_a += na
        vs = []
        for name, v in res["analysis"]["variants"].items():
            c = v["perspectives"].get(p) or {}
            if not c.get("verdict"):
                continue
            va = c["verdict"]["verdict"]; vf = fixed_res[name]["perspectives"][p]["verdict"]["verdict"]
            if va == vf: agree += 1
            else: disagree += 1; vs.append(f"{name}: adaptive {va} / fixed {vf}")
        lines.append(f"| {p} | {nf} | {na} | {'; '.join(vs) or 'all agree'} |")
print("| perspective | fixed generations | adaptive generations | verdicts |\n|---|---|---|---|")
print("\n".join(lines))
print(f"\ntotal: fixed {tot_f}, adaptive {tot_a} ({100 * tot_a / max(tot_f, 1):.0f}%); verdicts agree {agree}, differ {disagree}")
