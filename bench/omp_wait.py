"""OpenMP's waiting policy on the CPU path: the engine alone, and two engines at once, per GOMP_SPINCOUNT.

torch's Linux wheels use libgomp; between parallel regions its threads spin GOMP_SPINCOUNT times, then sleep. Each
setting runs a worker (32 DecodingTrust stereotype prompts, 32 new tokens, greedy, the embedded model, all cores)
once alone and then twice at the same time, each worker timing its own generate() after a warm-up. The question it
answers: how much a short spin gains alone, and what it costs when two comptrust processes share the cores.

    python bench/omp_wait.py [--counts 0,2000,6000,300000] [--prompts 32]

comptrust/__init__.py's default (GOMP_SPINCOUNT=2000) came from this; bench/results/omp_wait.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def worker(prompts: int) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    import peers  # the same items as bench/peers.py

    from comptrust.engine.hf import HFEngine
    from comptrust.models import resolve

    eng = HFEngine(resolve(None))
    items = peers.prompts_for(prompts, 32)
    eng.generate(items[:2])
    t = time.perf_counter()
    eng.generate(items)
    print(f"{time.perf_counter() - t:.2f}", flush=True)


def run(count: str, copies: int, prompts: int) -> list[float]:
    env = {**os.environ, "GOMP_SPINCOUNT": count}
    cmd = [sys.executable, __file__, "--worker", "--prompts", str(prompts)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(copies)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="0,2000,6000,300000")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.prompts)
        return
    print("| GOMP_SPINCOUNT | alone s | two at once s (each) |\n|---|---|---|")
    for c in a.counts.split(","):
        alone = run(c, 1, a.prompts)[0]
        pair = run(c, 2, a.prompts)
        print(f"| {c} | {alone:.2f} | {' / '.join(f'{x:.2f}' for x in pair)} |", flush=True)
    with open("/proc/loadavg") as f:
        print(f"\nload at the end: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
