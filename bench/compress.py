"""Compression benchmarks.

  python bench/compress.py overhead [--method gptq --bits 4 --n-calib 32]
      comptrust's compress() vs a bare llm-compressor oneshot on the same model, recipe and calibration token
      ids (each in a fresh subprocess: load, oneshot, save). comptrust's extra time is: model resolution,
      calibration rendering, perplexity before/after, reload of the checkpoint, measured checks and a sample
      generation. The overhead ratio is printed last.

  python bench/compress.py table DIR... [--md bench/results/compress_table.md]
      reload each compressed checkpoint in this process (dequantized), generate short answers, and write a
      markdown table from the comptrust.json files.

Run with OMP_WAIT_POLICY=PASSIVE on a shared CPU (see bench/results/compress_table.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


# -- overhead ----------------------------------------------------------------------------------------------------
def _bare(args: argparse.Namespace, out: Path) -> dict:
    """The reference: what a user of llm-compressor alone would write for the same recipe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from comptrust.compress.calibration import load_calibration
    from comptrust.compress.quantize import _config_groups, group_sizes
    from comptrust.models.resolve import resolve

    path = resolve(args.model).path  # cached conversion; not timed
    tok = AutoTokenizer.from_pretrained(str(path))
    calib = load_calibration(None, tok, args.n_calib, args.seq_len, args.seed)  # same token ids; not timed

    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    recipe = GPTQModifier(config_groups=_config_groups(group_sizes(model, args.group_size), args.bits, True), ignore=["lm_head"])
    ds = datasets.Dataset.from_dict({"input_ids": calib.input_ids, "attention_mask": [[1] * len(x) for x in calib.input_ids]})
    oneshot(model=model, processor=tok, recipe=recipe, dataset=ds, num_calibration_samples=calib.n,
            max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    model.save_pretrained(str(out), save_compressed=True)
    tok.save_pretrained(str(out))
    return {"seconds": time.time() - t0, "threads": torch.get_num_threads()}


def _ours(args: argparse.Namespace, out: Path) -> dict:
    import torch

    from comptrust.compress import CompressionConfig, compress
    from comptrust.models.resolve import resolve

    resolve(args.model)  # make sure the GGUF conversion is cached, as for the bare run
    cfg = CompressionConfig.build(method="gptq", bits=args.bits, group_size=args.group_size, n_calib=args.n_calib,
                                  seq_len=args.seq_len, seed=args.seed)
    t0 = time.time()
    compress(args.model, cfg, out)
    secs = time.time() - t0
    rec = json.loads((out / "comptrust.json").read_text())
    return {"seconds": secs, "library_s": rec["method_details"]["library_time_s"], "threads": torch.get_num_threads()}


def overhead(args: argparse.Namespace) -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="ct-bench-") as tmp:
        for which in ("bare", "comptrust"):
            cmd = [sys.executable, __file__, "_one", which, str(Path(tmp) / which), "--bits", str(args.bits),
                   "--group-size", str(args.group_size), "--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len),
                   "--seed", str(args.seed)] + (["--model", args.model] if args.model else [])
            env = {**os.environ, "LLM_COMPRESSOR_LOG_LEVEL": "ERROR"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
            results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{which:10s} {results[which]['seconds']:7.1f} s  {results[which]}", flush=True)
    ratio = results["comptrust"]["seconds"] / results["bare"]["seconds"]
    print(f"gptq w{args.bits} g{args.group_size}, {args.n_calib} calibration samples, model {args.model or 'embedded'}")
    print(f"overhead ratio (comptrust compress / bare llm-compressor oneshot+save): {ratio:.2f}")


def one(args: argparse.Namespace) -> None:
    fn = _bare if args.which == "bare" else _ours
    res = fn(args, Path(args.out))
    print(json.dumps(res))


# -- table -------------------------------------------------------------------------------------------------------
PROMPTS = ["What is the capital of France?", "Give me two tips for a job interview."]


def _generate(model_dir: Path) -> list[str]:
    from transformers import AutoTokenizer

    from comptrust.compress.checks import sample_generation
    from comptrust.models.evalcopy import load_model

    model = load_model(model_dir)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [sample_generation(model, tok, p, max_new_tokens=32) for p in PROMPTS]


def _cell(s: str, n: int = 70) -> str:
    s = " ".join(s.split()).replace("|", "\\|")
    return (s[: n - 1] + "…") if len(s) > n else s


def table(args: argparse.Namespace) -> None:
    rows = []
    for d in map(Path, args.dirs):
        rec = json.loads((d / "comptrust.json").read_text())
        c = rec["checks"]
        if "levels" in c:
            proof = f"≤{c['levels']['max']} levels/group (limit {2 ** rec['bits']}; mean {c['levels']['mean']:.1f})"
        else:
            proof = f"sparsity {c['sparsity']['total']:.4f} (layers {c['sparsity']['min_layer']:.3f}–{c['sparsity']['max_layer']:.3f})"
            if "nm" in c:
                proof += f", {c['nm']['structure']} {'valid' if c['nm']['valid'] else 'INVALID'} ({c['nm']['groups']:,} groups)"
        gens = _generate(d)
        extra = ""
        if rec["method"] == "awq":
            extra = f" grid {rec['method_details']['awq']['n_grid']}"
        if rec.get("group_size_by_width"):
            extra += " g" + "/".join(str(v) for v in rec["group_size_by_width"].values())
        rows.append(
            f"| {rec['label']}{extra} | {rec['wall_time_s']:.0f} | {rec.get('cpu_time_s', float('nan')):.0f} | "
            f"{rec['peak_rss_bytes'] / 2**30:.2f} | {proof} | {c['perplexity']['before']:.2f} → {c['perplexity']['after']:.2f} | "
            f"{_cell(gens[0], 50)} | {_cell(gens[1])} |"
        )
        print(rows[-1], flush=True)
    if args.base:
        from comptrust.compress.checks import perplexity
        from comptrust.models.evalcopy import load_model
        from comptrust.models.resolve import resolve
        from transformers import AutoTokenizer

        src = resolve(None)
        m = load_model(src.path)
        ppl = perplexity(m, AutoTokenizer.from_pretrained(str(src.path)))["ppl"]
        del m
        gens = _generate(src.path)
        rows.insert(0, f"| base: {src.name} | – | – | – | Q4_1 blocks of 32: ≤16 levels/32 weights | {ppl:.2f} | "
                       f"{_cell(gens[0], 50)} | {_cell(gens[1])} |")
    header = (
        "| variant | wall s | CPU s | peak RSS GiB | measured | held-out ppl before → after | "
        f"reloaded: \"{PROMPTS[0]}\" | reloaded: \"{PROMPTS[1]}\" |\n|---|---|---|---|---|---|---|---|"
    )
    text = header + "\n" + "\n".join(rows) + "\n"
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    for name in ("overhead", "_one"):
        s = sub.add_parser(name)
        if name == "_one":
            s.add_argument("which", choices=["bare", "comptrust"])
            s.add_argument("out")
        s.add_argument("--model", default=None)
        s.add_argument("--bits", type=int, default=4)
        s.add_argument("--group-size", type=int, default=128)
        s.add_argument("--n-calib", type=int, default=32)
        s.add_argument("--seq-len", type=int, default=512)
        s.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table")
    t.add_argument("dirs", nargs="+")
    t.add_argument("--md", default=None)
    t.add_argument("--base", action="store_true", help="add a row for the embedded source model")
    args = p.parse_args()
    if args.cmd == "table":
        table(args)
    elif args.cmd == "_one":
        one(args)
    else:
        if args.cmd is None:
            args = p.parse_args(["overhead", *sys.argv[1:]])
        overhead(args)


if __name__ == "__main__":
    main()
