"""Evaluate one model on a set of perspectives: load -> prompts -> (cached) generate -> parse -> score.

All prompts of all requested perspectives go to the engine in one call, so identical requests are generated
once and batches are as full as possible. Results land in the output directory:
  comptrust.sqlite    the store (generation cache + score history); reruns reuse it
  scores.json         per perspective: score, refusal rate, items, sub-scores, model fingerprint, options
  generations.jsonl   per item: prompt, outputs, parsed labels
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from comptrust import __version__
from comptrust import perspectives as registry
from comptrust.engine.cached import CachedEngine
from comptrust.errors import UsageError
from comptrust.perspectives.base import EvalOptions, Loaded, MissingData
from comptrust.progress import GenerationProgress
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
    store_files = {STORE_NAME + x for x in ("", "-wal", "-shm", "-journal")} | {"comptrust.log"}  # log: not a result
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
        if popts.extra.get("gen_kwargs"):  # off-protocol decoding laid over the protocol's (--gen-kwargs)
            from comptrust import genkwargs

            ld.items = genkwargs.apply(ld.items, popts.extra["gen_kwargs"])
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

    bar = GenerationProgress.for_stream(progress)  # a bar on a terminal, plain lines when piped
    total = sum(len(ld.items) for _, ld, _o in loaded.values())
    with nullcontext(store) if store is not None else Store(out_dir / STORE_NAME) as store:
        cached = CachedEngine(engine, store)
        if hasattr(engine, "on_step"):  # the HF engine reports decode steps inside a batch: the bar moves meanwhile
            engine.on_step = bar.step
        records: dict[str, list[Record]] = {}
        try:
            for name, (p, ld, popts) in loaded.items():
                n_items = len(ld.items)

                def started(n_new: int, n_items: int = n_items) -> None:
                    bar.start(total, f"generating ({', '.join(loaded)})")
                    bar.advance(n_items - n_new, 0)  # cache hits count as done at once

                gens = cached.generate([it.prompt for it in ld.items], progress=bar.commit, on_start=started,
                                       on_batch=bar.batch)
                records[name] = [
                    Record(item=it, outputs=list(g.texts), parsed=[p.parse(it, t, popts) for t in g.texts])
                    for it, g in zip(ld.items, gens)
                ]
        finally:
            bar.stop()
            if hasattr(engine, "on_step"):
                engine.on_step = None
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
            d["n_items_by_group"] = dict(Counter(r.item.group for r in records[name]))
            d["ci95"] = bootstrap_ci(p, popts, ld, records[name], seed=opts.seed) if sc.score is not None else None
            if popts.extra.get("gen_kwargs"):
                d["notes"].append(OFF_PROTOCOL_NOTE)
            store.put_score(engine.fingerprint, name, popts.public(), d)
    stats = cached.stats.as_dict()
    stats["engine_load_seconds"] = round(getattr(engine, "load_seconds", 0.0), 2)
    result = EvalResult(out_dir, scores, not_run, stats, time.time() - t0, model_info, records)
    if write_files:
        write_outputs(result, records, opts, config)
    return result


CI_RESAMPLES = 200  # ~3 s over the mini suites on 2 cores; a study uses 1000 (its `bootstrap` key)
OFF_PROTOCOL_NOTE = ("not DecodingTrust: decoding settings were overridden with --gen-kwargs, so these scores are not "
                     "comparable with DecodingTrust's or with protocol runs")


class _MemoScorer:
    """A toxicity scorer that remembers its texts' scores: bootstrap resamples re-score the same texts."""

    def __init__(self, inner: Any):
        self.inner, self.name, self.memo = inner, inner.name, {}

    def score(self, texts: list[str]) -> list[float | None]:
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.inner.score(new)))
        return [self.memo[t] for t in texts]


def bootstrap_ci(p: Any, popts: EvalOptions, loaded: Loaded, recs: Sequence[Record], b: int = CI_RESAMPLES,
                 seed: int = 0) -> dict[str, Any] | None:
    """95% percentile bootstrap CI of a perspective's score over its items, stratified by sub-scenario (each keeps
    its size), every resample scored by the perspective's own score(): the same resampling as a study's analysis,
    so a single evaluation's interval means what the report's does. None when fewer than two resamples score;
    low/high None (and why, under method) when every sub-scenario holds a single item."""
    import numpy as np

    strata: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        strata.setdefault(r.item.group, []).append(i)
    groups = [np.asarray(v) for v in strata.values()]
    if not groups:
        return None
    if all(len(g) < 2 for g in groups):  # resampling within strata of one item reproduces the score exactly
        return {"low": None, "high": None, "resamples": 0, "scored_resamples": 0,
                "method": "not computed: one item per sub-scenario leaves nothing to resample (raise --limit)"}
    if p.name == "toxicity":
        from comptrust.perspectives.toxicity import resolve_scorer

        popts = replace(popts, extra={**popts.extra, "toxicity_scorer": _MemoScorer(resolve_scorer(popts))})
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(b):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        try:
            sc = p.score([recs[i] for i in idx], popts, loaded).score
        except (ZeroDivisionError, ValueError, KeyError):
            sc = None
        if sc is not None and not math.isnan(sc):
            vals.append(sc)
    if len(vals) < 2:
        return None
    return {"low": float(np.percentile(vals, 2.5)), "high": float(np.percentile(vals, 97.5)), "resamples": b,
            "scored_resamples": len(vals),
            "method": "percentile bootstrap over items, stratified by sub-scenario, scored by the perspective's metric"}


def write_outputs(result: EvalResult, records: dict[str, list[Record]], opts: EvalOptions, config: Any = None) -> None:
    import torch  # noqa: F401 -- imported so that versions() reports the running build (e.g. 2.13.0+cpu)

    from comptrust.outputs import run_header

    doc = {
        **run_header("scores"),  # schema_version, created (ISO 8601 UTC), command, versions
        "comptrust_version": __version__,
        "model": result.model,
        "options": opts.public(),
        "config": config.model_dump(mode="json") if config is not None else None,
        "config_fingerprint": config.fingerprint() if config is not None else None,
        "perspectives": result.scores,
        "not_run": result.not_run,
        "generation": result.stats,
        "wall_seconds": round(result.wall_seconds, 2),
    }
    gen_kwargs = opts.extra.get("gen_kwargs")
    if gen_kwargs:
        from comptrust import genkwargs

        doc["off_protocol"] = {"gen_kwargs": genkwargs.parse(gen_kwargs), "note": OFF_PROTOCOL_NOTE}
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
