"""Project the wall time of a full-profile DecodingTrust run from a measured generation rate.

    python bench/projection.py --data-dir ../shared/data/decodingtrust --mmlu-dir ../shared/data/mmlu \
        --tok-per-s 1331 --prefill-tok-per-s 60000 [--sampled-tok-per-s 9000] [--overhead 1.05]

Counts every generation request that `comptrust evaluate --suite dt --profile full` would make (prompts x n
samples, each perspective's max new tokens), then divides by the rates: new tokens (an upper bound: every output
runs to its max) at the measured decode rate, prompt tokens (approximated as characters / 4) at the prefill rate.
The rates come from bench/throughput.py (bench/results/throughput_*.md) and bench/evaluate_gpu.py: there, the
n = 25 perspectives (toxicity, stereotype) decode at their own, much higher rate (hundreds of rows per batch, the
prompt's K/V read once per prompt): --sampled-tok-per-s applies to every perspective whose prompts ask for n > 1
samples, --tok-per-s to the rest. --overhead multiplies the total by evaluate's end-to-end time over the engine's
(tokenising, the store, scoring), as measured. --floor-arch adds the hardware floor of the same work: every token's
matmul FLOPs at the measured matmul rate plus the K/V its decode steps read (a prompt's once per step for its n rows)
at the measured bandwidth, weights, activations and attention FLOPs taken as free (large batches).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARCHS = {  # (hidden, intermediate, layers, heads, KV heads): Llama-2 as released, vocabulary 32,000
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "llama2-13b": (5120, 13824, 40, 40, 40),
}


def arch_costs(arch: str, vocab: int = 32000) -> tuple[float, float]:
    """(matmul FLOPs per token: 2 x the weights of every layer and the output head; bytes of K/V per cached slot, bf16)."""
    h, i, layers, heads, kv = ARCHS[arch]
    hd = h // heads
    per_layer = h * h * 2 + 2 * h * kv * hd + 3 * h * i
    return 2.0 * (layers * per_layer + h * vocab), 2.0 * 2 * layers * kv * hd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data/decodingtrust"))
    ap.add_argument("--mmlu-dir", type=Path, default=Path("../shared/data/mmlu"))
    ap.add_argument("--tok-per-s", type=float, required=True, help="measured decode rate, new tokens/s")
    ap.add_argument("--prefill-tok-per-s", type=float, default=50_000.0, help="prompt tokens/s")
    ap.add_argument("--sampled-tok-per-s", type=float, help="decode rate for perspectives with n > 1 (default: --tok-per-s)")
    ap.add_argument("--overhead", type=float, default=1.0, help="evaluate end to end / engine alone (measured)")
    ap.add_argument("--floor-arch", choices=sorted(ARCHS), help="also print the hardware floor of the same work for "
                    "this architecture (Llama-2 vocabulary, bf16) at --peak-tflops and --bandwidth-gbs")
    ap.add_argument("--peak-tflops", type=float, default=795.0, help="measured bf16 matmul rate (H200: 795)")
    ap.add_argument("--bandwidth-gbs", type=float, default=4268.0, help="measured memory bandwidth (H200: 4268)")
    args = ap.parse_args()

    from comptrust import perspectives as registry
    from comptrust.evaluate import load_perspectives
    from comptrust.perspectives.base import EvalOptions

    opts = EvalOptions(data_dir=args.data_dir.resolve(), profile="full", mmlu_dir=args.mmlu_dir.resolve())
    loaded, not_run = load_perspectives(list(registry.REGISTRY), opts)
    rows, tot_new, tot_prompt, sampled_new = [], 0, 0, 0
    floor = {"decode n > 1": 0.0, "decode n = 1": 0.0, "prefill": 0.0}
    if args.floor_arch:
        flops, kvb = arch_costs(args.floor_arch)
        peak, bw = args.peak_tflops * 1e12, args.bandwidth_gbs * 1e9
    for name, (p, ld, popts) in loaded.items():
        prompts = [it.prompt for it in ld.items]
        gens = sum(pr.params.n for pr in prompts)
        new = sum(pr.params.n * pr.params.max_new_tokens for pr in prompts)
        lens = [len(json.dumps([m.content for m in pr.messages] if pr.messages else pr.raw)) for pr in prompts]
        chars = sum(lens)
        rows.append((name, len(ld.items), len(prompts), gens, new, chars // 4))
        if args.floor_arch:
            for pr, ln in zip(prompts, lens):
                plen = ln // 4
                n, m = pr.params.n, pr.params.max_new_tokens
                # K/V slots read over the output: each row its own j generated slots at step j, the prompt's
                # once per step for all n rows (shared-prefix decoding; n = 1: the row's own prompt)
                slots = n * m * (m - 1) / 2 + m * plen
                t = n * m * flops / peak + slots * kvb / bw
                floor["decode n > 1" if n > 1 else "decode n = 1"] += t
                floor["prefill"] += plen * flops / peak
        tot_new += new
        tot_prompt += chars // 4
        sampled_new += sum(pr.params.n * pr.params.max_new_tokens for pr in prompts if pr.params.n > 1)
    print("| perspective | items | prompts | generations | max new tokens | prompt tokens (approx) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    sampled_rate = args.sampled_tok_per_s or args.tok_per_s
    decode_s = (tot_new - sampled_new) / args.tok_per_s + sampled_new / sampled_rate
    prefill_s = tot_prompt / args.prefill_tok_per_s
    total_h = (decode_s + prefill_s) * args.overhead / 3600
    print(f"\ntotal: {tot_new:,} new tokens (upper bound; {sampled_new:,} of them in n > 1 perspectives), "
          f"{tot_prompt:,} prompt tokens; at {args.tok_per_s:,.0f} new tok/s (n = 1), {sampled_rate:,.0f} new tok/s "
          f"(n > 1) and {args.prefill_tok_per_s:,.0f} prompt tok/s: decode {decode_s / 3600:.2f} h + prefill "
          f"{prefill_s / 3600:.2f} h" + (f", x {args.overhead:.3f} evaluate overhead" if args.overhead != 1.0 else "")
          + f" = {total_h:.2f} h")
    if args.floor_arch:
        parts = ", ".join(f"{k} {v / 3600:.2f} h" for k, v in floor.items())
        print(f"hardware floor ({args.floor_arch}, {args.peak_tflops:.0f} TFLOP/s, {args.bandwidth_gbs:.0f} GB/s): {parts} "
              f"= {sum(floor.values()) / 3600:.2f} h (every matmul at the matmul rate, K/V read once at the bandwidth; "
              f"weights, activations and attention FLOPs free)")
    if not_run:
        print(f"not run (missing data): {not_run}")


if __name__ == "__main__":
    main()
