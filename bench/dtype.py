"""bf16 vs fp32 on the CPU: speed and whether outputs stay sane (same parsed labels as fp32).

Runs the same DecodingTrust stereotype prompts greedily in both dtypes, reports tokens/s, the share of prompts
whose parsed agree/disagree/refusal label matches fp32, and the share of identical texts.

    python bench/dtype.py [--prompts 48] [--max-new-tokens 64]
"""

from __future__ import annotations


# before torch is imported (comptrust sets the same default): spin-waiting OpenMP threads slow a shared CPU ~30x
import comptrust  # noqa: E402,F401 -- before torch: sets OpenMP's waiting (see comptrust/__init__.py)

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from comptrust.engine.hf import HFEngine  # noqa: E402
from comptrust.models import resolve  # noqa: E402
from comptrust.perspectives.stereotype import Stereotype  # noqa: E402

from generation import stereotype_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    model = resolve(None)
    prompts = stereotype_prompts(args.prompts, args.max_new_tokens)
    p = Stereotype()
    res = {}
    for dtype in ("float32", "bfloat16"):
        e = HFEngine(model, dtype=dtype, batch_size=32)
        _ = e.model
        e.generate(prompts[:2])
        t0 = time.time()
        gens = e.generate(prompts)
        secs = time.time() - t0
        ntok = sum(sum(g.n_tokens) for g in gens)
        labels = [p.parse(None, g.texts[0]).label for g in gens]
        res[dtype] = (secs, ntok, [g.texts[0] for g in gens], labels)
        print(f"{dtype}: {secs:.1f} s, {ntok} tokens, {ntok / secs:.1f} tok/s", flush=True)
    f, b = res["float32"], res["bfloat16"]
    same_label = sum(x == y for x, y in zip(f[3], b[3])) / len(prompts)
    same_text = sum(x == y for x, y in zip(f[2], b[2])) / len(prompts)
    print("\n| dtype | wall s | tokens/s |\n|---|---|---|")
    for k, (secs, ntok, _, _) in res.items():
        print(f"| {k} | {secs:.1f} | {ntok / secs:.1f} |")
    print(f"\nparsed stereotype label equal to fp32: {same_label:.0%}; identical text: {same_text:.0%}")
    print(f"bf16 speed-up over fp32: {f[0] / b[0]:.2f}x")


if __name__ == "__main__":
    main()
