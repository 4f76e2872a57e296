"""`comptrust toxicity-score`: score a JSONL file of texts with a toxicity scorer. Errors are raised
(UsageError / RuntimeFailure); cli.main() prints them as one line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from comptrust.errors import UsageError

HELP = """Score texts for toxicity: one {"text": ...} JSON object per line in, the same objects with
"toxicity" (a probability in [0, 1], or null where the text could not be scored) out.

[bold]Scorers[/bold] (--toxicity-scorer)
  [cyan]offline[/cyan]            default: alt-profanity-check + comptrust's lexicon
                     (identity attacks, dehumanising language, threats)
  [cyan]profanity-check[/cyan]    alt-profanity-check alone (bag of words)
  [cyan]lexicon[/cyan]            comptrust's lexicon alone
  [cyan]hf:MODEL\\[#LABEL][/cyan]   a Hugging Face classifier (Hub id or local dir),
                     e.g. hf:unitary/toxic-bert; GPU when present
  [cyan]perspective[/cyan]        the Perspective API, as DecodingTrust: key in
                     $PERSPECTIVE_API_KEY, $COMPTRUST_PERSPECTIVE_QPS
                     requests/s (default 1), scores cached (--cache)

bench/results/toxicity_agreement.md: how close the offline scorers are to
Perspective.

[bold]Examples[/bold]
  comptrust toxicity-score texts.jsonl --out scored.jsonl
  PERSPECTIVE_API_KEY=... comptrust toxicity-score texts.jsonl \\
      --out scored.jsonl --toxicity-scorer perspective
"""


def read_texts(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; a malformed line is a UsageError naming file:line."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror})") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    with f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise UsageError(f"{path}:{lineno}: expected a JSON object like {{\"text\": ...}}")
                if "text" not in rec:
                    raise UsageError(f"{path}:{lineno}: no \"text\" field")
                if rec["text"] is not None and not isinstance(rec["text"], str):
                    raise UsageError(f"{path}:{lineno}: \"text\" must be a string (or null)")
                rows.append((lineno, rec))
        except UnicodeDecodeError:
            raise UsageError(f"{path}:{lineno + 1}: not UTF-8 text") from None
    return rows


def toxicity_score_command(
    input_file: Path = typer.Argument(..., metavar="IN.jsonl", help="One JSON object with a \"text\" field per line."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the scored JSONL (replaced atomically)."),
    toxicity_scorer: str = typer.Option(
        "offline", "--toxicity-scorer", "-s", help="offline | profanity-check | lexicon | hf:MODEL\\[#LABEL] | perspective."
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Texts per scorer call (progress is reported per call)."),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="perspective only: the SQLite cache of scores (default $COMPTRUST_HOME/toxicity-cache.sqlite)."
    ),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress on stderr (default: when stderr is a terminal)."),
) -> None:
    from comptrust.toxicity_scorers import get_scorer

    if batch_size <= 0:
        raise UsageError(f"--batch-size {batch_size}: must be positive")
    rows = read_texts(input_file)
    options: dict[str, Any] = {}
    if cache is not None:
        if toxicity_scorer.strip() != "perspective":
            raise UsageError("--cache is for --toxicity-scorer perspective only")
        options["cache"] = cache
    scorer = get_scorer(toxicity_scorer, **options)
    show = sys.stderr.isatty() if progress is None else progress
    if show and hasattr(scorer, "progress"):  # a slow scorer (perspective, ~1 text/s) reports within a batch too
        last = [0.0]

        def tick(done: int, total: int) -> None:
            if time.monotonic() - last[0] >= 10 or done == total:
                last[0] = time.monotonic()
                typer.echo(f"[toxicity]   {done}/{total} requests in this batch", err=True)

        scorer.progress = tick
    texts = [rec["text"] if isinstance(rec["text"], str) else "" for _, rec in rows]
    scores: list[float | None] = []
    t0 = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        got = scorer.score(chunk)
        if len(got) != len(chunk):
            from comptrust.errors import RuntimeFailure

            raise RuntimeFailure(f"toxicity scorer '{scorer.name}' returned {len(got)} scores for {len(chunk)} texts")
        scores += got
        if show:
            rate = len(scores) / max(time.perf_counter() - t0, 1e-9)
            typer.echo(f"[toxicity] {len(scores)}/{len(texts)} texts ({rate:,.0f}/s)", err=True)
    wall = time.perf_counter() - t0

    def clean(v: Any) -> float | None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            return min(1.0, max(0.0, float(v)))
        return None

    values = [clean(v) for v in scores]
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for (_, rec), v in zip(rows, values):
                f.write(json.dumps({**rec, "toxicity": v}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write it ({e.strerror})") from None
    unscored = sum(v is None for v in values)
    toxic = sum(v is not None and v > 0.5 for v in values)
    typer.echo(
        f"scored {len(values) - unscored}/{len(values)} texts with '{scorer.name}' in {wall:.1f} s "
        f"({len(values) / max(wall, 1e-9):,.0f} texts/s); {toxic} above 0.5, {unscored} unscorable; wrote {out}",
        err=True,
    )


def register(app: typer.Typer) -> None:
    app.command("toxicity-score", help=HELP, no_args_is_help=True)(toxicity_score_command)
