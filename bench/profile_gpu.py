"""Where one decode step's time goes on a GPU, and what each attention path costs.

For a random-weight Llama-2 architecture (bench/throughput.py's) at R rows with a static KV cache of W slots of
which C are visible (the engine's static loop mid-way through a batch), this prints:

1. the Triton decode-attention kernel against PyTorch SDPA on the same inputs (max abs difference), for MHA and
   grouped-KV shapes with left padding;
2. attention alone, per layer: SDPA with a mask (what transformers runs) vs the Triton kernel, time and the
   bandwidth reached on the K/V bytes the row actually needs;
3. the layer's matmuls alone at R rows (q, k, v, o, gate, up, down, lm_head), and q|k|v and gate|up fused;
4. one whole decode step under torch.profiler (CUDA kernel time by category), for each attention path, and the
   step time as a CUDA-graph replay (what the engine runs).

    python bench/profile_gpu.py --arch llama2-7b-random --tokenizer .carry/tp/tok --rows 64 --width 288 --visible 224

Writes <out-dir>/profile_gpu_<arch>.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402

import comptrust.engine.attention as attnmod  # noqa: E402
from comptrust.engine import triton_attn  # noqa: E402
from comptrust.engine.prefill import init_static_layer  # noqa: E402


def cuda_time(fn, reps: int = 50, graph: bool = True) -> float:
    """Mean seconds per call, by CUDA events, after warm-up. graph: the reps are captured as one CUDA graph
    and replayed, so a kernel of a few microseconds is not timed as its Python launch (a first version of this
    script timed launches: it had q, k, v matmuls at 1.4-1.7 TB/s that ran as fast as a fused one in the engine)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3 / reps
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def sdpa_ref(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None, None, :])


def check_kernel(lines: list[str]) -> None:
    lines.append("## 1. Triton decode kernel vs SDPA (max abs difference, bf16 inputs)\n")
    lines.append("| B | Hq | Hkv | T | D | left pad | max abs diff | max abs value |")
    lines.append("|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for b, hq, hkv, t, d in [(3, 4, 4, 70, 64), (5, 9, 3, 300, 64), (64, 32, 32, 288, 128), (8, 32, 8, 1030, 128),
                             (2, 16, 2, 17, 128), (4, 8, 1, 513, 256)]:
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
        starts = torch.randint(0, max(t // 2, 1), (b,), device="cuda", generator=g)
        ends = torch.randint(t // 2 + 1, t + 1, (b,), device="cuda", generator=g)
        ar = torch.arange(t, device="cuda")
        mask = (ar[None] >= starts[:, None]) & (ar[None] < ends[:, None])
        ref = sdpa_ref(q.float(), k.float(), v.float(), mask)
        out = triton_attn.decode_attention(q, k, v, mask).float()
        err = (out - ref).abs().max().item()
        lines.append(f"| {b} | {hq} | {hkv} | {t} | {d} | yes | {err:.2e} | {ref.abs().max().item():.2f} |")
        assert err < 3e-2, (b, hq, hkv, t, d, err)


def attention_micro(lines, cfg, rows, width, visible_list, bw):
    hq, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    hkv = cfg.num_key_value_heads
    lines.append(f"\n## 2. Attention alone, one layer, {rows} rows, static cache of {width} slots\n")
    lines.append("| visible slots | K/V bytes needed (MiB) | SDPA + mask us | GB/s | Triton us | GB/s | speed-up |")
    lines.append("|---|---|---|---|---|---|---|")
    q = torch.randn(rows, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(rows, hkv, width, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ar = torch.arange(width, device="cuda")
    for vis in visible_list:
        mask = (ar < vis)[None].expand(rows, width).contiguous()
        m4 = mask[:, None, None, :]
        need = 2 * rows * hkv * vis * d * 2
        kk, vv = (k, v) if hq == hkv else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
        t_sdpa = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=m4))
        t_tri = cuda_time(lambda: triton_attn.decode_attention(q, k, v, mask))
        lines.append(f"| {vis} | {need / 2**20:.1f} | {t_sdpa * 1e6:.1f} | {need / t_sdpa / 1e9:.0f} | "
                     f"{t_tri * 1e6:.1f} | {need / t_tri / 1e9:.0f} | {t_sdpa / t_tri:.2f}x |")


def sweep_triton(lines, cfg, rows, width, visible) -> None:
    """Launch settings of the Triton kernel at this shape; the fastest at `visible` slots is kept."""
    hq, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    hkv = cfg.num_key_value_heads
    q = torch.randn(rows, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(rows, hkv, width, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = (torch.arange(width, device="cuda") < visible)[None].expand(rows, width).contiguous()
    need = 2 * rows * hkv * visible * d * 2
    lines.append(f"\n### Triton launch settings at {visible} visible slots\n")
    lines.append("| BT | warps | programs/SM | stages | us | GB/s |")
    lines.append("|---|---|---|---|---|---|")
    best = None
    import itertools

    for bt, warps, per_sm, stages in itertools.product((32, 64, 128), (1, 2, 4), (8, 32, 64), (1, 2, 3)):
        triton_attn.set_tuning(bt, warps, per_sm, stages)
        try:
            t = cuda_time(lambda: triton_attn.decode_attention(q, k, v, mask))
        except Exception as e:  # e.g. out of shared memory
            lines.append(f"| {bt} | {warps} | {per_sm} | {stages} | failed: {type(e).__name__} | |")
            continue
        lines.append(f"| {bt} | {warps} | {per_sm} | {stages} | {t * 1e6:.1f} | {need / t / 1e9:.0f} |")
        if best is None or t < best[0]:
            best = (t, bt, warps, per_sm, stages)
    triton_attn.set_tuning(*best[1:])
    lines.append(f"\nKept BT={best[1]}, warps={best[2]}, programs/SM={best[3]}, stages={best[4]}.")


class DecodeStep:
    """One decode step at `rows` rows on a static cache of `width` slots (random K/V) of which `visible` are
    visible, as the engine's static loop runs it mid-batch; `reset()` rewinds the cache's write position."""

    def __init__(self, model, rows: int, width: int, visible: int, fwd=None):
        from transformers import StaticCache

        cfg = model.config
        hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
        self.cache = StaticCache(config=cfg, max_cache_len=width)
        for lay in self.cache.layers:
            kv = [torch.randn(rows, hkv, width, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            init_static_layer(lay, *kv)
        ar = torch.arange(width, device="cuda")
        self.mask = (ar < visible).view(1, 1, 1, width).expand(rows, 1, 1, width).contiguous()
        self.ids = torch.randint(0, cfg.vocab_size, (rows, 1), device="cuda")
        self.pos = torch.full((rows, 1), visible - 1, device="cuda")
        self.visible = visible
        self.fwd = fwd or model
        self.reset()

    def reset(self) -> None:
        for lay in self.cache.layers:
            lay.cumulative_length.fill_(self.visible - 1)

    def __call__(self):
        return self.fwd(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                        past_key_values=self.cache, use_cache=True).logits

    def graph_seconds(self) -> float:
        """The step captured as a CUDA graph (after a warm-up on a side stream, as the engine does): seconds per
        replay, the cache rewinds subtracted."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self.reset()
            self()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self()
        t = cuda_time(lambda: (self.reset(), graph.replay()), reps=30, graph=False)
        return t - cuda_time(self.reset, reps=30, graph=False)


def compiled_step(lines, model, rows, width, visible) -> None:
    """The same step through torch.compile (default mode: pointwise fusion, cuBLAS matmuls), then captured as
    a CUDA graph by hand as the engine does."""
    lines.append(f"\n## 5. The step under torch.compile (default mode), {rows} rows, {visible}/{width} visible\n")
    lines.append("| attention | compile s | CUDA-graph step ms | tok/s |")
    lines.append("|---|---|---|---|")
    for mode in ("sdpa", "auto"):
        attnmod.DECODE_ATTN = mode
        torch._dynamo.reset()
        step = DecodeStep(model, rows, width, visible, fwd=torch.compile(model.forward))
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                for _ in range(3):
                    step.reset()
                    step()
                torch.cuda.synchronize()
                secs = time.perf_counter() - t0
                t = step.graph_seconds()
            lines.append(f"| {mode} | {secs:.0f} | {t * 1e3:.2f} | {rows / t:.0f} |")
        except Exception as e:
            lines.append(f"| {mode} | failed: {type(e).__name__}: {str(e)[:150]} | | |")
        print(lines[-1], flush=True)
    torch._dynamo.reset()


def gemm_micro(lines, model, rows):
    lay = model.model.layers[0]
    a = lay.self_attn
    mlp = lay.mlp
    x = torch.randn(rows, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    xi = torch.randn(rows, model.config.intermediate_size, device="cuda", dtype=torch.bfloat16)
    lines.append(f"\n## 3. Matmuls alone at {rows} rows (weights bf16)\n")
    lines.append("| matmul | weight MiB | us | GB/s |")
    lines.append("|---|---|---|---|")
    total_sep = total_fused = 0.0

    def row(name, w, inp):
        t = cuda_time(lambda: torch.nn.functional.linear(inp, w))
        lines.append(f"| {name} | {w.numel() * 2 / 2**20:.0f} | {t * 1e6:.1f} | {w.numel() * 2 / t / 1e9:.0f} |")
        return t

    for name, w, inp in [("q", a.q_proj.weight, x), ("k", a.k_proj.weight, x), ("v", a.v_proj.weight, x),
                         ("o", a.o_proj.weight, x), ("gate", mlp.gate_proj.weight, x), ("up", mlp.up_proj.weight, x),
                         ("down", mlp.down_proj.weight, xi)]:
        total_sep += row(name, w, inp)
    qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous()
    gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
    total_fused += row("q|k|v fused", qkv, x)
    total_fused += row("o", a.o_proj.weight, x)
    total_fused += row("gate|up fused", gu, x)
    total_fused += row("down", mlp.down_proj.weight, xi)
    row("lm_head", model.lm_head.weight, x)
    lines.append(f"\nPer layer: separate {total_sep * 1e6:.0f} us, fused {total_fused * 1e6:.0f} us "
                 f"({total_sep / total_fused:.2f}x); x {model.config.num_hidden_layers} layers = "
                 f"{total_sep * model.config.num_hidden_layers * 1e3:.2f} / "
                 f"{total_fused * model.config.num_hidden_layers * 1e3:.2f} ms per step.")


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "gemv", "cutlass", "sm90_xmma", "cublas", "nvjet", "splitk")):
        return "matmul"
    if any(s in n for s in ("attention", "fmha", "flash", "_decode_split", "_decode_combine", "efficient")):
        return "attention"
    if any(s in n for s in ("topk", "sort", "softmax", "radix")):
        return "sampling / softmax"
    if any(s in n for s in ("index_copy", "indexing", "scatter", "gather", "fill")):
        return "cache writes / indexing"
    if any(s in n for s in ("copy", "cat")):
        return "copies"
    return "elementwise / norms / rope"


def step_profile(lines, model, rows, width, visible):
    step = DecodeStep(model, rows, width, visible)
    reset = step.reset

    model.set_attn_implementation(attnmod.ATTN_NAME)
    lines.append(f"\n## 4. One decode step of the whole model: {rows} rows, {visible} of {width} slots visible\n")
    results = {}
    for mode in ("sdpa", "auto"):
        attnmod.DECODE_ATTN = mode
        with torch.no_grad():
            for _ in range(3):
                reset()
                step()
            torch.cuda.synchronize()
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                    reset()
                torch.cuda.synchronize()
            cats: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            for ev in prof.key_averages():
                t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if t and ev.key and not ev.key.startswith(("ProfilerStep", "aten::", "cuda")):
                    cats[category(ev.key)] += t / 5 / 1e3  # ms per step
                    counts[category(ev.key)] += ev.count // 5
            t_step = step.graph_seconds()  # the same step as a CUDA graph
        results[mode] = (cats, counts, t_step)
    names = sorted({c for r in results.values() for c in r[0]})
    lines.append("| kernels (eager, CUDA time per step) | SDPA ms | kernels | Triton ms | kernels |")
    lines.append("|---|---|---|---|---|")
    for c in names:
        lines.append(f"| {c} | {results['sdpa'][0].get(c, 0):.2f} | {results['sdpa'][1].get(c, 0)} | "
                     f"{results['auto'][0].get(c, 0):.2f} | {results['auto'][1].get(c, 0)} |")
    lines.append(f"| **sum** | {sum(results['sdpa'][0].values()):.2f} | | {sum(results['auto'][0].values()):.2f} | |")
    lines.append(f"| **CUDA-graph step (wall)** | {results['sdpa'][2] * 1e3:.2f} | | {results['auto'][2] * 1e3:.2f} | |")
    lines.append(f"\nTokens/s at this step: SDPA {rows / results['sdpa'][2]:.0f}, Triton {rows / results['auto'][2]:.0f}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama2-7b-random")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--width", type=int, default=288)
    ap.add_argument("--visible", type=int, default=224)
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true", help="keep the Triton kernel's default launch settings")
    ap.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = ap.parse_args()
    lines = [f"# Decode-step profile: {args.arch} on {torch.cuda.get_device_name()}\n",
             f"`python bench/profile_gpu.py --arch {args.arch} --rows {args.rows} --width {args.width} "
             f"--visible {args.visible}`; torch {torch.__version__}.\n"]
    lim = tp.measure_limits("cuda")
    lines.append(f"Measured: {lim['bandwidth_measured'] / 1e9:.0f} GB/s copy bandwidth, "
                 f"{lim['peak_flops_measured'] / 1e12:.0f} TFLOP/s bf16.\n")
    check_kernel(lines)
    print("\n".join(lines), flush=True)
    _, model = tp.random_llama7b(args.tokenizer, "cuda", arch=args.arch)
    attnmod.register_attention()
    attention_micro(lines, model.config, args.rows, args.width, sorted({160, args.visible, args.width}),
                    lim["bandwidth_measured"])
    if not args.skip_sweep:
        sweep_triton(lines, model.config, args.rows, args.width, args.visible)
        attention_micro(lines, model.config, args.rows, args.width, [args.visible], lim["bandwidth_measured"])
    if not args.skip_gemm:
        gemm_micro(lines, model, args.rows)
    step_profile(lines, model, args.rows, args.width, args.visible)
    if args.compile:
        compiled_step(lines, model, args.rows, args.width, args.visible)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"profile_gpu_{args.arch}.md").write_text(text)


if __name__ == "__main__":
    main()
