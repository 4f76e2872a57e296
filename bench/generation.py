"""Generation throughput: comptrust's engine vs a DecodingTrust-style reference loop, same model, same prompts.

The reference loop imitates the HF client behind DecodingTrust (HELM fork): one generate() call per prompt
(batch size 1), sampling with temperature 1e-7 for t=0, output_scores + return_dict_in_generate, and a
per-token log-softmax / top-1 bookkeeping loop in Python. comptrust's engine runs the same prompts at batch
sizes 1, 8 and 32. Prints a table and, last, the speed-up of the best comptrust setting over the reference.

    python bench/generation.py [--prompts 64] [--max-new-tokens 64] [--dtype bfloat16] [--skip-reference]
"""

from __future__ import annotations


# before torch is imported (comptrust sets the same default): spin-waiting OpenMP threads slow a shared CPU ~30x
import comptrust  # noqa: E402,F401 -- before torch: sets OpenMP's waiting (see comptrust/__init__.py)

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from comptrust.data_sources import mini_dir  # noqa: E402
from comptrust.engine.hf import HFEngine  # noqa: E402
from comptrust.models import resolve  # noqa: E402
from comptrust.perspectives.base import EvalOptions  # noqa: E402
from comptrust.perspectives.stereotype import Stereotype  # noqa: E402
from comptrust.types import GenParams, Prompt  # noqa: E402

SHARED_DT = Path(__file__).resolve().parents[2] / "shared" / "data" / "decodingtrust"


def stereotype_prompts(k: int, max_new: int) -> list[Prompt]:
    root = SHARED_DT if SHARED_DT.is_dir() else mini_dir()
    items = Stereotype().load(EvalOptions(data_dir=root, limit=max(1, (k + 2) // 3))).items[:k]
    return [Prompt(messages=it.prompt.messages, params=GenParams(max_new_tokens=max_new)) for it in items]


def reference_loop(engine: HFEngine, prompts: list[Prompt]) -> tuple[float, int]:
    """bs=1, temperature 1e-7 sampling, scores on, per-token log-softmax in Python (the harness's style)."""
    model, tok = engine.model, engine.tok
    n_tokens = 0
    t0 = time.time()
    for p in prompts:
        text = engine.render(p)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).to(engine.device)
        with torch.no_grad():
            out = model.generate(
                **ids,
                do_sample=True,
                temperature=1e-7,
                top_p=1.0,
                max_new_tokens=p.params.max_new_tokens,
                num_return_sequences=1,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id,
                eos_token_id=engine.eos_ids,
            )
        seqs = out.sequences[:, ids["input_ids"].shape[1] :]
        # the harness computes per-token log-probs and the top-1 alternative for every generated token
        logprobs = []
        for step, scores in enumerate(out.scores):
            lp = torch.nn.functional.log_softmax(scores.float(), dim=-1)
            chosen = seqs[0, step]
            top = torch.topk(lp[0], k=1)
            logprobs.append((lp[0, chosen].item(), top.indices[0].item()))
        text_out = tok.decode(seqs[0])
        n = len(seqs[0])
        for k, t in enumerate(seqs[0].tolist()):
            if t in engine.eos_ids:
                n = k
                break
        n_tokens += n
        _ = text_out
    return time.time() - t0, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

    model = resolve(None)
    prompts = stereotype_prompts(args.prompts, args.max_new_tokens)
    rows = []
    eng = HFEngine(model, dtype=args.dtype, batch_size=32)
    _ = eng.model
    eng.generate(prompts[:2])  # warm-up
    print(f"model {model.name} dtype {eng.dtype} device {eng.device} threads {torch.get_num_threads()}; "
          f"{len(prompts)} stereotype prompts, max_new_tokens {args.max_new_tokens}, greedy", flush=True)
    if not args.skip_reference:
        secs, ntok = reference_loop(eng, prompts)
        rows.append(("reference loop (bs=1, scores on)", secs, ntok))
        print(f"  reference: {secs:.1f} s, {ntok} tokens", flush=True)
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        eng.batch_size = bs
        t0 = time.time()
        gens = eng.generate(prompts)
        secs = time.time() - t0
        ntok = sum(sum(g.n_tokens) for g in gens)
        rows.append((f"comptrust engine bs={bs}", secs, ntok))
        print(f"  bs={bs}: {secs:.1f} s, {ntok} tokens", flush=True)

    print()
    print("| setting | wall s | items/s | generated tokens | tokens/s |")
    print("|---|---|---|---|---|")
    for name, secs, ntok in rows:
        print(f"| {name} | {secs:.1f} | {len(prompts) / secs:.2f} | {ntok} | {ntok / secs:.1f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "dtype": eng.dtype, "prompts": len(prompts),
                                         "max_new_tokens": args.max_new_tokens, "peak_rss_mib": peak}, indent=2))
    if not args.skip_reference:
        ref = rows[0][1]
        best = min(r[1] for r in rows[1:])
        print(f"speed-up (items/s, best comptrust setting vs reference loop): {ref / best:.1f}x")


if __name__ == "__main__":
    main()
