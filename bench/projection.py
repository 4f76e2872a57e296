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


def shared_counts(seqs: list[list[int]], n: int, max_new: int, budget: int) -> tuple[int, int, int]:
    """(prompt tokens, tokens computed with shared-prefix prefill, batches) for one parameter group, planned the way
    HFEngine.generate plans it on a GPU (token budget `budget`, prefix clusters kept together, a shared prefix
    computed once per batch, shared-prefix decoding for n > 1)."""
    from comptrust.engine.planning import plan_batches, shared_prefixes

    plan = plan_batches(seqs, n, max_new, budget, None, True, shared_decode=n > 1)
    computed = 0
    for b in plan:
        sub = [seqs[i] for i in b]
        plen = shared_prefixes(sub)
        prefixes = {tuple(s[:p]) for s, p in zip(sub, plen) if p}
        computed += sum(len(s) - p for s, p in zip(sub, plen)) + sum(len(k) for k in prefixes)
    return sum(len(s) for s in seqs), computed, len(plan)


def token_counts(loaded, tok_dir: Path, budget: int, cache: Path | None) -> dict[str, dict]:
    """Per perspective: exact prompt tokens (comptrust's rendering and tokenizer), tokens computed with shared-prefix
    prefill and batches at the given decode token budget. Cached in `cache` (keyed by tokenizer and budget)."""
    key = f"{tok_dir.resolve()}|{budget}"
    if cache and cache.is_file():
        got = json.loads(cache.read_text())
        if got.get("key") == key:
            return got["counts"]
    from collections import defaultdict

    from comptrust.engine.prompts import encode_prompt, load_tokenizer
    from comptrust.models.resolve import ResolvedModel

    rm = ResolvedModel(spec="", name="tokenizer", kind="dir", path=tok_dir, fingerprint="tok")
    tok, chat = load_tokenizer(rm, None)
    out: dict[str, dict] = {}
    for name, (_p, ld, _o) in loaded.items():
        groups: dict = defaultdict(list)
        for it in ld.items:
            pr = it.prompt
            groups[(pr.params.n, pr.params.max_new_tokens)].append(encode_prompt(tok, chat, pr))
        c = {"prompt_tokens": 0, "computed_tokens": 0, "batches": 0}
        for (n, m), seqs in groups.items():
            t, comp, nb = shared_counts(seqs, n, m, budget)
            c["prompt_tokens"] += t
            c["computed_tokens"] += comp
            c["batches"] += nb
        out[name] = c
        print(f"  counted {name}: {c}", flush=True)
    if cache:
        cache.write_text(json.dumps({"key": key, "counts": out}, indent=1))
    return out


def parse_rates(spec: str) -> dict[str, float]:
    """'ood=30000,mmlu=25000' -> {'ood': 30000.0, 'mmlu': 25000.0}"""
    out = {}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        name, _, val = part.partition("=")
        out[name.strip()] = float(val)
    return out


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
    ap.add_argument("--tokenizer", type=Path, help="count prompt tokens exactly with this tokenizer (comptrust's "
                    "rendering) instead of characters / 4, and the tokens shared-prefix prefill computes")
    ap.add_argument("--token-budget", type=int, default=67_000, help="with --tokenizer: the decode batches' token "
                    "budget the prefix sharing is planned under (13B on an H200: ~67k, printed by evaluate_gpu.py)")
    ap.add_argument("--counts-cache", type=Path, help="with --tokenizer: JSON file caching the counts")
    ap.add_argument("--prefill-rates", default="", help="per-perspective prefill rates, name=tok/s,...: prompt "
                    "tokens per second of prefill wall time (the unshared count, sharing as measured); perspectives "
                    "not named use --prefill-tok-per-s")
    args = ap.parse_args()

    from comptrust import perspectives as registry
    from comptrust.evaluate import load_perspectives
    from comptrust.perspectives.base import EvalOptions

    opts = EvalOptions(data_dir=args.data_dir.resolve(), profile="full", mmlu_dir=args.mmlu_dir.resolve())
    loaded, not_run = load_perspectives(list(registry.REGISTRY), opts)
    counts = token_counts(loaded, args.tokenizer, args.token_budget, args.counts_cache) if args.tokenizer else {}
    rates = parse_rates(args.prefill_rates)
    rows, tot_new, tot_prompt, sampled_new = [], 0, 0, 0
    prefill_s, prefill_by = 0.0, {}
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
        ptok = counts[name]["prompt_tokens"] if name in counts else chars // 4
        rate = rates.get(name, args.prefill_tok_per_s)
        prefill_by[name] = ptok / rate
        prefill_s += ptok / rate
        extra = ((counts[name]["computed_tokens"], f"{1 - counts[name]['computed_tokens'] / max(ptok, 1):.2f}")
                 if name in counts else ())
        rows.append((name, len(ld.items), len(prompts), gens, new, ptok, *extra, f"{rate:,.0f}",
                     f"{ptok / rate / 3600:.3f}"))
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
        tot_prompt += ptok
        sampled_new += sum(pr.params.n * pr.params.max_new_tokens for pr in prompts if pr.params.n > 1)
    tok_col = "prompt tokens" if counts else "prompt tokens (approx)"
    shared_cols = " computed with prefix sharing | share saved |" if counts else ""
    print(f"| perspective | items | prompts | generations | max new tokens | {tok_col} |{shared_cols} prefill tok/s | "
          "prefill h |")
    print("|---|---|---|---|---|---|" + ("---|---|" if counts else "") + "---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    sampled_rate = args.sampled_tok_per_s or args.tok_per_s
    decode_s = (tot_new - sampled_new) / args.tok_per_s + sampled_new / sampled_rate
    total_h = (decode_s + prefill_s) * args.overhead / 3600
    print(f"\ntotal: {tot_new:,} new tokens (upper bound; {sampled_new:,} of them in n > 1 perspectives), "
          f"{tot_prompt:,} prompt tokens; at {args.tok_per_s:,.0f} new tok/s (n = 1), {sampled_rate:,.0f} new tok/s "
          f"(n > 1) and {tot_prompt / prefill_s:,.0f} prompt tok/s"
          f"{' (per perspective)' if rates else ''}: decode {decode_s / 3600:.2f} h + prefill "
          f"{prefill_s / 3600:.2f} h" + (f", x {args.overhead:.3f} evaluate overhead" if args.overhead != 1.0 else "")
          + f" = {total_h:.2f} h")
    if args.floor_arch and counts:  # exact counts: the prefill floor of the tokens prefix sharing leaves to compute
        floor["prefill"] = sum(c["computed_tokens"] for c in counts.values()) * flops / peak
    if args.floor_arch:
        parts = ", ".join(f"{k} {v / 3600:.2f} h" for k, v in floor.items())
        print(f"hardware floor ({args.floor_arch}, {args.peak_tflops:.0f} TFLOP/s, {args.bandwidth_gbs:.0f} GB/s): {parts} "
              f"= {sum(floor.values()) / 3600:.2f} h (every matmul at the matmul rate, K/V read once at the bandwidth; "
              f"weights, activations and attention FLOPs free" + ("; prefill: the tokens computed with prefix sharing"
                                                      if counts else "") + ")")
    if not_run:
        print(f"not run (missing data): {not_run}")


if __name__ == "__main__":
    main()
