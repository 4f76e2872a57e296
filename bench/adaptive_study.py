"""Adaptive vs fixed study on the embedded model: generations spent and whether the verdicts agree.

The fixed study evaluates every (variant, perspective) pair on the whole pool (no limit); the adaptive one
(comptrust.study.adaptive) starts at `--start-limit` items per sub-scenario and adds items only for undecided pairs.
Both use the same study settings and their own output folders, with the cross-study generation cache off
(COMPTRUST_STUDY_CACHE=off), so each counts what it generated itself.

    flock /tmp/comptrust-model.lock .venv/bin/python bench/adaptive_study.py --out /tmp/adaptive-bench \\
        [--perspectives stereotype,ethics] [--looks 4] [--start-limit 2] [--md bench/results/adaptive_study.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ["COMPTRUST_STUDY_CACHE"] = "off"

from comptrust.store import STORE_NAME  # noqa: E402
from comptrust.store import Store  # noqa: E402
from comptrust.study.adaptive import Settings, generated, run_adaptive  # noqa: E402
from comptrust.study.runner import run_study  # noqa: E402
from comptrust.study.spec import parse_spec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--perspectives", default="stereotype,ethics")
    ap.add_argument("--variants", default="gptq-4,magnitude-2:4")
    ap.add_argument("--looks", type=int, default=4)
    ap.add_argument("--start-limit", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=300)
    ap.add_argument("--md", type=Path, default=None)
    a = ap.parse_args()
    variants: list = ["dense"]
    for v in a.variants.split(","):
        method, setting = v.split("-", 1)
        variants.append({"method": method, "structure": setting} if ":" in setting else {"method": method,
                                                                                           "bits": int(setting)})
    base = {"perspectives": a.perspectives.split(","), "bootstrap": a.bootstrap, "variants": variants}
    spec = parse_spec(base, "<bench>")
    t0 = time.time()
    fixed = run_study(spec, a.out / "fixed", progress=False)
    t_fixed = time.time() - t0
    with Store(a.out / "fixed" / STORE_NAME) as st:
        gen_fixed = generated(st.units())
    t0 = time.time()
    doc = run_adaptive(spec, a.out / "adaptive", Settings(looks=a.looks, start_limit=a.start_limit), progress=False)
    t_adapt = time.time() - t0
    rows = ["| variant | perspective | fixed verdict (items) | adaptive verdict (look, items) | agree |", "|---|---|---|---|---|"]
    agree = total = 0
    for key, c in doc["final"].items():
        n, p = key.rsplit(":", 1)
        fv = fixed["variants"][n]["perspectives"][p].get("verdict") or {}
        av = c["verdict"]
        same = fv.get("verdict") == av.get("verdict")
        agree += same
        total += 1
        rows.append(f"| {n} | {p} | {fv.get('verdict')} ({fv.get('n')}) | {av.get('verdict')} (look {c['look']}, "
                    f"{av.get('n')}) | {'yes' if same else 'no'} |")
    text = (f"Adaptive vs fixed study, embedded model, perspectives {a.perspectives}, variants {a.variants}, "
            f"{a.looks} looks from limit {a.start_limit}.\n\n"
            f"- fixed (whole pool): {gen_fixed} generations, {t_fixed:.0f} s; recommendation: "
            f"{fixed['recommendation']['text']}\n"
            f"- adaptive: {doc['generated']} generations, {t_adapt:.0f} s; recommendation: "
            f"{doc['recommendation']['text']}\n- verdicts agree on {agree} of {total} pairs\n\n" + "\n".join(rows) + "\n")
    print(text)
    if a.md:
        a.md.write_text(text)


if __name__ == "__main__":
    main()
