"""`comptrust study` and `comptrust report`. Errors are raised; cli.main() prints them as one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from comptrust.errors import UsageError

STUDY_HELP = """Compress a model several ways, evaluate every variant, and compare them with the dense model.

With no STUDY file: the embedded model; variants dense, gptq 8/4/3-bit, awq 4-bit,
magnitude / sparsegpt / wanda 2:4; all nine perspectives on the built-in mini suites
(about 45 minutes on a 2-core CPU, most of it AWQ and the evaluations).

[bold]Resumable[/bold]: each unit (compress a variant; evaluate a variant on a perspective) is
committed to DIR/comptrust.sqlite when it finishes. Interrupt at any time and rerun the
same command: done units are skipped, failed ones retried. A unit that fails is recorded
with its error and the study goes on.

[bold]Output[/bold] in DIR: report.html (one file: recommendation, score table, delta heatmap
with significance, radar per variant, score vs bits / sparsity, refusal rates,
breakdowns, provenance), results.csv (one row per variant), results.json, models/
(the compressed checkpoints).

[bold]Examples[/bold]
  comptrust study --out runs/study                 # the default study
  comptrust study --init study.yaml                # write a commented example, then edit it
  comptrust study --preset dct-llama2-13b-chat --out runs/paper   # the paper's grid for LLAMA2 13b Chat
  comptrust study --init --preset dct-llama2-13b-chat             # print that preset as a study file
  comptrust study study.yaml --out runs/my-study
  comptrust study --status runs/my-study           # done / pending / failed units
  comptrust study study.yaml --out runs/s --workers 1    # one unit at a time, in this process
  comptrust study study.yaml --out runs/s --executor ray --workers 2   # units as Ray tasks
  comptrust study study.yaml --out runs/a --adaptive   # add items only where a verdict is undecided
  comptrust report runs/my-study                   # rebuild the report from the store

[bold]Verdicts[/bold]: a variant keeps trust on a perspective when the one-sided (1 - alpha) lower
confidence bound of (variant - dense) on its worst seed is above -budget; the recommendation is
the most compressed variant that keeps every perspective (study key decision: point for the
point-estimate rule). Undecided cells are named with the items that would decide them.
"""


def study_command(
    spec_file: Optional[Path] = typer.Argument(None, metavar="[STUDY.yaml]", help="The study to run; omit for the default study."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study directory (created; rerun with the same one to resume)."),
    init: bool = typer.Option(False, "--init", help="Write a commented example study to STUDY.yaml (default study.yaml) and exit; with --preset and no STUDY.yaml, print the preset's study file."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Start from a preset: dct-llama2-13b-chat, dct-llama2-13b or dct-vicuna-13b (Decoding Compressed Trust's grid for that model: GPTQ/AWQ 8/4/3-bit, magnitude/SparseGPT/Wanda 2:4, 4:8, 1:2, full DecodingTrust data). A STUDY.yaml given too overrides its keys."),
    status: Optional[Path] = typer.Option(None, "--status", help="Print the units of the study in this directory (done / pending / failed) and exit."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bars (default: when stderr is a terminal)."),
    executor: str = typer.Option("local", "--executor", help="local: units on this machine, in --workers processes side by side (1: one after another in this process); ray: units as Ray tasks over a cluster (this process alone writes the store)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (e.g. auto, or 10.0.0.1:6379); default: start a local one."),
    workers: Optional[int] = typer.Option(None, "--workers", help="local: worker processes, each running one unit at cores/N threads (default on a CPU: one per core where the memory holds them, e.g. 2 on 2 cores, a compression beside an evaluation; 1 on a GPU). ray: size of the local Ray cluster in CPUs (one unit per CPU; default: all cores); GPUs are used one per unit when present."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Where compressed checkpoints go (default DIR/models); with Ray on several nodes, a path every node can read."),
    mlflow: bool = typer.Option(False, "--mlflow", help="Log the study (its keys, every variant's scores, deltas, CIs, refusal rates; results.json, results.csv, report.html) to MLflow (MLFLOW_TRACKING_URI; default ./mlruns, a local file store). Needs mlflow-skinny."),
    wandb: bool = typer.Option(False, "--wandb", help="The same to Weights & Biases (WANDB_PROJECT; WANDB_MODE=offline). Needs wandb."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Evaluate in rounds (looks) of further items, only for (variant, perspective) pairs still undecided, until decided or the pool is spent; group-sequential (O'Brien-Fleming-type alpha spending), so repeated looks keep the false-keep rate <= alpha. Settings: the study key 'adaptive'. Rounds in DIR/rounds, summary in DIR/adaptive.json."),
) -> None:
    from comptrust.study.spec import example_yaml, load_spec

    if init and preset:
        from comptrust.study.presets import preset_yaml

        text = preset_yaml(preset)
        if spec_file is None:
            typer.echo(text, nl=False)
            return
    if init:
        target = spec_file or Path("study.yaml")
        if target.exists():
            raise UsageError(f"{target} already exists; choose another name or remove it")
        try:
            target.write_text(text if preset else example_yaml(), encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot write {target}: {e.strerror}") from None
        typer.echo(f"wrote {target}; edit it, then: comptrust study {target} --out runs/my-study")
        return
    if status is not None:
        _print_status(status)
        return
    if out is None:
        raise UsageError("--out DIR is required: the study directory to write (or resume)")
    if executor not in ("local", "ray"):
        raise UsageError(f"--executor {executor!r}: choose local or ray")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if executor == "local" and ray_address:
        raise UsageError("--ray-address needs --executor ray")
    from comptrust import tracking

    tracking.check(mlflow=mlflow, wandb=wandb)
    spec = load_spec(spec_file, preset=preset)
    from comptrust.extras import require

    # before any unit runs: compressions need [compress], the report written at the end needs [report]
    needed = ["report"] + (["compress"] if any(not (v.is_dense or v.is_gguf) for v in spec.variants) else [])
    require("this study", *needed)
    if adaptive or spec.adaptive is not None:
        if executor != "local" or models_dir or workers:
            raise UsageError("--adaptive runs in this process with DIR/models (no --executor ray, --workers, "
                             "--models-dir)")
        from comptrust.study.adaptive import Settings, run_adaptive

        doc = run_adaptive(spec, out, Settings.of(spec.adaptive or True), progress=progress)
        _print_adaptive(out, doc)
        _track(out, mlflow, wandb)
        return
    # llm-compressor's per-layer bars and log lines, transformers' and torch's warnings: into DIR/comptrust.log
    from comptrust.evaluate import check_out_dir
    from comptrust.logs import third_party_to_log
    from comptrust.study.runner import run_study

    with third_party_to_log(check_out_dir(Path(out)) / "comptrust.log"):  # check_out_dir: one-line errors
        analysis = run_study(spec, out, progress=progress, executor=executor, ray_address=ray_address,
                             workers=workers, models_dir=models_dir)
    _print_summary(out, analysis)
    _track(out, mlflow, wandb)


def _track(out: Path, mlflow: bool, wandb: bool) -> None:
    if not (mlflow or wandb):
        return
    from comptrust import tracking

    for line in tracking.log_study(out, mlflow=mlflow, wandb=wandb):
        print(f"[study] logged to {line}", file=sys.stderr)


def _print_adaptive(out: Path, doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"adaptive study: final verdicts ({doc['generated']} generations)")
    for col in ("variant", "perspective", "verdict", "look", "items", "delta", "lower bound", "flags"):
        t.add_column(col)
    for key, c in doc["final"].items():
        n, p = key.rsplit(":", 1)
        v = c["verdict"]
        t.add_row(n, p, str(v.get("verdict")), str(c["look"]), str(v.get("n")),
                  "" if v.get("delta") is None else f"{v['delta']:+.1f}",
                  "" if v.get("lcb") is None else f"{v['lcb']:+.1f}", ", ".join(c.get("flags") or []))
    c = Console(width=None if sys.stdout.isatty() else 240)  # piped: whole cells, as _print_summary
    c.print(t)
    c.print(doc["recommendation"]["text"])
    c.print(f"rounds: {out / 'rounds'}  ·  {out / 'adaptive.json'}")


def _print_status(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from comptrust.store import STORE_NAME, Store
    from comptrust.study.plan import Plan, load_study

    spec = load_study(out)
    if not (out / STORE_NAME).is_file():
        raise UsageError(f"{out} has no {STORE_NAME}: the study never ran there")
    with Store(out / STORE_NAME, readonly=True) as store:  # a query: works on read-only media, never writes
        rows = Plan.of(spec).status(store.units())
    t = Table(title=f"study units in {out}")
    for col in ("unit", "status", "seconds", "error"):
        t.add_column(col)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        t.add_row(r["unit"], r["status"], "" if r["seconds"] is None else f"{r['seconds']:.1f}", r["error"] or "")
    c = Console()
    c.print(t)
    c.print(", ".join(f"{v} {k}" for k, v in counts.items()))


def _print_summary(out: Path, analysis: dict, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from comptrust.report import COLUMN_ORDER

    variants = analysis["variants"]
    persp = [p for p in COLUMN_ORDER if any(p in v["perspectives"] for v in variants.values())]
    t = Table(title="study results (mean over seeds; delta vs dense; verdict)")
    t.add_column("variant")
    for p in persp:
        t.add_column(p, justify="right")
    for name, v in variants.items():
        cells = []
        for p in persp:
            c = v["perspectives"].get(p, {})
            if c.get("mean") is None:
                cells.append("failed" if c.get("errors") else "-")
            elif name == analysis["dense"]:
                cells.append(f"{c['mean']:.1f}")
            else:
                vd = (c.get("verdict") or {}).get("verdict")
                mark = {"keeps": " keeps", "loses": " loses", "undecided": " undecided"}.get(vd, "")
                if c.get("flags"):
                    mark += " \\[" + ", ".join(c["flags"]) + "]"  # a literal "[", not rich markup
                cells.append(f"{c['mean']:.1f} ({c.get('delta', 0):+.1f}{'*' if c.get('significant') else ''}){mark}")
        t.add_row(name, *cells)
    # piped (nohup, Slurm logs): rich would cut every cell to 80 columns (`unde…`); wide enough for 9 perspectives
    c = console or Console(width=None if sys.stdout.isatty() else 240)
    c.print(t)
    c.print(analysis["recommendation"]["text"])
    counts = _unit_counts(out)
    if counts:  # failed units said as failed (the table shows their cells as 'failed'), not folded into 'done'
        c.print("units: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    c.print(f"report: {out / 'report.html'}  ·  {out / 'results.csv'}")


def _unit_counts(out: Path) -> dict[str, int]:
    """done / failed / blocked / pending units of the study in `out` (empty when it cannot be read)."""
    from comptrust.store import STORE_NAME, Store
    from comptrust.study.plan import Plan, load_study

    try:
        spec = load_study(out)
        with Store(out / STORE_NAME, readonly=True) as store:
            rows = Plan.of(spec).status(store.units())
    except Exception:  # a summary line is never worth failing a finished study over
        return {}
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    order = ["done", "failed", "blocked", "stale", "pending"]
    return dict(sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def report_command(out: Path = typer.Argument(..., metavar="DIR", help="A study directory.")) -> None:
    """Rebuild report.html, results.csv and results.json of a study from its store."""
    from comptrust.extras import require
    from comptrust.study.runner import write_report

    require("comptrust report", "report")

    analysis = write_report(out)
    _print_summary(out, analysis)


def register(app: typer.Typer) -> None:
    app.command("study", help=STUDY_HELP)(study_command)
    app.command("report")(report_command)
