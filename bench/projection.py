"""Project the wall time of a full-profile DecodingTrust run from a measured generation rate.

    python bench/projection.py --data-dir ../shared/data/decodingtrust --mmlu-dir ../shared/data/mmlu \
        --tok-per-s 1331 --prefill-tok-per-s 60000

Counts every generation request that `comptrust evaluate --suite dt --profile full` would make (prompts x n
samples, each perspective's max new tokens), then divides by the rates: new tokens (an upper bound: every output
runs to its max) at the measured decode rate, prompt tokens (approximated as characters / 4) at the prefill rate.
The rates come from bench/throughput.py (bench/results/throughput_*.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data/decodingtrust"))
    ap.add_argument("--mmlu-dir", type=Path, default=Path("../shared/data/mmlu"))
    ap.add_argument("--tok-per-s", type=float, required=True, help="measured decode rate, new tokens/s")
    ap.add_argument("--prefill-tok-per-s", type=float, default=50_000.0, help="prompt tokens/s")
    args = ap.parse_args()

    from comptrust import perspectives as registry
    from comptrust.evaluate import load_perspectives
    from comptrust.perspectives.base import EvalOptions

    opts = EvalOptions(data_dir=args.data_dir.resolve(), profile="full", mmlu_dir=args.mmlu_dir.resolve())
    loaded, not_run = load_perspectives(list(registry.REGISTRY), opts)
    rows, tot_new, tot_prompt = [], 0, 0
    for name, (p, ld, popts) in loaded.items():
        prompts = [it.prompt for it in ld.items]
        gens = sum(pr.params.n for pr in prompts)
        new = sum(pr.params.n * pr.params.max_new_tokens for pr in prompts)
        chars = sum(len(json.dumps([m.content for m in pr.messages] if pr.messages else pr.raw)) for pr in prompts)
        rows.append((name, len(ld.items), len(prompts), gens, new, chars // 4))
        tot_new += new
        tot_prompt += chars // 4
    print("| perspective | items | prompts | generations | max new tokens | prompt tokens (approx) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    decode_s = tot_new / args.tok_per_s
    prefill_s = tot_prompt / args.prefill_tok_per_s
    print(f"\ntotal: {tot_new:,} new tokens (upper bound), {tot_prompt:,} prompt tokens; at {args.tok_per_s:,.0f} new "
          f"tok/s and {args.prefill_tok_per_s:,.0f} prompt tok/s: decode {decode_s / 3600:.2f} h + prefill "
          f"{prefill_s / 3600:.2f} h = {(decode_s + prefill_s) / 3600:.2f} h")
    if not_run:
        print(f"not run (missing data): {not_run}")


if __name__ == "__main__":
    main()
