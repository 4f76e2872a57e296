"""The embedded SmolLM2 GGUF evaluated two ways: served by llama.cpp (llama-cpp-python's OpenAI-compatible server,
through OpenAIEngine) and in-process with transformers (HFEngine on the dequantized weights).

1. `comptrust.evaluate.evaluate` on the built-in stereotype mini suite (the protocol's sampling: temperature 1,
   150 new tokens, n=1 in the mini profile), each path on a fresh store: score, refusal rate, wall time, tokens,
   fraction of identical outputs and of identical parsed labels.
2. The same prompts decoded greedily (temperature 0, --greedy-tokens new tokens) by both engines: the fraction
   of identical outputs isolates the numerical differences (kernels, weight formats) from the samplers'.

    python bench/served_vs_hf.py [--limit N] [--greedy-tokens 64] [--out bench/results/served_vs_hf.md]

Needs the serve extra (llama-cpp-python[server]).
"""

from __future__ import annotations

import os

import comptrust  # noqa: E402,F401 -- before torch: sets OpenMP's waiting (see comptrust/__init__.py)

import argparse
import math
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from comptrust.data_sources import mini_dir  # noqa: E402
from comptrust.engine.hf import HFEngine  # noqa: E402
from comptrust.evaluate import evaluate  # noqa: E402
from comptrust.models import resolve  # noqa: E402
from comptrust.models.resolve import embedded_gguf  # noqa: E402
from comptrust.perspectives.base import EvalOptions  # noqa: E402
from comptrust.perspectives.stereotype import Stereotype  # noqa: E402
from comptrust.engine.llamacpp import gguf_engine  # noqa: E402
from comptrust.types import GenParams  # noqa: E402


def common_prefix_words(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        n += 1
    return n


def run_eval(engine, info, opts, out_dir):
    t0 = time.time()
    res = evaluate(engine, info, ["stereotype"], opts, out_dir, progress=False)
    wall = time.time() - t0
    sc = res.scores["stereotype"]
    by_id = {r.item.id: r for r in res.records["stereotype"]}
    return {"score": sc["score"], "refusal": sc["refusal_rate"], "wall": wall, "tokens": res.stats["new_tokens"],
            "gen_seconds": res.stats["seconds"], "records": by_id, "fingerprint": engine.fingerprint}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="items per stereotype sub-scenario (default: all)")
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--no-fp32", dest="fp32", action="store_false",
                    help="skip the greedy run of transformers in float32")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "served_vs_hf.md"))
    args = ap.parse_args()

    opts = EvalOptions(data_dir=mini_dir(), limit=args.limit)
    gguf = embedded_gguf()
    resolved = resolve(None)
    tmp = Path(tempfile.mkdtemp(prefix="served-vs-hf-"))

    hf = HFEngine(resolved)
    info = resolved.describe() | {"engine": "hf", "device": hf.device, "dtype": hf.dtype}
    print("HF engine: evaluating ...", file=sys.stderr, flush=True)
    r_hf = run_eval(hf, info, opts, tmp / "hf")
    r_hf["load"] = hf.load_seconds

    items = Stereotype().load(opts).items
    greedy = GenParams(max_new_tokens=args.greedy_tokens)
    prompts = [replace(it.prompt, params=greedy) for it in items]
    t0 = time.time()
    g_hf = hf.generate(prompts)
    g_hf_s = time.time() - t0
    hf32 = None
    if args.fp32 and hf.dtype != "float32":
        hf32 = HFEngine(resolved, dtype="float32")
        t0 = time.time()
        g_32 = hf32.generate(prompts)
        g_32_s = time.time() - t0

    print("llama.cpp server: evaluating ...", file=sys.stderr, flush=True)
    t_start = time.time()
    with gguf_engine(gguf) as eng:
        start_s = time.time() - t_start
        r_sv = run_eval(eng, eng.describe(), opts, tmp / "served")
        r_sv["load"] = start_s
        t0 = time.time()
        g_sv = eng.generate(prompts)
        g_sv_s = time.time() - t0
        extra = eng.extra_body
        import llama_cpp

        lcp_version = llama_cpp.__version__

    ids = sorted(r_hf["records"])
    same_out = sum(r_hf["records"][i].outputs == r_sv["records"][i].outputs for i in ids)
    same_label = sum(
        [(p.label, p.refused) for p in r_hf["records"][i].parsed] == [(p.label, p.refused) for p in r_sv["records"][i].parsed]
        for i in ids
    )
    def same(xs, ys):
        return sum(a.texts == b.texts for a, b in zip(xs, ys))

    g_same = same(g_hf, g_sv)
    prefix = [common_prefix_words(a.texts[0], b.texts[0]) for a, b in zip(g_hf, g_sv)]
    diverged = [p for p, a, b in zip(prefix, g_hf, g_sv) if a.texts != b.texts]
    g_tok_hf = sum(sum(g.n_tokens) for g in g_hf)
    g_tok_sv = sum(sum(g.n_tokens) for g in g_sv)

    def f(x, nd=1):
        return "n/a" if x is None else f"{x:.{nd}f}"

    n = len(ids)
    lines = [
        "# Served (llama.cpp) vs in-process (transformers): embedded SmolLM2-135M-Instruct Q4_1",
        "",
        f"Generated by `python bench/served_vs_hf.py{f' --limit {args.limit}' if args.limit else ''}"
        f"{f' --greedy-tokens {args.greedy_tokens}' if args.greedy_tokens != 64 else ''}` on "
        f"{time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPU cores shared with other jobs (wall times are indicative), "
        f"Python {platform.python_version()}, llama-cpp-python {lcp_version} (built with GGML_NATIVE=OFF: AVX2/FMA/F16C), "
        f"HF engine {hf.dtype} on {hf.device}.",
        "",
        f"## Stereotype, mini suite ({n} prompts, protocol sampling: temperature 1, 150 new tokens, n=1)",
        "",
        "| path | score | refusal rate | agree / disagree / no response | wall s (eval) | start/load s | new tokens | tokens/s |",
        "| --- | ---: | ---: | :---: | ---: | ---: | ---: | ---: |",
    ]
    rates = []
    for name, r in ((f"transformers {hf.dtype} (HFEngine, dequantized weights)", r_hf), ("llama.cpp server (OpenAIEngine)", r_sv)):
        tps = r["tokens"] / r["gen_seconds"] if r["gen_seconds"] else None
        labels = Counter(p.label for rec in r["records"].values() for p in rec.parsed)
        k = sum(labels.values())
        rates.append((labels["agree"] / k if k else 0.0, k))
        lines.append(f"| {name} | {f(r['score'])} | {f(r['refusal'])} | {labels['agree']} / {labels['disagree']} / "
                     f"{labels['no_response']} | {f(r['wall'])} | {f(r['load'])} | {r['tokens']} | {f(tps, 0)} |")
    se = 100 * math.sqrt(sum(p * (1 - p) / max(k, 1) for p, k in rates))
    lines += [
        "",
        f"Identical outputs: {same_out}/{n} ({100 * same_out / n:.0f}%); identical parsed labels (agree/disagree/"
        f"no response): {same_label}/{n} ({100 * same_label / n:.0f}%). Binomial standard error of the difference "
        f"between the two agree rates: {se:.1f} points (one sample per prompt).",
        "",
        f"## Same prompts, greedy ({args.greedy_tokens} new tokens)",
        "",
        "| path | seconds | new tokens |",
        "| --- | ---: | ---: |",
        f"| transformers {hf.dtype} | {g_hf_s:.1f} | {g_tok_hf} |",
        f"| llama.cpp server | {g_sv_s:.1f} | {g_tok_sv} |",
    ]
    if hf32 is not None:
        lines.insert(-1, f"| transformers float32 | {g_32_s:.1f} | {sum(sum(g.n_tokens) for g in g_32)} |")
    lines += [
        "",
        f"Identical greedy outputs, transformers {hf.dtype} vs llama.cpp: {g_same}/{n} ({100 * g_same / n:.0f}%). "
        f"Where they differ, the outputs agree on their first {f(sum(diverged) / len(diverged) if diverged else None)} "
        f"words on average (median {sorted(diverged)[len(diverged) // 2] if diverged else 'n/a'}).",
    ]
    if hf32 is not None:
        s32, s32b = same(g_32, g_sv), same(g_32, g_hf)
        lines += [
            "",
            f"transformers float32 vs llama.cpp: {s32}/{n} identical ({100 * s32 / n:.0f}%); "
            f"transformers float32 vs {hf.dtype}: {s32b}/{n} ({100 * s32b / n:.0f}%).",
        ]
    lines += [
        "",
        f"Served sampling overrides sent with every request: `{extra}` (llama.cpp's defaults are repeat_penalty 1.1, "
        "min_p 0.05, top_k 40).",
        "",
        "Fingerprints: HF `" + r_hf["fingerprint"] + "`; served `" + r_sv["fingerprint"][:80] + "...`",
        "",
        "## Why the two paths differ",
        "",
        "Same weights (one GGUF file: its sha256 heads both fingerprints), same chat template (the GGUF's "
        "tokenizer.chat_template, applied by transformers here and by llama-cpp-python on the server), same prompt "
        "tokens (no BOS: the GGUF says add_bos_token=false). What differs:",
        "",
        "* Arithmetic. llama.cpp multiplies by the Q4_1 blocks directly: it quantizes each activation row to 8-bit "
        "blocks (Q8_1) and takes integer dot products, accumulating in f32. transformers runs the weights "
        "dequantized once into a dense checkpoint, in " + hf.dtype + " (weights rounded to that format, activations "
        "in it too). Both approximate the same model; on a 135M-parameter model the logits of the top candidates "
        "are often close, so a small numerical difference flips one greedy choice and the continuations diverge "
        "from there (the greedy table). float32 transformers shows how much of that is bf16 rounding.",
        "* Sampling. At temperature 1 each path draws from (almost) the same distribution with a different random "
        "stream (llama.cpp's seeded sampler chain vs comptrust's counter-based Gumbel-max): identical outputs are "
        "not expected, and the two scores are two draws of the same quantity; compare their difference with the "
        "standard error above. The served requests carry repeat_penalty 1, min_p 0, top_k 50 so that llama.cpp "
        "samples like transformers; with llama.cpp's defaults the served model would be evaluated with a "
        "repetition penalty and a min-p cut the in-process evaluation does not have.",
        "* Speed. The llama-cpp-python server decodes one request at a time (one model behind a lock, no "
        "batching, Python-side sampling per token), while HFEngine decodes the 48 prompts as one batch; wall "
        "times here are also measured on 2 cores shared with other jobs.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {out}; runs under {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
