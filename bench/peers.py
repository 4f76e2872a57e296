"""comptrust's engine against its CPU peers on the same items: the table of issue 20, re-measurable.

Same prompts for every row (DecodingTrust stereotype prompts, chat template, greedy, --max-new-tokens new tokens,
the embedded SmolLM2-135M-Instruct), each model loaded and warmed first, then --passes timed passes (the best one
is reported; the load average is printed beside it):

  comptrust            HFEngine (bf16 where the CPU has it, its token-budget batches, shared-prefix prefill)
  hf-bf16 / hf-fp32    transformers `generate()`, batch --hf-batch with left padding (what lm-eval's hf backend does)
  llamacpp-single      llama-cpp-python `create_completion`, one prompt at a time, on the embedded Q4_1 GGUF
  llamacpp-batched     llama-cpp-python's low-level API: --llama-seqs sequences decoded together per step, greedy
                       token choice in Python (a lower bound for llama.cpp's own batched serving)

The llama.cpp rows run only where llama-cpp-python is installed (the test set-up installs it). Last, the machine's
compute limit: a large matmul in comptrust's dtype on all threads (GFLOP/s), and the fraction of it that comptrust's
row reaches, counting 2 x parameters FLOPs per prompt and per generated token (attention ignored: a lower bound of
the work). On a CPU without native bf16 comptrust runs in float32 and the hf-bf16 row is emulated bf16 (slow).

    python bench/peers.py [--prompts 64] [--max-new-tokens 64] [--passes 2] [--only comptrust,hf-bf16]
"""

from __future__ import annotations


import comptrust  # noqa: E402,F401 -- before torch: sets OpenMP's waiting (see comptrust/__init__.py)

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from comptrust.cpu import cpu_threads  # noqa: E402
from comptrust.data_sources import mini_dir  # noqa: E402
from comptrust.engine.hf import HFEngine  # noqa: E402
from comptrust.models import resolve  # noqa: E402
from comptrust.models.resolve import embedded_gguf  # noqa: E402
from comptrust.perspectives.base import EvalOptions  # noqa: E402
from comptrust.perspectives.stereotype import Stereotype  # noqa: E402
from comptrust.engine.llamacpp import llama_cpp_available  # noqa: E402
from comptrust.types import GenParams, Prompt  # noqa: E402

SHARED_DT = Path(__file__).resolve().parents[2] / "shared" / "data" / "decodingtrust"
ROWS = ("comptrust", "hf-bf16", "hf-fp32", "llamacpp-single", "llamacpp-batched")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "?"


def prompts_for(k: int, max_new: int) -> list[Prompt]:
    root = SHARED_DT if SHARED_DT.is_dir() else mini_dir()
    items = Stereotype().load(EvalOptions(data_dir=root, limit=max(1, (k + 2) // 3))).items[:k]
    return [Prompt(messages=it.prompt.messages, params=GenParams(max_new_tokens=max_new)) for it in items]


def timed(fn, passes: int) -> tuple[float, int, str]:
    """(best wall s, new tokens, load during the best pass) over `passes` runs of fn() -> new tokens."""
    best, tokens, at = float("inf"), 0, "?"
    for _ in range(passes):
        t0 = time.time()
        n = fn()
        dt = time.time() - t0
        if dt < best:
            best, tokens, at = dt, n, load()
    return best, tokens, at


def until_eos(ids: list[int], eos: set[int]) -> int:
    for k, t in enumerate(ids):
        if t in eos:
            return k
    return len(ids)


def hf_generate_rows(engine: HFEngine, texts: list[str], max_new: int, batch: int) -> int:
    model, tok = engine.model, engine.tok
    tok.padding_side = "left"
    eos = set(engine.eos_ids)
    n = 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                                 eos_token_id=engine.eos_ids)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            n += until_eos(row, eos)
    return n


def llama_single(llm, texts: list[str], max_new: int) -> int:
    n = 0
    for t in texts:
        r = llm.create_completion(prompt=t, max_tokens=max_new, temperature=0.0, top_k=1, repeat_penalty=1.0)
        n += r["usage"]["completion_tokens"]
    return n


def llama_batched(llm, texts: list[str], max_new: int, seqs: int, threads: int) -> int:
    """`seqs` prompts at a time in one llama.cpp context: one llama_decode per step for all live sequences."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    vocab = lc.llama_model_get_vocab(llm._model.model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    toks = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    width = max(len(t) for t in toks) + max_new + 8
    cp = lc.llama_context_default_params()
    cp.n_ctx = -(-width // 256) * 256 * seqs  # llama.cpp rounds each sequence's share down to a multiple of 256
    cp.n_batch = cp.n_ctx
    cp.n_ubatch = 512
    cp.n_seq_max = seqs
    cp.n_threads = cp.n_threads_batch = threads
    ctx = lc.llama_init_from_model(llm._model.model, cp)
    batch = lc.llama_batch_init(cp.n_ctx, 0, seqs)
    produced = 0
    try:
        for g in range(0, len(toks), seqs):
            group = toks[g : g + seqs]
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            batch.n_tokens = 0
            last: dict[int, int] = {}

            def add(tok_id: int, pos: int, seq: int, want: bool, last: dict[int, int] = last) -> None:
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok_id, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, want
                batch.n_tokens += 1
                if want:
                    last[seq] = i

            for s, ids in enumerate(group):
                for p, t in enumerate(ids):
                    add(t, p, s, p == len(ids) - 1)
            pos = {s: len(ids) for s, ids in enumerate(group)}
            live, made = set(range(len(group))), {s: 0 for s in range(len(group))}
            while live:
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                picks = {}
                for s in sorted(live):
                    ptr = lc.llama_get_logits_ith(ctx, last[s])
                    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,))
                    picks[s] = int(logits.argmax())
                batch.n_tokens = 0
                last.clear()
                for s, t in picks.items():
                    if lc.llama_vocab_is_eog(vocab, t):
                        live.discard(s)
                        continue
                    made[s] += 1
                    if made[s] >= max_new:
                        live.discard(s)
                        continue
                    add(t, pos[s], s, True)
                    pos[s] += 1
            produced += sum(made.values())
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
    return produced


def matmul_limit(threads: int, dtype: str, n: int = 2048, reps: int = 6) -> float:
    """GFLOP/s of an n x n x n matmul in the engine's dtype on `threads` threads (best of reps): the compute limit
    used here (the dtype comptrust runs in: bf16 where the CPU has native bf16, else float32)."""
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--llama-seqs", type=int, default=8)
    ap.add_argument("--only", help=f"comma-separated rows of {', '.join(ROWS)}")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    rows = a.only.split(",") if a.only else list(ROWS)
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"error: --only {','.join(bad)}: choose from {', '.join(ROWS)}")
    threads = cpu_threads()
    prompts = prompts_for(a.prompts, a.max_new_tokens)
    resolved = resolve(None)
    eng = HFEngine(resolved)
    texts = [eng.render(p) for p in prompts]
    prompt_tokens = sum(len(eng.tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    n_params = sum(p.numel() for p in eng.model.parameters())
    eng.generate(prompts[:2])  # warm: weights loaded, kernels chosen
    results: dict[str, dict] = {}

    def record(name: str, secs: float, tokens: int, at: str, note: str = "") -> None:
        results[name] = {"seconds": round(secs, 2), "new_tokens": tokens, "load": at, "note": note}
        print(f"{name:<18} {secs:8.1f} s  {tokens:6d} new tokens  (load {at}) {note}", flush=True)

    print(f"{len(prompts)} prompts ({prompt_tokens} prompt tokens), greedy, {a.max_new_tokens} new tokens, "
          f"{threads} threads, load {load()}", flush=True)
    if "comptrust" in rows:
        record("comptrust", *timed(lambda: sum(sum(g.n_tokens) for g in eng.generate(prompts)), a.passes),
               f"({eng.dtype}, its batching)")
    for name, dtype in (("hf-bf16", "bfloat16"), ("hf-fp32", "float32")):
        if name in rows:
            e = eng if dtype == eng.dtype else HFEngine(resolved, dtype=dtype)
            hf_generate_rows(e, texts[:2], 4, a.hf_batch)
            record(name, *timed(lambda e=e: hf_generate_rows(e, texts, a.max_new_tokens, a.hf_batch), a.passes),
                   f"(generate(), batch {a.hf_batch}, left padding)")
    want_llama = [r for r in rows if r.startswith("llamacpp")]
    why = llama_cpp_available() if want_llama else None
    if want_llama and why:
        print(f"llama.cpp rows skipped: {why}")
    elif want_llama:
        from llama_cpp import Llama

        llm = Llama(str(embedded_gguf()), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
        if "llamacpp-single" in rows:
            llama_single(llm, texts[:1], 4)
            record("llamacpp-single", *timed(lambda: llama_single(llm, texts, a.max_new_tokens), a.passes),
                   "(create_completion, one prompt at a time)")
        if "llamacpp-batched" in rows:
            llama_batched(llm, texts[:2], 4, a.llama_seqs, threads)
            record("llamacpp-batched",
                   *timed(lambda: llama_batched(llm, texts, a.max_new_tokens, a.llama_seqs, threads), a.passes),
                   f"({a.llama_seqs} sequences per step, greedy in Python)")
    gflops = matmul_limit(threads, eng.dtype)
    base = results.get("comptrust")
    print("\n| configuration | wall s | new tokens | vs comptrust |\n|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else "n/a"
        print(f"| {name} {r['note']} | {r['seconds']:.1f} | {r['new_tokens']} | {ratio} |")
    if base:
        work = 2 * n_params * (prompt_tokens + base["new_tokens"]) / 1e9
        print(f"\ncompute limit: {gflops:.0f} GFLOP/s ({eng.dtype} 2048^3 matmul, {threads} threads, load {load()}); "
              f"comptrust's work >= {work:.0f} GFLOP (2 x {n_params / 1e6:.0f}M params x "
              f"{prompt_tokens + base['new_tokens']} tokens) -> {work / gflops:.1f} s at the limit, "
              f"{100 * work / gflops / base['seconds']:.0f}% of it reached")
    if a.json:
        a.json.write_text(json.dumps({"rows": results, "gflops_limit": gflops, "prompt_tokens": prompt_tokens,
                                      "params": n_params, "threads": threads}, indent=2))


if __name__ == "__main__":
    main()
