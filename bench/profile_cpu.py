"""Where the time goes on the CPU path: a torch.profiler profile of comptrust's HF engine generating a mixed item set.

The items are the ones bench/throughput.py builds (n/3 stereotype prompts sampled at temperature 1 for up to 150
new tokens, n/3 AdvGLUE and n/3 MMLU 5-shot prompts greedy for up to 16), sent to HFEngine.generate() in one
call as `comptrust evaluate` does. After a short warm-up the items are generated twice:

1. under torch.profiler (CPU activity, no shapes), with named ranges (torch.profiler.record_function) around
   the engine's phases (tokenize, prefill, decode, detokenize), the model's modules (embedding, attention, MLP,
   RMS norms, rotary tables, lm_head), the KV-cache appends / row drops and the sampler; every op's self CPU time
   is then attributed to a category by the innermost range it ran in (so the lm_head matmul and the sampler's
   softmax are told apart from the layers' matmuls and the attention softmax without recording shapes);
2. without the profiler or the ranges: the plain wall time and the engine's own counters (prefill / decode
   seconds), the profiler's overhead being the difference.

"Python / framework overhead" is the wall time of the profiled run that no torch op accounts for (wall minus the
sum of all ops' self time): Python in transformers' modules and the engine's loops, dispatch, plus what the
profiler itself adds (an estimate without the latter: plain wall minus the ops' self time). Self CPU time is
measured on the calling thread; ops run their kernels on 2 OpenMP threads, so it is wall time, not CPU-seconds.

The decode roofline: per decode step the weights are read once and every row costs 2 x params FLOPs (plus the KV
entries each row attends to: bytes read, and 4 x heads x head_dim FLOPs per layer per entry); bandwidth and bf16
matmul FLOP/s measured here (bench/throughput.py's measure_limits).

    COMPTRUST_HOME=/tmp/s3home .venv/bin/python bench/profile_cpu.py --n-items 96

Writes bench/results/profile_cpu.md (--out) and prints the same tables.
"""

from __future__ import annotations

import os

# before torch is imported: spin-waiting OpenMP threads slow a shared CPU ~30x
import comptrust  # noqa: E402,F401 -- before torch: sets OpenMP's waiting (see comptrust/__init__.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import platform
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402  (bench/throughput.py: items, parameter stats, machine limits)

import comptrust.engine.decode as decodemod  # noqa: E402
import comptrust.engine.hf as hfmod  # noqa: E402
from comptrust.engine.hf import HFEngine  # noqa: E402
from comptrust.models.resolve import resolve  # noqa: E402

P = "ct::"  # prefix of our named ranges


# -- instrumentation ------------------------------------------------------------------------------------------
class Instrument:
    """Named ranges around the engine's phases, the model's modules, the KV cache and the sampler; removed by
    close(), so the plain run is the engine as shipped."""

    def __init__(self, eng: HFEngine):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        self.eng = eng
        self.handles = []
        self.restore = []
        self.stack: list = []
        self.counts: dict[str, float] = defaultdict(float)  # rows through lm_head / tokens through the body, by phase
        self.phase = "other"
        m = eng.model

        def scoped(fn, name, phase=None):
            def w(*a, **k):
                prev = self.phase
                if phase:
                    self.phase = phase
                try:
                    with record_function(P + name):
                        return fn(*a, **k)
                finally:
                    self.phase = prev

            return w

        # engine phases (instance attributes shadow the methods; module globals for the phase functions that
        # engine/hf.py calls and for the sampler that engine/decode.py calls)
        for attr, name, phase in (("encode", "phase:tokenize", None), ("_to_generations", "phase:detokenize", None)):
            setattr(eng, attr, scoped(getattr(eng, attr), name, phase))
            self.restore.append(lambda attr=attr: delattr(eng, attr))
        for mod, attr, name, phase in ((hfmod, "prefill", "phase:prefill", "prefill"),
                                       (hfmod, "prefill_simple", "phase:prefill", "prefill"),
                                       (hfmod, "decode_compact", "phase:decode", "decode"),
                                       (hfmod, "decode_static", "phase:decode", "decode"),
                                       (decodemod, "sample_next", "sample", None)):
            orig_fn = getattr(mod, attr)
            setattr(mod, attr, scoped(orig_fn, name, phase))
            self.restore.append(lambda mod=mod, attr=attr, orig_fn=orig_fn: setattr(mod, attr, orig_fn))
        for cls, meth, name in ((DynamicLayer, "update", "kv_append"), (DynamicCache, "batch_select_indices", "kv_select")):
            owner = next(k for k in cls.__mro__ if meth in k.__dict__)  # patch where it is defined
            orig = owner.__dict__[meth]
            setattr(owner, meth, scoped(orig, name))
            self.restore.append(lambda owner=owner, meth=meth, orig=orig: setattr(owner, meth, orig))

        # modules
        def add(mod, name):
            def pre(_m, args, kwargs):
                rf = record_function(P + "mod:" + name)
                rf.__enter__()
                self.stack.append(rf)
                if name == "model":
                    ids = kwargs.get("input_ids", args[0] if args else None)
                    if ids is not None:
                        self.counts[f"body_tokens_{self.phase}"] += ids.numel()
                elif name == "lm_head":
                    x = args[0] if args else kwargs.get("input")
                    self.counts[f"lm_head_rows_{self.phase}"] += x.numel() // x.shape[-1]

            def post(_m, _args, _kwargs, _out):
                self.stack.pop().__exit__(None, None, None)

            self.handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(mod.register_forward_hook(post, with_kwargs=True))

        add(m, "model")
        add(m.get_input_embeddings(), "embed")
        add(m.get_output_embeddings(), "lm_head")
        base = m.model
        if hasattr(base, "rotary_emb"):
            add(base.rotary_emb, "rotary")
        if hasattr(base, "norm"):
            add(base.norm, "norm")
        for layer in base.layers:
            add(layer.self_attn, "attn")
            add(layer.mlp, "mlp")
            for nm in ("input_layernorm", "post_attention_layernorm"):
                if hasattr(layer, nm):
                    add(getattr(layer, nm), "norm")

    def close(self):
        for h in self.handles:
            h.remove()
        for r in reversed(self.restore):
            r()


# -- attribution ----------------------------------------------------------------------------------------------
CATS = [  # (category, group)
    ("linear projections (q/k/v/o, MLP gate/up/down)", "linear layers"),
    ("attention: SDPA (scores, softmax, weighted sum)", "attention"),
    ("attention: rotary, reshapes, transposes", "norms / elementwise"),
    ("RMS norms", "norms / elementwise"),
    ("MLP activation (silu x up)", "norms / elementwise"),
    ("model glue (residual adds, causal mask)", "norms / elementwise"),
    ("rotary tables (cos / sin)", "norms / elementwise"),
    ("lm_head (final projection 576 -> 49152)", "embedding + lm_head"),
    ("embedding lookup", "embedding + lm_head"),
    ("sampler (argmax / top-k, softmax, Gumbel noise)", "sampling / logits"),
    ("KV cache: append new token (cat)", "KV cache copies"),
    ("KV cache: drop finished rows", "KV cache copies"),
    ("prefill outside the model (KV placement, inputs)", "KV cache copies"),
    ("decode loop bookkeeping (EOS test, mask growth, .tolist)", "loop bookkeeping / other ops"),
    ("other ops", "loop bookkeeping / other ops"),
]
GROUPS = ["linear layers", "attention", "norms / elementwise", "embedding + lm_head", "sampling / logits",
          "KV cache copies", "loop bookkeeping / other ops"]
MATMUL_OPS = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm"}


def is_sdpa(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


def categorize(ctx: dict, name: str) -> str:
    if ctx["sample"]:
        return CATS[9][0]
    if ctx["kv"] == "kv_append":
        return CATS[10][0]
    if ctx["kv"] == "kv_select":
        return CATS[11][0]
    mod = ctx["mod"]
    if mod == "lm_head":
        return CATS[7][0]
    if mod == "embed":
        return CATS[8][0]
    if ctx["sdpa"] or is_sdpa(name):
        return CATS[1][0]
    if mod in ("attn", "mlp") and (ctx["linear"] or name in MATMUL_OPS):
        return CATS[0][0]
    if mod == "attn":
        return CATS[2][0]
    if mod == "mlp":
        return CATS[4][0]
    if mod == "norm":
        return CATS[3][0]
    if mod == "rotary":
        return CATS[6][0]
    if mod == "model":
        return CATS[5][0]
    if ctx["phase"] == "prefill":
        return CATS[12][0]
    if ctx["phase"] == "decode":
        return CATS[13][0]
    return CATS[14][0]


def attribute(events) -> dict:
    """Walk the profiler's event tree of the main thread: each op's self time to (category, phase), each op name
    to its totals, each named range's own (non-op) time to that range."""
    cat = defaultdict(lambda: defaultdict(float))  # category -> phase -> us
    ops = defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # name -> count, self us, of it prefill, decode
    scope_self = defaultdict(float)  # our range -> self us (Python time inside it outside ops)
    threads = defaultdict(float)
    roots = [e for e in events if e.cpu_parent is None]
    for e in roots:
        threads[e.thread] += e.cpu_time_total
    main_thread = max(threads, key=threads.get) if threads else None
    other_threads = {t: v for t, v in threads.items() if t != main_thread}
    base = {"phase": "other", "mod": None, "kv": None, "sample": False, "sdpa": False, "linear": False}
    todo = [(e, base) for e in roots if e.thread == main_thread]
    n_ops = 0
    while todo:
        e, ctx = todo.pop()
        name = e.name
        st = e.self_cpu_time_total
        if name.startswith(P):
            tag = name[len(P):]
            scope_self[tag] += st
            ctx = dict(ctx)
            if tag.startswith("phase:"):
                ctx["phase"] = {"phase:prefill": "prefill", "phase:decode": "decode"}.get(tag, "other")
            elif tag.startswith("mod:"):
                ctx["mod"] = tag[4:]
            elif tag in ("kv_append", "kv_select"):
                ctx["kv"] = tag
            elif tag == "sample":
                ctx["sample"] = True
        else:
            n_ops += 1
            c = categorize(ctx, name)
            cat[c][ctx["phase"]] += st
            o = ops[name]
            o[0] += 1
            o[1] += st
            if ctx["phase"] == "prefill":
                o[2] += st
            elif ctx["phase"] == "decode":
                o[3] += st
            if is_sdpa(name) or name == "aten::linear":
                ctx = dict(ctx, sdpa=ctx["sdpa"] or is_sdpa(name), linear=ctx["linear"] or name == "aten::linear")
        for ch in e.cpu_children:
            todo.append((ch, ctx))
    return {"cat": cat, "ops": ops, "scope_self": scope_self, "other_threads_us": sum(other_threads.values()),
            "n_ops": n_ops}


# -- isolated matmuls ---------------------------------------------------------------------------------------
@torch.no_grad()
def matmul_probe(model, rows: int, reps: int) -> dict:
    """Seconds per forward of the model's own projection weights (every layer's q/k/v/o/gate/up/down, then the
    lm_head) applied to `rows` random rows with F.linear, nothing else: what the matmuls of one step cost on
    their own, at the same shapes and with the same weights streamed from memory."""
    F = torch.nn.functional
    dt = model.get_input_embeddings().weight.dtype
    ws = []
    for layer in model.model.layers:
        for mod in (layer.self_attn, layer.mlp):
            for _, sub in mod.named_children():
                if isinstance(sub, torch.nn.Linear):
                    ws.append(sub.weight)
    head = model.get_output_embeddings().weight
    xs = {n: torch.randn(rows, n, dtype=dt) for n in {w.shape[1] for w in ws} | {head.shape[1]}}

    def body():
        for w in ws:
            F.linear(xs[w.shape[1]], w)

    def lm():
        F.linear(xs[head.shape[1]], head)

    out = {}
    for name, fn in (("body", body), ("lm_head", lm)):
        fn()
        best = float("inf")
        for _ in range(reps):  # best of reps: the least disturbed by the other jobs on the cores
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    flops_body = 2 * rows * sum(w.numel() for w in ws)
    out["body_flops"] = flops_body
    out["lm_head_flops"] = 2 * rows * head.numel()
    return out


# -- helpers --------------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def counters(eng: HFEngine, gens, wall: float, cpu0: float) -> dict:
    """The engine's counters of a run, with its wall time, CPU seconds and the tokens it generated."""
    c = dict(eng.counters)
    c["wall"] = wall
    c["cpu_seconds"] = cpu_seconds() - cpu0
    c["new_tokens_counted"] = sum(sum(g.n_tokens) for g in gens)
    return c


def run(eng: HFEngine, prompts) -> dict:
    eng.counters.clear()
    c0, t0 = cpu_seconds(), time.perf_counter()
    gens = eng.generate(prompts)
    return counters(eng, gens, time.perf_counter() - t0, c0)


def pct(x: float, tot: float) -> str:
    return f"{100 * x / tot:.1f}" if tot else "-"


def table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return out


# -- main -----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-items", type=int, default=96)
    ap.add_argument("--warmup-per-set", type=int, default=2, help="warm-up prompts from each perspective")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--mmlu-dir", type=Path)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile_cpu.md")
    args = ap.parse_args()

    t_start = time.time()
    load = {"start": loadavg()}
    dt, mm = tp.default_data()
    dt, mm = args.data_dir or dt, args.mmlu_dir or mm
    sets = tp.build_items(args.n_items, dt, mm)
    prompts = [p for v in sets.values() for p in v]
    warm = [p for v in sets.values() for p in v[: args.warmup_per_set]]
    resolved = resolve(None if args.model == "embedded" else args.model)
    eng = HFEngine(resolved, device="cpu")
    model = eng.model
    ps = tp.param_stats(model)
    lim = tp.measure_limits("cpu")
    emb = model.get_input_embeddings().weight
    emb_params = emb.numel()
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    print(f"items: {', '.join(f'{k} {len(v)}' for k, v in sets.items())}; model {resolved.name}, {ps['params'] / 1e6:.0f}M "
          f"params, dtype {eng.dtype}, {torch.get_num_threads()} threads; measured {lim['bandwidth_measured'] / 1e9:.0f} GB/s, "
          f"{lim['peak_flops_measured'] / 1e12:.2f} TFLOP/s bf16; load {load['start']}", flush=True)

    t0 = time.perf_counter()
    eng.generate(warm)
    print(f"warm-up: {len(warm)} items in {time.perf_counter() - t0:.1f} s", flush=True)

    # 1. profiled run
    load["before profiled run"] = loadavg()
    inst = Instrument(eng)
    eng.counters.clear()
    c0 = cpu_seconds()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        t0 = time.perf_counter()
        with record_function(P + "generate"):
            gens = eng.generate(prompts)
        wall_prof = time.perf_counter() - t0
    cprof = counters(eng, gens, wall_prof, c0)
    inst.close()
    counts = dict(inst.counts)
    print(f"profiled run: {wall_prof:.1f} s (prefill {cprof.get('prefill_seconds', 0):.1f}, decode "
          f"{cprof.get('decode_seconds', 0):.1f}); load {loadavg()}", flush=True)
    t0 = time.perf_counter()
    att = attribute(prof.events())
    t_analysis = time.perf_counter() - t0
    del prof
    print(f"attributed {att['n_ops']} ops in {t_analysis:.1f} s", flush=True)

    # 2. plain run
    load["before plain run"] = loadavg()
    cplain = run(eng, prompts)
    print(f"plain run: {cplain['wall']:.1f} s (prefill {cplain.get('prefill_seconds', 0):.1f}, decode "
          f"{cplain.get('decode_seconds', 0):.1f}); load {loadavg()}", flush=True)

    dec_rows = max(1, round(cplain.get("decode_row_steps", 0) / max(cplain.get("decode_steps", 0), 1)))
    t0 = time.perf_counter()
    probe_dec = matmul_probe(model, dec_rows, reps=5)
    probe_pf = matmul_probe(model, 512, reps=2)
    lim_end = tp.measure_limits("cpu")
    print(f"matmul probes and limits: {time.perf_counter() - t0:.1f} s", flush=True)
    load["end"] = loadavg()
    total_s = time.time() - t_start

    # -- tables -------------------------------------------------------------------------------------------------
    md = [f"# CPU profile: comptrust HFEngine on {resolved.name}", "",
          f"`COMPTRUST_HOME=/tmp/s3home {' '.join([Path(sys.executable).name, *sys.argv])}` "
          f"(`.venv/bin/python bench/profile_cpu.py` from the repository root); "
          f"torch {torch.__version__}, dtype {eng.dtype}, {torch.get_num_threads()} threads on "
          f"{platform.machine()} ({os.cpu_count()} cores), loop {eng._loop_for()}, prefix sharing {eng.prefix_sharing}; "
          f"script total {total_s:.0f} s (of it {t_analysis:.0f} s attributing the profile's {att['n_ops']} op events).", "",
          f"Items: {', '.join(f'{k} {len(v)}' for k, v in sets.items())} ({len(prompts)}, one generate() call; "
          f"warm-up {len(warm)} items first). Batches {int(cplain.get('batches', 0))}, prefill tokens "
          f"{int(cplain.get('prefill_tokens', 0))} (slots incl. padding {int(cplain.get('prefill_slots', 0))}), "
          f"decode steps {int(cplain.get('decode_steps', 0))}, decode row-steps {int(cplain.get('decode_row_steps', 0))}, "
          f"new tokens {int(cplain.get('new_tokens_counted', 0))}.", "",
          "**The 2 cores are shared with other jobs** (load average, 1/5/15 min: "
          + "; ".join(f"{k} {v}" for k, v in load.items())
          + "). Absolute seconds move with that load; read the percentages. CPU/wall below is this process's CPU "
          "seconds per wall second (2.0 = both cores busy the whole time).", ""]

    # (1) wall split
    rows = []
    for nm, c in (("plain (no profiler)", cplain), ("profiled", cprof)):
        w, pf, dc = c["wall"], c.get("prefill_seconds", 0.0), c.get("decode_seconds", 0.0)
        oth = w - pf - dc
        rows.append([nm, f"{w:.1f}", f"{pf:.1f} ({pct(pf, w)}%)", f"{dc:.1f} ({pct(dc, w)}%)",
                     f"{oth:.1f} ({pct(oth, w)}%)", f"{c['cpu_seconds'] / w:.2f}",
                     f"{c.get('new_tokens_counted', 0) / w:.0f}"])
    md += ["## 1. Wall time split (engine counters)", "",
           "prefill = shared-prefix prefill of each batch (incl. KV placement), decode = the compact decode loop "
           "(incl. sampling), other = tokenizing, planning, detokenizing.", ""]
    md += table(["run", "wall s", "prefill s (%)", "decode s (%)", "other s (%)", "CPU/wall", "new tok/s"], rows)
    md += ["", f"Profiler overhead: profiled wall / plain wall = {wall_prof / cplain['wall']:.2f}x; prefill "
           f"{cprof.get('prefill_seconds', 0) / max(cplain.get('prefill_seconds', 0), 1e-9):.2f}x (few, large ops), decode "
           f"{cprof.get('decode_seconds', 0) / max(cplain.get('decode_seconds', 0), 1e-9):.2f}x (many small ops). The profiled "
           "run also carries the named ranges, and the load differs between the two runs.", ""]

    # (2) categories
    cat = att["cat"]
    W = wall_prof * 1e6
    op_total = sum(sum(v.values()) for v in cat.values())
    ph_wall = {"prefill": cprof.get("prefill_seconds", 0) * 1e6, "decode": cprof.get("decode_seconds", 0) * 1e6}
    ph_wall["other"] = W - ph_wall["prefill"] - ph_wall["decode"]
    ph_ops = {ph: sum(v.get(ph, 0.0) for v in cat.values()) for ph in ("prefill", "decode", "other")}
    rows = []
    nsteps = max(cprof.get("decode_steps", 0), 1)
    for c, g in CATS:
        v = cat.get(c, {})
        tot = sum(v.values())
        rows.append([c, g, f"{v.get('prefill', 0) / 1e6:.2f}", f"{v.get('decode', 0) / 1e6:.2f}",
                     f"{v.get('other', 0) / 1e6:.2f}", f"{tot / 1e6:.2f}", pct(tot, W),
                     pct(v.get("decode", 0), ph_wall["decode"]), f"{v.get('decode', 0) / 1e3 / nsteps:.1f}"])
    ovh = {ph: ph_wall[ph] - ph_ops[ph] for ph in ph_wall}
    rows.append(["**Python / framework overhead** (wall - sum of op self time)", "overhead",
                 f"{ovh['prefill'] / 1e6:.2f}", f"{ovh['decode'] / 1e6:.2f}", f"{ovh['other'] / 1e6:.2f}",
                 f"{(W - op_total) / 1e6:.2f}", pct(W - op_total, W), pct(ovh["decode"], ph_wall["decode"]),
                 f"{ovh['decode'] / 1e3 / nsteps:.1f}"])
    rows.append(["**total (profiled wall)**", "", f"{ph_wall['prefill'] / 1e6:.2f}", f"{ph_wall['decode'] / 1e6:.2f}",
                 f"{ph_wall['other'] / 1e6:.2f}", f"{W / 1e6:.2f}", "100.0", "100.0", f"{ph_wall['decode'] / 1e3 / nsteps:.1f}"])
    md += ["## 2. Self CPU time by category (profiled run)", "",
           "Each op's self time goes to the innermost named range it ran in (module hooks, KV-cache methods, sampler), "
           "so e.g. the lm_head matmul and the sampler's softmax are separated from the layers' matmuls and the "
           "attention softmax. Seconds per engine phase; % of the profiled wall; % of the decode phase and ms per decode step "
           f"({int(nsteps)} steps).", ""]
    md += table(["category", "group", "prefill s", "decode s", "other s", "total s", "% wall", "% of decode",
                 "ms / decode step"], rows)
    if att["other_threads_us"]:
        md += ["", f"(ops on other threads, not counted: {att['other_threads_us'] / 1e6:.2f} s)"]

    # grouped
    gsum = defaultdict(lambda: defaultdict(float))
    for c, g in CATS:
        for ph, v in cat.get(c, {}).items():
            gsum[g][ph] += v
    plain_w = cplain["wall"] * 1e6
    rows = []
    for g in GROUPS:
        v = gsum[g]
        tot = sum(v.values())
        rows.append([g, f"{tot / 1e6:.2f}", pct(tot, W), pct(v.get("prefill", 0), ph_wall["prefill"]),
                     pct(v.get("decode", 0), ph_wall["decode"]), pct(tot, plain_w)])
    est = (f"{pct(plain_w - op_total, plain_w)} (est.)" if plain_w > op_total else
           "n/a: the ops alone took longer in the profiled run than the whole plain run")
    rows.append(["Python / framework overhead", f"{(W - op_total) / 1e6:.2f}", pct(W - op_total, W),
                 pct(ovh["prefill"], ph_wall["prefill"]), pct(ovh["decode"], ph_wall["decode"]), est])
    md += ["", "Grouped (the issue's categories). Last column: the same op seconds against the plain run's wall; the "
           "overhead there is plain wall - op self time, i.e. an estimate of the overhead without the profiler.", ""]
    md += table(["group", "s", "% of profiled wall", "% of prefill", "% of decode", "% of plain wall"], rows)

    # where the overhead sits
    ss = att["scope_self"]
    labels = {"generate": "engine outside its phases (planning, grouping)", "phase:tokenize": "tokenizing prompts",
              "phase:detokenize": "detokenizing outputs", "phase:prefill": "prefill code outside the model",
              "phase:decode": "decode loop outside the model and sampler", "mod:model": "model forward outside submodules (decoder layers, masks)",
              "mod:attn": "attention module (projections' Python, rotary, cache call, SDPA wrapper)",
              "mod:mlp": "MLP module", "mod:norm": "RMS norm modules", "mod:embed": "embedding module",
              "mod:lm_head": "lm_head module", "mod:rotary": "rotary table module", "kv_append": "KV cache append",
              "kv_select": "KV cache row drop", "sample": "sampler"}
    rows = [[labels.get(k, k), f"`{P}{k}`", f"{v / 1e6:.2f}", pct(v, W)] for k, v in sorted(ss.items(), key=lambda kv: -kv[1])]
    md += ["", "Where the non-op time sits: Python time inside each named range outside any op (includes the "
           "profiler's and the hooks' own cost).", ""]
    md += table(["range", "name", "s", "% wall"], rows)

    # (3) top ops
    top = sorted(att["ops"].items(), key=lambda kv: -kv[1][1])[: args.top]
    rows = [[f"`{n}`", o[0], f"{o[1] / 1e6:.2f}", pct(o[1], W), f"{o[1] / o[0]:.1f}", f"{o[2] / 1e6:.2f}",
             f"{o[3] / 1e6:.2f}"] for n, o in top]
    md += ["", f"## 3. Top {args.top} ops by self CPU time (profiled run)", ""]
    md += table(["op", "calls", "self s", "% wall", "us / call", "in prefill s", "in decode s"], rows)

    # (4) decode roofline
    cd = cplain
    steps, rsteps, kv = cd.get("decode_steps", 0), cd.get("decode_row_steps", 0), cd.get("decode_kv_slots", 0)
    bw = lim["bandwidth_measured"]
    probe_rate = (probe_pf["body_flops"] + probe_pf["lm_head_flops"]) / (probe_pf["body"] + probe_pf["lm_head"])
    # the 1024^3 product of measure_limits is a low estimate of what this CPU's bf16 matmuls reach (prefill-shaped
    # products with the model's own weights ran faster in trials): the compute limit is the best of the two
    peak = max(lim["peak_flops_measured"], probe_rate)
    attn_flops_per_slot = 4 * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers
    md += ["", "## 4. Decode against the roofline (plain run's counters)", ""]
    if steps:
        dsec = cd["decode_seconds"]
        step_t = dsec / steps
        rows_mean = rsteps / steps
        t_w = steps * ps["bytes_per_step"] / bw
        t_kv = kv * ps["kv_bytes_per_token"] / bw
        t_f = rsteps * ps["flops_per_token"] / peak
        t_af = kv * attn_flops_per_slot / peak
        roof = max(t_w + t_kv, t_f + t_af)
        # achieved matmul rates in the profiled decode phase
        lin_dec = cat.get(CATS[0][0], {}).get("decode", 0) / 1e6
        head_dec = cat.get(CATS[7][0], {}).get("decode", 0) / 1e6
        body_tok = counts.get("body_tokens_decode", 0)
        head_rows = counts.get("lm_head_rows_decode", 0)
        lin_rate = body_tok * 2 * (ps["params"] - emb_params) / lin_dec if lin_dec else 0
        head_rate = head_rows * 2 * emb_params / head_dec if head_dec else 0
        lin_pf = cat.get(CATS[0][0], {}).get("prefill", 0) / 1e6
        body_pf = counts.get("body_tokens_prefill", 0)
        lin_pf_rate = body_pf * 2 * (ps["params"] - emb_params) / lin_pf if lin_pf else 0
        rows = [
            ["decode steps / mean rows per step", f"{steps:.0f} / {rows_mean:.1f}"],
            ["measured time per step", f"{1e3 * step_t:.1f} ms ({rows_mean / step_t:.0f} tok/s)"],
            ["weights read per step", f"{ps['bytes_per_step'] / 2**20:.0f} MiB -> {1e3 * t_w / steps:.1f} ms at "
             f"{bw / 1e9:.0f} GB/s"],
            ["KV entries read per step (mean)", f"{kv / steps:.0f} x {ps['kv_bytes_per_token'] / 1024:.1f} KiB = "
             f"{kv / steps * ps['kv_bytes_per_token'] / 2**20:.0f} MiB -> {1e3 * t_kv / steps:.1f} ms"],
            ["matmul FLOPs per step (2 x params x rows)", f"{rows_mean * ps['flops_per_token'] / 1e9:.1f} GFLOP -> "
             f"{1e3 * t_f / steps:.1f} ms at {peak / 1e12:.2f} TFLOP/s"],
            ["attention FLOPs per step", f"{kv / steps * attn_flops_per_slot / 1e9:.1f} GFLOP -> {1e3 * t_af / steps:.1f} ms"],
            ["bound", "compute" if t_f + t_af >= t_w + t_kv else "memory bandwidth"],
            ["roofline time per step (max of the two)", f"{1e3 * roof / steps:.1f} ms"],
            ["**fraction of roofline achieved (decode)**", f"**{100 * roof / dsec:.1f}%**"],
            ["fraction of the bandwidth roofline alone (weights + KV reads / step time)", f"{100 * (t_w + t_kv) / dsec:.1f}%"],
            ["layers' matmuls in decode (profiled): achieved", f"{lin_rate / 1e12:.3f} TFLOP/s = {pct(lin_rate, peak)}% of "
             f"the compute limit"],
            ["lm_head in decode (profiled): achieved", f"{head_rate / 1e12:.3f} TFLOP/s = {pct(head_rate, peak)}%"],
            ["layers' matmuls in prefill (profiled): achieved", f"{lin_pf_rate / 1e12:.3f} TFLOP/s = {pct(lin_pf_rate, peak)}%"],
            [f"isolated F.linear with the model's weights at {dec_rows} rows (the mean decode batch), per step",
             f"layers {1e3 * probe_dec['body']:.1f} ms + lm_head {1e3 * probe_dec['lm_head']:.1f} ms "
             f"({(probe_dec['body_flops'] + probe_dec['lm_head_flops']) / (probe_dec['body'] + probe_dec['lm_head']) / 1e12:.3f} TFLOP/s)"],
            ["the same matmuls inside the engine's decode (profiled), per step",
             f"layers {1e3 * lin_dec / max(cprof.get('decode_steps', 1), 1):.1f} ms + lm_head "
             f"{1e3 * head_dec / max(cprof.get('decode_steps', 1), 1):.1f} ms"],
            ["isolated F.linear at 512 rows (prefill-like)", f"{probe_rate / 1e12:.3f} TFLOP/s"],
            ["compute limit used above", f"{peak / 1e12:.3f} TFLOP/s (the larger of the 1024^3 product and the 512-row probe)"],
            ["machine limits at start / end of the script", f"{lim['bandwidth_measured'] / 1e9:.0f} / "
             f"{lim_end['bandwidth_measured'] / 1e9:.0f} GB/s copy; {lim['peak_flops_measured'] / 1e12:.2f} / "
             f"{lim_end['peak_flops_measured'] / 1e12:.2f} TFLOP/s bf16 matmul (the start bandwidth is used)"],
        ]
        md += table(["quantity", "value"], rows)
        md += ["", "Matmul rates use the tokens / rows that actually went through the model in the profiled run "
               "(module hooks), FLOPs = 2 x weights; the attention's own FLOPs are in the SDPA row, not here."]
    md_text = "\n".join(md) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md_text)
    print(md_text)
    print(f"wrote {args.out} ({total_s:.0f} s)")


if __name__ == "__main__":
    main()
