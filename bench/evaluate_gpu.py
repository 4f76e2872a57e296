"""The real `comptrust evaluate` path on a GPU: engine alone vs evaluate end to end (store, CachedEngine, scoring),
for a DecodingTrust mix and a toxicity-like n = 25 workload, on random-weight Llama-2 architectures.

    python bench/evaluate_gpu.py --arch llama2-7b-random,llama2-13b-random --tokenizer .carry/tp/tok \
        --data-dir .carry/tp/decodingtrust --mmlu-dir .carry/tp/mmlu --tox-limit 12 --out-dir $OUT

Workloads (items built by comptrust's own loaders from the data folder):
  tox25  toxicity at the full profile: n = 25 samples per prompt, 150 new tokens, temperature 1 (--tox-limit
         prompts per prompt set; x 6 sets/templates);
  mix    stereotype + AdvGLUE + MMLU at the lite profile (n = 1; 150 / 16 / 16 new tokens): bench/throughput.py's mix.
--prefix-sharing off,on runs the engine and evaluate paths with shared-prefix prefill off and on; --cprofile reruns
each evaluate on its own results folder (all cache hits) under cProfile; evaluate's phases (cached generate, score(),
bootstrap CIs) are timed from outside and tabled. --compile off,on,on runs the engine under each torch.compile
setting of the decode step in turn (the first 'on' pays the compile); --compare-outputs compares the runs' texts.
Paths: "engine" = HFEngine.generate on the workload's prompts (shared-prefix decoding on, the default; for tox25 also
"engine, unshared" with one K/V copy per row), "evaluate" = comptrust.evaluate.evaluate() into a fresh results
folder, i.e. what `comptrust evaluate` runs after loading the model (random weights are built in memory, so the CLI's
model loading is the one part left out). Random weights never emit EOS on purpose: EOS is ignored and every output
runs to its max, as the projection assumes.

Roofline of a run (bench/throughput.py's roofline_seconds): prefill FLOPs at the measured matmul rate, plus per decode
step the larger of (weights + the visible K/V slots, each prompt's shared prefix counted once per step) / measured
bandwidth and the rows' FLOPs / measured matmul rate. Writes <out-dir>/evaluate_gpu.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402

from comptrust.engine.hf import HFEngine  # noqa: E402
from comptrust.evaluate import evaluate, load_perspectives  # noqa: E402
from comptrust.perspectives.base import EvalOptions  # noqa: E402
from comptrust.toxicity_scorers.pool import score_workers  # noqa: E402

WORKLOADS = {
    "tox25": (["toxicity"], "full"),
    "mix": (["stereotype", "advglue", "mmlu"], "lite"),
    "mmlu": (["mmlu"], "full"),  # prefill-heavy: 5-shot prompts, 16 new tokens (--mmlu-limit questions per subject)
}


def options(work: str, args) -> EvalOptions:
    names, profile = WORKLOADS[work]
    limit = {"tox25": args.tox_limit, "mmlu": args.mmlu_limit}.get(work)
    return EvalOptions(data_dir=args.data_dir.resolve(), profile=profile, limit=limit, mmlu_dir=args.mmlu_dir.resolve())


def prompts_of(work: str, args) -> list:
    loaded, not_run = load_perspectives(WORKLOADS[work][0], options(work, args))
    if not_run:
        raise SystemExit(f"{work}: not run: {not_run}")
    return [it.prompt for _, (_, ld, _) in loaded.items() for it in ld.items]


def row(work, arch, path, n_prompts, secs, c, ps, lim, extra=None) -> dict:
    new = c.get("new_tokens", 0)
    roof = tp.roofline_seconds(ps, lim, c.get("prefill_tokens", 0), c.get("decode_steps", 0),
                               c.get("decode_row_steps", 0), c.get("decode_kv_slots", 0))
    dec_roof = tp.roofline_seconds(ps, lim, 0, c.get("decode_steps", 0), c.get("decode_row_steps", 0),
                                   c.get("decode_kv_slots", 0))
    args_ = (ps, lim, c.get("prefill_tokens", 0), c.get("decode_steps", 0), c.get("decode_row_steps", 0),
             c.get("decode_kv_slots", 0))
    roof_sum = tp.roofline_sum_seconds(*args_)
    dec_sum = tp.roofline_sum_seconds(ps, lim, 0, *args_[3:])
    steps = c.get("decode_steps", 0)
    r = {
        "workload": work, "model": arch, "path": path, "prompts": n_prompts, "seconds": round(secs, 2),
        "new_tokens": int(new), "tok_per_s": new / secs if secs else 0.0,
        "prefill_tokens": int(c.get("prefill_tokens", 0)),
        "prefill_seconds": round(c.get("prefill_seconds", 0.0), 2), "decode_seconds": round(c.get("decode_seconds", 0.0), 2),
        "decode_tok_per_s": new / c["decode_seconds"] if c.get("decode_seconds") else None,
        "prefill_tok_per_s": c["prefill_tokens"] / c["prefill_seconds"] if c.get("prefill_seconds") else None,
        "mean_decode_rows": round(c.get("decode_row_steps", 0) / steps, 1) if steps else 0,
        "batches": int(c.get("batches", 0)),
        "kv_slots_read": int(c.get("decode_kv_slots", 0)), "kv_slots_unshared": int(c.get("decode_kv_slots_unshared", 0)),
        "roofline_seconds": round(roof, 3), "roofline_fraction": roof / secs if secs else 0.0,
        "decode_roofline_fraction": dec_roof / c["decode_seconds"] if c.get("decode_seconds") else None,
        "roofline_sum_seconds": round(roof_sum, 3), "roofline_sum_fraction": roof_sum / secs if secs else 0.0,
        "decode_roofline_sum_fraction": dec_sum / c["decode_seconds"] if c.get("decode_seconds") else None,
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else 0,
        **(extra or {}),
    }
    print(f"  {work} | {arch} | {path}: {n_prompts} prompts, {secs:.1f} s, {r['tok_per_s']:.0f} tok/s "
          f"(decode {r['decode_tok_per_s'] or 0:.0f}, prefill {r['prefill_tok_per_s'] or 0:.0f} tok/s), "
          f"{100 * r['roofline_fraction']:.1f}% of roofline (decode {100 * (r['decode_roofline_fraction'] or 0):.1f}%; "
          f"phases added: {100 * r['roofline_sum_fraction']:.1f}%, decode {100 * (r['decode_roofline_sum_fraction'] or 0):.1f}%), "
          f"mean rows {r['mean_decode_rows']}, {r['batches']} batches, peak GPU {r['peak_gpu_mib']} MiB", flush=True)
    return r


def profile_batch(eng, prompts, path: Path) -> None:
    """One batch's worth of tox25 prompts, CUDA graphs off, under torch.profiler: CUDA time per kernel."""
    from torch.profiler import ProfilerActivity, profile

    budget, rows = eng._limits(prompts[0].params)
    k = max(1, min(len(prompts), budget // (len(eng.encode(prompts[0])) + 25 * prompts[0].params.max_new_tokens)))
    graphs = eng.cuda_graphs
    eng.cuda_graphs = False
    eng.counters.clear()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.generate(prompts[:k])
        torch.cuda.synchronize()
    eng.cuda_graphs = graphs
    steps = max(eng.counters.get("decode_steps", 1), 1)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    head = (f"{k} prompts x n=25, {steps:.0f} decode steps, {eng.counters.get('decode_seconds', 0):.2f} s decode "
            f"(no CUDA graphs), {eng.counters.get('prefill_seconds', 0):.2f} s prefill")
    path.write_text(head + "\n" + table + "\n")
    print(head)
    print("\n".join(table.splitlines()[:22]), flush=True)


PREFILL_PERSPECTIVES = ("toxicity", "stereotype", "advglue", "ood", "adv_demo", "privacy", "ethics", "fairness", "mmlu")


def prefill_prompts(name: str, limit: int | None, args) -> list:
    """One perspective's full-profile prompts, `limit` items per sub-scenario (None: all)."""
    opts = EvalOptions(data_dir=args.data_dir.resolve(), profile="full", limit=limit, mmlu_dir=args.mmlu_dir.resolve())
    loaded, not_run = load_perspectives([name], opts)
    if not_run:
        raise SystemExit(f"{name}: not run: {not_run}")
    return [it.prompt for _, (_, ld, _) in loaded.items() for it in ld.items]


def prefill_only(eng, prompts) -> dict:
    """The engine's prefill alone, batch by batch as HFEngine.generate plans it (same parameter groups, token
    budget, prefix clusters, the prefill variant its decode loop would get); the DecodeState is dropped. Returns
    the seconds, the prompt tokens, the tokens actually computed and the forwards."""
    from collections import defaultdict

    from comptrust.engine.planning import plan_batches
    from comptrust.engine.prefill import prefill

    eng.model  # noqa: B018
    if eng.prefix_sharing is None:
        eng.prefix_sharing = True
    enc = [eng.encode(p) for p in prompts]
    groups: dict = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p.params].append(i)
    before = dict(eng.counters)
    secs, batches = 0.0, 0
    for params, idx in groups.items():
        budget, rows = eng._limits(params)
        share = eng.prefix_sharing and eng._plain
        shared = eng._shared_decode_for(params)
        plan = plan_batches([enc[i] for i in idx], params.n, params.max_new_tokens, budget, rows, share,
                            shared_decode=shared)
        for b in plan:
            seqs = [enc[idx[j]] for j in b]
            eng._sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                state = prefill(eng, seqs, params, static=True, shared=shared)
            eng._sync()
            secs += time.perf_counter() - t0
            batches += 1
            del state
    d = {k: eng.counters.get(k, 0) - before.get(k, 0) for k in ("prefill_tokens", "prefill_slots", "prefill_forwards")}
    return {"seconds": secs, "prompt_tokens": sum(len(e) for e in enc), "computed_tokens": int(d["prefill_tokens"]),
            "padded_slots": int(d["prefill_slots"]), "forwards": int(d["prefill_forwards"]), "batches": batches,
            "prompts": len(prompts)}


PREFILL_KNOBS = ("CUDA_PREFILL_SLOTS", "CUDA_PREFILL_NEW", "CUDA_PREFILL_WASTE")


def set_prefill_knobs(cfg: dict) -> None:
    """slots=N (cached slots per forward), new=N|None, waste=F: engine/prefill.py's CUDA_PREFILL_*."""
    import comptrust.engine.prefill as pf

    for k, v in cfg.items():
        setattr(pf, {"slots": "CUDA_PREFILL_SLOTS", "new": "CUDA_PREFILL_NEW", "waste": "CUDA_PREFILL_WASTE"}.get(k, k), v)


def check_greedy(eng, args) -> dict:
    """Greedy outputs of the few-shot perspectives (prefix sharing on): the default CUDA prefill forwards twice
    (run-to-run control) and the larger forwards of --check-greedy-config once; how many outputs are identical."""
    import comptrust.engine.prefill as pf

    names = ("mmlu", "ood", "adv_demo", "advglue", "ethics")
    prompts = [p for nm in names for p in prefill_prompts(nm, args.check_greedy, args) if p.params.greedy]
    saved = {k: getattr(pf, k) for k in PREFILL_KNOBS}
    cfg = {}
    for kv in filter(None, args.check_greedy_config.split(",")):
        k, _, v = kv.partition("=")
        cfg[k] = None if v == "none" else (float(v) if "." in v else int(v))
    eng.prefix_sharing = True
    outs = {}
    for label, c in (("default", {}), ("default again", {}), (args.check_greedy_config, cfg)):
        for k, v in saved.items():
            setattr(pf, k, v)
        set_prefill_knobs(c)
        outs[label] = eng.generate(prompts)
    for k, v in saved.items():
        setattr(pf, k, v)
    eng.prefix_sharing = None
    same = {lb: sum(a.texts == b.texts for a, b in zip(outs["default"], o)) for lb, o in outs.items() if lb != "default"}
    r = {"prompts": len(prompts), "identical_to_default": same, "perspectives": list(names), "limit": args.check_greedy}
    print(f"  greedy check: outputs identical to the default CUDA prefill forwards' of {len(prompts)}: {same}",
          flush=True)
    return r


def prefill_bench(eng, ps, lim, args, arch: str) -> list[dict]:
    """--prefill-only: each perspective's prefill with prefix sharing off and on and under each --prefill-config
    (CUDA forward sizes, engine/prefill.py's CUDA_PREFILL_*), at the measured matmul rate's share."""
    import comptrust.engine.prefill as pf

    limits = {k: (int(v) if v not in ("all", "") else None) for k, _, v in
              (x.partition("=") for x in args.prefill_limits.split(",") if x)}
    names = [x.strip() for x in args.prefill_only.split(",") if x.strip()]
    configs = [("default", {})]
    for spec in filter(None, (x.strip() for x in args.prefill_configs.split(";"))):
        cfg = {}
        for kv in spec.split(","):
            k, _, v = kv.partition("=")
            cfg[k.strip()] = None if v.strip() == "none" else (float(v) if "." in v else int(v))
        configs.append((spec, cfg))
    sharing = [x.strip() == "on" for x in args.prefill_sharing.split(",") if x.strip()]
    defaults = {k: getattr(pf, k) for k in PREFILL_KNOBS}
    # prefill keeps the last token's logits only: the output head's FLOPs are left out per token
    flops_tok = ps["flops_per_token"] - 2 * eng.model.get_output_embeddings().weight.numel()
    out = []
    for name in names:
        prompts = prefill_prompts(name, limits.get(name), args)
        for label, cfg in configs:
            for k, v in defaults.items():
                setattr(pf, k, v)
            set_prefill_knobs(cfg)
            for share in (sharing if label == "default" else sharing[-1:]):  # extra settings: the last only
                eng.prefix_sharing = share
                try:
                    r = prefill_only(eng, prompts)
                except Exception as e:
                    print(f"  prefill {name} {label} sharing {share}: failed: {type(e).__name__}: {str(e)[:200]}",
                          flush=True)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                cuda = torch.cuda.is_available()
                r.update(perspective=name, model=arch, config=label, prefix_sharing=share, limit=limits.get(name),
                         peak_gpu_mib=round(torch.cuda.max_memory_allocated() / 2**20) if cuda else 0)
                r["prompt_tok_per_s"] = r["prompt_tokens"] / r["seconds"]
                r["computed_tok_per_s"] = r["computed_tokens"] / r["seconds"]
                r["saved"] = 1 - r["computed_tokens"] / max(r["prompt_tokens"], 1)
                r["pad_share"] = 1 - r["computed_tokens"] / max(r["padded_slots"], 1)
                # matmul share: computed (incl. padding) slots x matmul FLOPs per token at the measured rate
                r["matmul_fraction"] = r["padded_slots"] * flops_tok / lim["peak_flops_measured"] / r["seconds"]
                out.append(r)
                (args.out_dir / f"prefill_partial{args.tag}.json").write_text(json.dumps(out, indent=1))
                print(f"  prefill | {name} | {label} | sharing {'on' if share else 'off'}: {r['prompts']} prompts, "
                      f"{r['prompt_tokens']} tok ({r['saved']:.2f} saved, pad {r['pad_share']:.2f}), "
                      f"{r['seconds']:.2f} s, {r['prompt_tok_per_s']:.0f} prompt tok/s, {r['computed_tok_per_s']:.0f} "
                      f"computed tok/s, {r['forwards']} forwards / {r['batches']} batches, matmul "
                      f"{100 * r['matmul_fraction']:.1f}% of measured, peak {r['peak_gpu_mib']} MiB", flush=True)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
    for k, v in defaults.items():
        setattr(pf, k, v)
    eng.prefix_sharing = None
    return out


def prefill_profile(eng, name: str, limit: int, args, path: Path) -> None:
    """CUDA time per kernel of one perspective's prefill (prefix sharing as set), under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    prompts = prefill_prompts(name, limit, args)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        r = prefill_only(eng, prompts)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    head = f"prefill of {name} (limit {limit}, prefix sharing {eng.prefix_sharing}): {r}"
    path.write_text(head + "\n" + table + "\n")
    print(head)
    print("\n".join(table.splitlines()[:36]), flush=True)


def set_fused(model, state: str) -> None:
    """Fused elementwise decode kernels on or off for the next runs (the engine installs them at its next decode)."""
    from comptrust.engine import triton_fused

    os.environ["COMPTRUST_FUSED"] = "1" if state == "on" else "0"
    triton_fused.uninstall(model)


def set_compile(eng, mode: str) -> None:
    """HFEngine.compile for the next runs; a compiled decode forward, once built, is kept for later 'on' runs
    (so only the first pays the compile)."""
    saved = getattr(eng, "_bench_compiled", None)
    if eng._decode_fwd is not None and eng._decode_fwd is not getattr(eng, "_model", None):
        eng._bench_compiled = saved = eng._decode_fwd
    eng.compile = mode
    eng._decode_fwd = saved if mode == "on" and saved is not None else None


def compare_texts(eng, a: list, b: list) -> dict:
    """Two runs' outputs (per prompt, its n texts): samples with identical text, and per sample the share of
    tokens (the texts re-tokenized) that agree from the start, over the shorter; mean and the first-token share."""
    same = total = first = 0
    shares = []
    for ta, tb in zip(a, b):
        for x, y in zip(ta, tb):
            total += 1
            if x == y:
                same += 1
                shares.append(1.0)
                first += 1
                continue
            ia = eng.tok.encode(x, add_special_tokens=False)
            ib = eng.tok.encode(y, add_special_tokens=False)
            k = 0
            while k < min(len(ia), len(ib)) and ia[k] == ib[k]:
                k += 1
            shares.append(k / max(min(len(ia), len(ib)), 1))
            first += k > 0
    return {"samples": total, "identical": same, "mean_prefix_share": round(sum(shares) / max(len(shares), 1), 3),
            "first_token_same": first}


def greedy_compile_check(eng, model, prompts, comp: list, work: str, arch: str) -> dict:
    """The prompts greedy (n = 1, 64 new tokens): eager shared default, eager with the Triton decode attention
    off (SDPA, as the compiled step uses), and compiled; outputs compared pairwise."""
    import dataclasses

    from comptrust.engine import attention

    gp = [dataclasses.replace(p, params=dataclasses.replace(p.params, n=1, temperature=0.0, max_new_tokens=64))
          for p in prompts]
    outs = {}
    for label, cm, attn in (("eager", "off", "auto"), ("eager, SDPA decode attention, fused off", "off", "sdpa"),
                            ("compiled", "on", "auto")):
        if cm == "on" and "on" not in comp:
            continue
        set_compile(eng, cm)
        set_fused(model, "off" if attn == "sdpa" else "on")
        attention.DECODE_ATTN = attn
        eng.counters.clear()
        gens, secs = timed(lambda: eng.generate(gp))
        outs[label] = [g.texts for g in gens]
        print(f"  greedy {label}: {len(gp)} prompts, {secs:.2f} s", flush=True)
    attention.DECODE_ATTN = "auto"
    set_fused(model, "on")
    names = list(outs)
    pairs = {f"{a} | {b}": compare_texts(eng, outs[a], outs[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    print(f"  greedy pairs: {pairs}", flush=True)
    return {"workload": work, "model": arch, "kind": f"greedy, {len(gp)} prompts, 64 new tokens", "pairs": pairs}


PHASES: dict[str, float] = {}  # seconds per part of the evaluate run being measured (see instrument())


def instrument() -> None:
    """Time evaluate's parts from outside: the cached generate calls (engine + store), each perspective's score()
    and its bootstrap CI; evaluate's wall time less these is loading, parsing and writing the outputs."""
    import comptrust.evaluate as ev
    from comptrust import perspectives as registry

    inside: list[str] = []

    def timer(key, fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            inside.append(key)
            try:
                return fn(*a, **k)
            finally:
                inside.pop()
                if not inside:  # score() inside the bootstrap counts as the bootstrap's
                    PHASES[key] = PHASES.get(key, 0.0) + time.perf_counter() - t0
        return wrapped

    class TimedCached(ev.CachedEngine):
        generate = timer("generate (engine + store)", ev.CachedEngine.generate)

    ev.CachedEngine = TimedCached
    ev.bootstrap_ci = timer("bootstrap CIs", ev.bootstrap_ci)
    for name in ("toxicity", "stereotype", "advglue", "mmlu"):
        cls = type(registry.get(name))
        cls.score = timer("score()", cls.score)
        if hasattr(cls, "start_scoring"):
            cls.start_scoring = timer("start_scoring()", cls.start_scoring)


def timed(fn):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama2-7b-random", help="comma list of bench/throughput.py RANDOM_ARCHS")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--mmlu-dir", type=Path, required=True)
    ap.add_argument("--workloads", default="tox25,mix")
    ap.add_argument("--tox-limit", type=int, default=8, help="toxicity prompts per prompt set (x 6 sets/templates)")
    ap.add_argument("--no-unshared", action="store_true", help="skip the engine run with one K/V copy per row")
    ap.add_argument("--mmlu-limit", type=int, default=20, help="mmlu workload: questions per subject (x 57)")
    ap.add_argument("--no-evaluate", action="store_true")
    ap.add_argument("--tox-budget-scales", default="", help="comma list of factors: extra engine runs of tox25 with "
                    "the memory-sized default token budget times each (larger or smaller batches)")
    ap.add_argument("--profile", action="store_true", help="profile one tox25 batch (no CUDA graphs): top kernels")
    ap.add_argument("--prefix-sharing", default="off", help="comma list of off,on: engine and evaluate runs with "
                    "shared-prefix prefill off (the GPU default) and/or on")
    ap.add_argument("--cprofile", action="store_true", help="after each evaluate run, rerun it on its own results "
                    "folder (every generation a cache hit: what evaluate does beyond the engine) under cProfile")
    ap.add_argument("--fused", default="on", help="comma list of off,on: tox25 and mix engine runs with the fused "
                    "elementwise decode kernels (engine/triton_fused.py) off and/or on; evaluate runs use the last")
    ap.add_argument("--prefill-only", default="", help="comma list of perspectives (full profile): time their "
                    "prefill alone, batch by batch as generate plans it, instead of the workloads")
    ap.add_argument("--prefill-limits", default="", help="name=items per sub-scenario,... for --prefill-only")
    ap.add_argument("--prefill-sharing", default="off,on", help="--prefill-only: prefix sharing off and/or on")
    ap.add_argument("--prefill-configs", default="", help="--prefill-only: ';'-separated extra CUDA prefill settings, "
                    "each slots=N,new=N|none,waste=F (engine/prefill.py CUDA_PREFILL_*), beside the defaults")
    ap.add_argument("--check-greedy", type=int, default=0, help="items per sub-scenario: compare greedy outputs "
                    "of mmlu, ood, adv_demo, advglue, ethics: the default CUDA prefill forwards twice, then "
                    "--check-greedy-config")
    ap.add_argument("--check-greedy-config", default="slots=32768,new=16384", help="CUDA prefill setting compared")
    ap.add_argument("--prefill-profile", default="", help="name=limit: profile that perspective's shared prefill")
    ap.add_argument("--compile", default="", help="comma list of off/on, in order (e.g. off,on,on): the engine runs "
                    "once under each torch.compile setting of the static decode step (HFEngine.compile); the first "
                    "'on' run pays the compile, a later one is the steady rate; with --compare-outputs, each run's "
                    "texts are compared with the first run's")
    ap.add_argument("--compare-outputs", action="store_true", help="compare every engine run's texts of a "
                    "workload with its first run's: identical samples and tokens agreeing from the start")
    ap.add_argument("--greedy-compile", type=int, default=0, help="N: after the workload runs, N of its prompts "
                    "greedy (n = 1, 64 new tokens): eager, eager with SDPA decode attention and fused kernels off (the "
                    "compiled step's ops), and compiled where --compile has 'on'; outputs compared pairwise")
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: smoke test of this script")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    instrument()
    lim = tp.measure_limits(args.device)
    print(f"device {lim['device_name']}: {lim['bandwidth_measured'] / 1e9:.0f} GB/s copy, "
          f"{lim['peak_flops_measured'] / 1e12:.0f} TFLOP/s bf16", flush=True)
    works = [w.strip() for w in args.workloads.split(",") if w.strip()]
    sets = {w: prompts_of(w, args) for w in works}
    rows: list[dict] = []
    prefill_rows_: list[dict] = []
    greedy_checks: list[dict] = []
    output_checks: list[dict] = []
    for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
        t0 = time.time()
        rm, model = tp.random_llama7b(args.tokenizer, args.device, tiny=args.tiny, arch=arch)
        tp.sync(args.device)
        ps = tp.param_stats(model)
        print(f"{arch}: built in {time.time() - t0:.1f} s, {ps['params'] / 1e9:.2f}B params", flush=True)
        eng = HFEngine(rm, device=args.device, preloaded=model, ignore_eos=True,
                       loop="static" if args.tiny else "auto")
        t0 = time.perf_counter()  # warm-up: Triton kernels, graph capture, allocator (printed, not counted)
        warm = [p for w in works for p in sets[w][:2]] or prefill_prompts("mmlu", 1, args)[:8]
        eng.generate(warm)
        free = torch.cuda.mem_get_info()[0] / 2**30 if args.device.startswith("cuda") else 0
        print(f"  warm-up {time.perf_counter() - t0:.1f} s; free GPU memory {free:.1f} GiB; (token budget, rows) for "
              f"{works[0] if works else 'mmlu'}: {eng._limits(warm[0].params)}; notes {eng.notes}", flush=True)
        if args.check_greedy:
            greedy_checks.append(check_greedy(eng, args))
        if args.prefill_only:
            set_fused(model, "on")
            prefill_rows_.extend(prefill_bench(eng, ps, lim, args, arch))
            if args.prefill_profile:
                name, _, limit = args.prefill_profile.partition("=")
                eng.prefix_sharing = True
                prefill_profile(eng, name, int(limit), args, args.out_dir / f"profile_prefill_{name}_{arch}.txt")
                eng.prefix_sharing = None
        sharing = [x.strip() == "on" for x in args.prefix_sharing.split(",") if x.strip()]
        for w in works:
            prompts = sets[w]
            variants = [("engine" + ("" if len(sharing) == 1 else ", prefix sharing off"), None, None)]
            if w == "mmlu" or sharing == [True, False] or sharing == [False, True]:
                # shared-prefix prefill (a prefix common to several prompts computed once per batch) off and on
                variants = [("engine, prefix sharing off", None, None), ("engine, prefix sharing on", "share", None)]
            elif sharing == [True]:
                variants = [("engine, prefix sharing on", "share", None)]
            if w == "tox25":
                variants += [] if args.no_unshared else [("engine, unshared", False, None)]
                default = eng._limits(prompts[0].params)[0]
                variants += [(f"engine, {float(f)} x token budget", None, int(float(f) * default))
                             for f in args.tox_budget_scales.split(",") if f]
            fused = [x.strip() for x in args.fused.split(",") if x.strip()]
            if len(fused) > 1:
                variants = [(p_ + f", fused {f_}", sh, bu, f_) for f_ in fused for p_, sh, bu in variants]
            else:
                variants = [(p_, sh, bu, fused[0]) for p_, sh, bu in variants]
            comp = [x.strip() for x in args.compile.split(",") if x.strip()]
            if comp:  # under compile the step keeps one K/V copy per row anyway: no separate unshared run
                variants = [(p_ + f", compile {c_}", sh, bu, fz, c_) for i_, c_ in enumerate(comp)
                            for p_, sh, bu, fz in variants if not (c_ == "on" and sh is False)]
            else:
                variants = [v_ + (None,) for v_ in variants]
            texts: dict[str, list] = {}
            for path, shared, budget, fz, cm in variants:
                if cm is not None:
                    set_compile(eng, cm)
                set_fused(model, fz)
                eng.prefix_sharing = shared == "share"
                shared = None if shared == "share" else shared
                eng.shared_decode, eng.token_budget = shared, budget
                eng.counters.clear()
                limits = eng._limits(prompts[0].params)  # (token budget, rows) this run's batches are planned with
                try:
                    gens, secs = timed(lambda: eng.generate(prompts))
                except Exception as e:  # e.g. out of memory at a larger budget: say so, go on
                    print(f"  {w} | {arch} | {path}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                c = dict(eng.counters)
                ex = {"token_budget": budget, "compile": cm, "notes": list(eng.notes), "limits": limits}
                if args.compare_outputs:
                    label = path if path not in texts else f"{path} ({sum(k.startswith(path) for k in texts) + 1})"
                    texts[label] = [g.texts for g in gens]
                    ex["outputs_vs_first"] = compare_texts(eng, next(iter(texts.values())), texts[label])
                    print(f"    outputs vs the first run's: {ex['outputs_vs_first']}", flush=True)
                rows.append(row(w, arch, path, len(prompts), secs, c, ps, lim, ex))
            if args.compare_outputs and len(texts) > 2:  # every pair, for the controls
                pairs = {f"{a} | {b}": compare_texts(eng, texts[a], texts[b]) for i_, a in enumerate(texts)
                         for b in list(texts)[i_ + 1:]}
                output_checks.append({"workload": w, "model": arch, "pairs": pairs})
            if args.greedy_compile and comp:
                output_checks.append(greedy_compile_check(eng, model, prompts[:args.greedy_compile], comp, w, arch))
            if comp:
                set_compile(eng, "auto")
            eng.shared_decode, eng.token_budget, eng.prefix_sharing = None, None, False
            set_fused(model, [x.strip() for x in args.fused.split(",") if x.strip()][-1])
            if args.profile and w == "tox25":
                profile_batch(eng, prompts, args.out_dir / f"profile_{arch}.txt")
            if args.no_evaluate:
                continue
            for share in sharing:
                eng.prefix_sharing = share
                out = Path(tempfile.mkdtemp(prefix=f"ct-eval-{w}-"))
                shutil.rmtree(out)
                eng.counters.clear()
                names, _ = WORKLOADS[w]
                PHASES.clear()
                res, secs = timed(lambda: evaluate(eng, {"name": rm.name}, names, options(w, args), out, progress=False))
                c = dict(eng.counters)
                engine_s = c.get("prefill_seconds", 0.0) + c.get("decode_seconds", 0.0)
                phases = {k: round(v, 2) for k, v in PHASES.items()}
                phases["engine (prefill + decode)"] = round(engine_s, 2)
                extra = {"evaluate_stats": res.stats, "scored": sorted(res.scores), "not_run": res.not_run,
                         "chunk_size_used": getattr(eng, "chunk_size", None), "phases": phases,
                         "score_workers": score_workers()}
                label = "evaluate end to end" + ("" if len(sharing) == 1 and not share else
                                                 f", prefix sharing {'on' if share else 'off'}")
                rows.append(row(w, arch, label, len(prompts), secs, c, ps, lim, extra))
                print(f"    phases (s): {phases}", flush=True)
                if args.cprofile:
                    import cProfile
                    import io
                    import pstats

                    pr = cProfile.Profile()
                    t0 = time.perf_counter()
                    pr.enable()
                    evaluate(eng, {"name": rm.name}, names, options(w, args), out, progress=False)
                    pr.disable()
                    rerun = time.perf_counter() - t0
                    buf = io.StringIO()
                    buf.write(f"{w} | {arch} | evaluate rerun on its own results folder (all cache hits): "
                              f"{rerun:.2f} s under cProfile\n")
                    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(40)
                    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
                    (args.out_dir / f"cprofile_{w}_{arch}{'_share' if share else ''}.txt").write_text(buf.getvalue())
                    print(f"    cached rerun under cProfile: {rerun:.2f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            eng.prefix_sharing = False
        del eng, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    doc = {"device": lim["device_name"], "limits": lim, "torch": torch.__version__, "rows": rows,
           "prefill_rows": prefill_rows_, "greedy_checks": greedy_checks, "output_checks": output_checks,
           "command": " ".join(sys.argv),
           "vllm": "not measured: the device image has no vLLM, and vLLM 0.33's wheel plus the CUDA torch 2.14 build it "
                   "pins are several hundred MiB, far over the 64 MiB a device call can carry"}
    stem = args.out_dir / f"evaluate_gpu{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    md = [f"# `comptrust evaluate` on {lim['device_name']}", "", f"`{doc['command']}`; torch {torch.__version__}; measured "
          f"{lim['bandwidth_measured'] / 1e9:.0f} GB/s, {lim['peak_flops_measured'] / 1e12:.0f} TFLOP/s bf16.", "",
          "| workload | model | path | prompts | s | new tokens | tok/s | decode tok/s | prefill tok/s | mean rows | "
          "% roofline (run) | % roofline (decode) | % roofline, phases added (run) | % roofline, phases added (decode) | "
          "K/V slots read / unshared | peak GPU MiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kv = f"{r['kv_slots_read'] / max(r['kv_slots_unshared'], 1):.2f}" if r["kv_slots_unshared"] else "-"
        md.append(f"| {r['workload']} | {r['model']} | {r['path']} | {r['prompts']} | {r['seconds']} | {r['new_tokens']} | "
                  f"{r['tok_per_s']:.0f} | {r['decode_tok_per_s'] or 0:.0f} | {r['prefill_tok_per_s'] or 0:.0f} | "
                  f"{r['mean_decode_rows']} | {100 * r['roofline_fraction']:.1f} | "
                  f"{100 * (r['decode_roofline_fraction'] or 0):.1f} | {100 * r['roofline_sum_fraction']:.1f} | "
                  f"{100 * (r['decode_roofline_sum_fraction'] or 0):.1f} | {kv} | {r['peak_gpu_mib']} |")
    if prefill_rows_:
        md += ["", "Prefill alone (--prefill-only; full-profile prompts, --prefill-limits items per sub-scenario; "
               "matmul % = computed slots incl. padding x matmul FLOPs per token / measured matmul rate):", "",
               "| perspective | model | CUDA prefill setting | prefix sharing | prompts | prompt tokens | computed | saved | "
               "pad share | forwards | s | prompt tok/s | computed tok/s | matmul % | peak GPU MiB |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in prefill_rows_:
            md.append(f"| {r['perspective']} | {r['model']} | {r['config']} | {'on' if r['prefix_sharing'] else 'off'} | "
                      f"{r['prompts']} | {r['prompt_tokens']} | {r['computed_tokens']} | {r['saved']:.2f} | "
                      f"{r['pad_share']:.2f} | {r['forwards']} | {r['seconds']:.2f} | {r['prompt_tok_per_s']:.0f} | "
                      f"{r['computed_tok_per_s']:.0f} | {100 * r['matmul_fraction']:.1f} | {r['peak_gpu_mib']} |")
    for g in greedy_checks:
        md += ["", f"Greedy outputs identical to the default CUDA prefill forwards' ({', '.join(g['perspectives'])}, "
               f"{g['limit']} per sub-scenario, prefix sharing on), of {g['prompts']}: {g['identical_to_default']}."]
    comp_rows = [r for r in rows if r.get("outputs_vs_first")]
    if comp_rows:
        md += ["", "Outputs of each engine run against the workload's first run (samples with identical text; "
               "tokens agreeing from the start, re-tokenized texts, mean share of the shorter):", ""]
        md += [f"- {r['workload']} | {r['path']}: {r['outputs_vs_first']}" for r in comp_rows]
    for oc in output_checks:
        md += ["", f"Output pairs, {oc['workload']} ({oc.get('kind', 'engine runs')}):", ""]
        md += [f"- {k}: {v}" for k, v in oc["pairs"].items()]
    phased = [r for r in rows if r.get("phases")]
    if phased:
        md += ["", "Where evaluate's time goes (s; score() is the main score, the bootstrap's 200 re-scorings are under "
               "bootstrap CIs; scoring workers: " + ", ".join(sorted({str(r['score_workers']) for r in phased})) + "):",
               "", "| workload | model | path | total | " + " | ".join(phased[0]["phases"]) + " |",
               "|---|---|---|---|" + "---|" * len(phased[0]["phases"])]
        for r in phased:
            md.append(f"| {r['workload']} | {r['model']} | {r['path']} | {r['seconds']} | "
                      + " | ".join(str(r["phases"].get(k, 0)) for k in phased[0]["phases"]) + " |")
    md += ["", f"vLLM: {doc['vllm']}."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
