"""Evaluate one model on a set of perspectives: load -> prompts -> (cached) generate -> parse -> score.

All prompts of all requested perspectives go to the engine in one call, so identical requests are generated
once and batches are as full as possible. Results land in the output directory:
  comptrust.sqlite    the store (generation cache + score history); reruns reuse it
  scores.json         per perspective: score, refusal rate, items, sub-scores, model fingerprint, options
  generations.jsonl   per item: prompt, outputs, parsed labels
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from comptrust import __version__
from comptrust import perspectives as registry
from comptrust.engine.cached import CachedEngine
from comptrust.errors import UsageError
from comptrust.perspectives.base import EvalOptions, Loaded, MissingData
from comptrust.store import Store
from comptrust.types import Record

STORE_NAME = "comptrust.sqlite"


@dataclass
class EvalResult:
    out_dir: Path
    scores: dict[str, dict[str, Any]]
    not_run: dict[str, str]
    stats: dict[str, Any]
    wall_seconds: float
    model: dict[str, Any] = field(default_factory=dict)
    records: dict[str, list[Record]] = field(default_factory=dict)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def check_out_dir(out: Path) -> Path:
    out = out.expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the output directory ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out}: the output directory is not writable")
    return out


def discard_if_unused(out: Path) -> bool:
    """Remove an --out folder this command created when it holds nothing computed: no files but the results
    database, and that one with no generations, scores or cached values. Returns whether it was removed."""
    import shutil
    import sqlite3

    out = out.expanduser()
    if not out.is_dir():
        return False
    store_files = {STORE_NAME + x for x in ("", "-wal", "-shm", "-journal")}
    if any(p.name not in store_files for p in out.iterdir()):
        return False
    db = out / STORE_NAME
    if db.exists():
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                rows = sum(con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                           for t in ("generations", "scores", "kv"))
            finally:
                con.close()
        except sqlite3.Error:
            return False  # unreadable: leave it for the user to look at
        if rows:
            return False
    shutil.rmtree(out, ignore_errors=True)
    return True


class _Progress:
    """A rich progress bar over generated prompts, with ETA and tokens/s; silent when not a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None
        self.tokens = 0
        self.t0 = time.time()

    def start(self, total: int, label: str) -> None:
        """Show the bar (once: later calls, one per perspective's generate call, keep it)."""
        if not self.enabled or total == 0 or self.bar is not None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("prompts"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"),
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(label, total=total, rate="")
        self.t0 = time.time()

    def advance(self, n: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            dt = max(time.time() - self.t0, 1e-6)
            self.bar.update(self.task, advance=n, rate=f"{self.tokens / dt:.0f} tok/s")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


LITE_LIMIT = 20  # items per sub-scenario in the lite profile unless a perspective sets lite_limit


def options_for(p: Any, opts: EvalOptions) -> EvalOptions:
    """The lite profile's default subsample size is per perspective (MMLU has 57 subjects, stereotype 3 types)."""
    if opts.profile == "lite" and opts.limit is None:
        return replace(opts, limit=getattr(p, "lite_limit", LITE_LIMIT))
    return opts


def load_perspectives(
    names: Sequence[str], opts: EvalOptions
) -> tuple[dict[str, tuple[Any, Loaded, EvalOptions]], dict[str, str]]:
    loaded: dict[str, tuple[Any, Loaded, EvalOptions]] = {}
    not_run: dict[str, str] = {}
    for name in names:
        p = registry.get(name)
        popts = options_for(p, opts)
        try:
            ld = p.load(popts)
        except MissingData as e:
            not_run[name] = str(e)  # names the file (or folder) and, where it helps, what else was looked for
            continue
        if not ld.items:
            not_run[name] = "no items to evaluate" + (f" ({'; '.join(ld.skipped)})" if ld.skipped else "")
            continue
        loaded[name] = (p, ld, popts)
    return loaded, not_run


@dataclass
class Prepared:
    """The perspectives of one run with their data loaded: what a run generates, checked before any model loads."""

    loaded: dict[str, tuple[Any, Loaded, EvalOptions]]
    not_run: dict[str, str]


def prepare(names: Sequence[str], opts: EvalOptions) -> Prepared:
    """Load the data of `names`; UsageError (exit 2) when no perspective has any, naming what was looked for where.

    A run in which nothing can be evaluated must not exit 0 with an empty result; a folder holding a ``data/``
    folder is most likely a DecodingTrust checkout's root, so the error says "did you mean DIR/data".
    Partial data stays a warning (printed by evaluate, listed in scores.json).
    """
    loaded, not_run = load_perspectives(names, opts)
    if not loaded:
        root = Path(opts.data_dir)
        hint = f"; did you mean {root / 'data'}?" if (root / "data").is_dir() else ""
        why = "; ".join(f"{n}: {w}" for n, w in not_run.items())
        raise UsageError(f"no data for any requested perspective in {root} ({why}){hint}")
    return Prepared(loaded, not_run)


def evaluate(
    engine: Any,
    model_info: dict[str, Any],
    names: Sequence[str],
    opts: EvalOptions,
    out_dir: Path,
    progress: bool | None = None,
    write_files: bool = True,
    store: Store | None = None,
    config: Any = None,
    prepared: Prepared | None = None,
) -> EvalResult:
    """Run `names` on `engine` (an Engine); write scores.json / generations.jsonl into out_dir.

    store: an open Store to use (a study shares one across models); default: out_dir/comptrust.sqlite.
    config: the comptrust.config.EvalConfig that made `opts`; scores.json records it and its fingerprint.
    prepared: what prepare(names, opts) returned, where the caller checked the data before loading the model.

    Each perspective meets the engine in its own generate call (never in a batch with another's prompts), so that
    its batches (hence, in bf16, its near-tied greedy choices and its score) are the same whichever other
    perspectives share the command.
    """
    t0 = time.time()
    out_dir = check_out_dir(out_dir)
    prepared = prepared or prepare(names, opts)
    loaded, not_run = prepared.loaded, dict(prepared.not_run)
    for name, why in not_run.items():
        print(f"warning: perspective '{name}' not run: {why}", file=sys.stderr)
    for name, (_, ld, _o) in loaded.items():
        if ld.skipped:
            first = ld.skipped[0] if len(ld.skipped[0]) < 120 else ld.skipped[0][:117] + "..."
            more = f" (+{len(ld.skipped) - 1} more; all listed under 'skipped' in scores.json)" if len(ld.skipped) > 1 else ""
            print(f"warning: {name}: parts skipped for missing files: {first}{more}", file=sys.stderr)

    bar = _Progress(sys.stderr.isatty() if progress is None else progress)
    total = sum(len(ld.items) for _, ld, _o in loaded.values())
    with nullcontext(store) if store is not None else Store(out_dir / STORE_NAME) as store:
        cached = CachedEngine(engine, store)
        records: dict[str, list[Record]] = {}
        try:
            for name, (p, ld, popts) in loaded.items():
                n_items = len(ld.items)

                def started(n_new: int, n_items: int = n_items) -> None:
                    bar.start(total, f"generating ({', '.join(loaded)})")
                    bar.advance(n_items - n_new, 0)  # cache hits count as done at once

                gens = cached.generate([it.prompt for it in ld.items], progress=bar.advance, on_start=started)
                records[name] = [
                    Record(item=it, outputs=list(g.texts), parsed=[p.parse(it, t, popts) for t in g.texts])
                    for it, g in zip(ld.items, gens)
                ]
        finally:
            bar.stop()
        scores: dict[str, dict[str, Any]] = {}
        for name, (p, ld, popts) in loaded.items():
            try:
                sc = p.score(records[name], popts, ld)
            except UsageError:
                raise
            except Exception as e:  # one perspective's scoring failure must not discard the others' results
                not_run[name] = f"scoring failed: {type(e).__name__}: {e}"
                print(f"warning: perspective '{name}' not scored: {not_run[name]}", file=sys.stderr)
                continue
            sc.skipped = sorted(set(sc.skipped) | set(ld.skipped))
            sc.notes = list(dict.fromkeys([*ld.notes, *sc.notes]))  # the loader's notes too (e.g. fewer demos)
            d = sc.to_dict()
            d["model_fingerprint"] = engine.fingerprint
            d["perspective_version"] = p.version
            scores[name] = d
            d["options_used"] = popts.public()
            store.put_score(engine.fingerprint, name, popts.public(), d)
    stats = cached.stats.as_dict()
    stats["engine_load_seconds"] = round(getattr(engine, "load_seconds", 0.0), 2)
    result = EvalResult(out_dir, scores, not_run, stats, time.time() - t0, model_info, records)
    if write_files:
        write_outputs(result, records, opts, config)
    return result


def write_outputs(result: EvalResult, records: dict[str, list[Record]], opts: EvalOptions, config: Any = None) -> None:
    import torch
    import transformers

    doc = {
        "comptrust_version": __version__,
        "model": result.model,
        "options": opts.public(),
        "config": config.model_dump(mode="json") if config is not None else None,
        "config_fingerprint": config.fingerprint() if config is not None else None,
        "perspectives": result.scores,
        "not_run": result.not_run,
        "generation": result.stats,
        "wall_seconds": round(result.wall_seconds, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    write_atomic(result.out_dir / "scores.json", json.dumps(doc, indent=2, ensure_ascii=False, default=str))
    lines = []
    for name, recs in records.items():
        for r in recs:
            pr = r.item.prompt
            lines.append(
                json.dumps(
                    {
                        "perspective": name,
                        "id": r.item.id,
                        "group": r.item.group,
                        "prompt": pr.raw if pr.raw is not None else [[m.role, m.content] for m in pr.messages],
                        "params": pr.params.key(),
                        "outputs": r.outputs,
                        "parsed": [
                            {"label": x.label, "refused": x.refused, "correct": x.correct, "value": x.value}
                            for x in r.parsed
                        ],
                        "labels": dict(r.item.labels),
                    },
                    ensure_ascii=False,
                    default=str,
                )
            )
    write_atomic(result.out_dir / "generations.jsonl", "\n".join(lines) + ("\n" if lines else ""))
