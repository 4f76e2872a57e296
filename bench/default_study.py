"""Wall time of the default study (`comptrust study`: 8 variants x 9 mini suites on the embedded model), per unit
and in total, from a fresh $COMPTRUST_HOME and then rerun with a fresh --out but the same home (what the study
cache in $COMPTRUST_HOME/study-cache saves: compressed checkpoints and generations).

    python bench/default_study.py                          # fresh home in a temp dir, then a rerun
    python bench/default_study.py --home ~/.cache/comptrust --runs 1
    python bench/default_study.py --study study.yaml --out bench/results/default_study_cpu_new

Each run is the real CLI in a subprocess (its start-up, model loads and report included). Per-unit seconds are
the ones the study stores for each unit (an evaluation's time is shared evenly by the perspectives generated in one
engine call). The load average is printed beside each run: on a shared 2-core machine it moves the figures 2-3x.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "?"


def units(out: Path) -> list[tuple[str, str, float]]:
    db = sqlite3.connect(out / "comptrust.sqlite")
    try:
        return [(u, s, sec or 0.0) for u, s, sec in db.execute("SELECT id, status, seconds FROM units ORDER BY rowid")]
    except sqlite3.OperationalError:  # another layout: column names differ
        cols = [r[1] for r in db.execute("PRAGMA table_info(units)")]
        key = "unit" if "unit" in cols else cols[0]
        return [(u, s, sec or 0.0) for u, s, sec in db.execute(f"SELECT {key}, status, seconds FROM units")]
    finally:
        db.close()


def run_once(study: str | None, out: Path, home: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "comptrust", "study", *([study] if study else []), "--out", str(out), "--no-progress",
           *extra]
    env = dict(os.environ, COMPTRUST_HOME=str(home))
    before = load()
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"error: {' '.join(cmd)} exited with {p.returncode}")
    rows = units(out)
    return {"cmd": " ".join(cmd), "wall_s": round(wall, 1), "load_before": before, "load_after": load(),
            "units": [{"unit": u, "status": s, "seconds": round(sec, 1)} for u, s, sec in rows],
            "reused": sum("reused" in line for line in p.stderr.splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", help="a study file (default: the default study)")
    ap.add_argument("--home", type=Path, help="COMPTRUST_HOME to use (default: a fresh temporary one)")
    ap.add_argument("--runs", type=int, default=2, help="1: fresh home only; 2 (default): then a rerun, same home")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here (a folder; default: print only)")
    ap.add_argument("extra", nargs="*", help="more `comptrust study` options, after --")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ct-default-study-"))
    home = a.home or work / "home"
    if a.home is None:
        # the converted embedded model is not part of what a study computes: seed it from the default home if there
        src = Path(os.environ.get("COMPTRUST_HOME") or Path.home() / ".cache" / "comptrust") / "models"
        if src.is_dir():
            (home / "models").parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(src), str(home / "models")], check=False)
    results = []
    for i in range(a.runs):
        r = run_once(a.study, work / f"run{i + 1}", home, a.extra)
        r["run"] = "fresh home" if i == 0 and a.home is None else f"run {i + 1}, same home"
        results.append(r)
        print(f"\n== {r['run']}: {r['wall_s']:.0f} s wall (load {r['load_before']} -> {r['load_after']}), "
              f"{r['reused']} checkpoints reused")
        print(f"{'unit':<48} {'status':<8} {'s':>8}")
        for u in r["units"]:
            print(f"{u['unit']:<48} {u['status']:<8} {u['seconds']:>8.1f}")
        comp = sum(u["seconds"] for u in r["units"] if u["unit"].startswith("compress:"))
        ev = sum(u["seconds"] for u in r["units"] if u["unit"].startswith("eval:"))
        print(f"{'total: compress / evaluate / wall':<48} {'':<8} {comp:.0f} / {ev:.0f} / {r['wall_s']:.0f}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "default_study.json").write_text(json.dumps(results, indent=2))
        print(f"\nwritten {a.out / 'default_study.json'}")


if __name__ == "__main__":
    main()
