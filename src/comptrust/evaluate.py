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
from comptrust.errors import RuntimeFailure, UsageError
from comptrust.perspectives.base import EvalOptions, Loaded, MissingData
from comptrust.progress import GenerationProgress
from comptrust.store import STORE_NAME, Store, write_atomic_many
from comptrust.types import Record


@dataclass
class EvalResult:
    out_dir: Path
    scores: dict[str, dict[str, Any]]
    not_run: dict[str, str]
    stats: dict[str, Any]
    wall_seconds: float
    model: dict[str, Any] = field(default_factory=dict)
    records: dict[str, list[Record]] = field(default_factory=dict)


LOCK_NAME = ".comptrust.lock"
_HELD: dict[str, Any] = {}  # out folder -> the open lock file this process holds (until it exits)


def lock_out_dir(out: Path) -> None:
    """One comptrust process writes an --out folder at a time: an advisory lock (flock) on
    --out/.comptrust.lock, held until this process ends; a second process gets a one-line "in use by pid N".
    A lock, not just unique temp names, because two runs on one folder would also interleave their
    scores.json and generations.jsonl (each pair consistent, the folder not). The kernel drops the lock when
    the holder dies, so a killed run never leaves the folder locked."""
    import fcntl

    key = str(out.resolve())
    if key in _HELD:
        return
    path = out / LOCK_NAME
    try:
        f = open(path, "a+", encoding="utf-8")
    except OSError:
        return  # cannot even create the lock file (read-only folder): the writes below report it
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise RuntimeFailure(f"--out {out} is in use by pid {pid} (another comptrust run writes there); wait for "
                             "it to finish or use another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[key] = f


def release_out_dir(out: Path) -> None:
    """Give up this process's lock on `out` (the Python API, whose process outlives one evaluation, calls it at the
    end of each; the CLI's lock lasts until the process ends)."""
    try:
        key = str(Path(out).expanduser().resolve())
    except OSError:
        return
    held = _HELD.pop(key, None)
    if held is not None:
        held.close()


def check_out_dir(out: Path) -> Path:
    out = out.expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the output directory ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out}: the output directory is not writable")
    lock_out_dir(out)
    now = time.time()
    for stale in [*out.glob(".*.tmp"), *out.glob("*.json.tmp"), *out.glob("*.jsonl.tmp")]:
        try:  # temps of runs killed while writing; a minute old, so a report being written now keeps its own
            if now - stale.stat().st_mtime > 60:
                stale.unlink()
        except OSError:
            pass
    return out


def discard_if_unused(out: Path) -> bool:
    """Remove an --out folder this command created when it holds nothing computed: no files but the results
    database, and that one with no generations, scores or cached values. Returns whether it was removed."""
    import shutil
    import sqlite3

    out = out.expanduser()
    if not out.is_dir():
        return False
    store_files = {STORE_NAME + x for x in ("", "-wal", "-shm", "-journal")} | {"comptrust.log", LOCK_NAME}  # log: not a result
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
    held = _HELD.pop(str(out.resolve()), None)
    if held is not None:
        held.close()
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

    for name, (_, ld, _o) in loaded.items():
        note = over_context_note(engine, ld.items)
        if note:  # said on stderr, and kept among the perspective's notes in scores.json
            print(f"warning: {name}: {note}", file=sys.stderr)
            ld.notes.append(note)

    bar = GenerationProgress.for_stream(progress)  # a bar on a terminal, plain lines when piped
    total = sum(len(ld.items) for _, ld, _o in loaded.values())
    bar.plan([[it.prompt for it in ld.items] for _, ld, _o in loaded.values()])  # ETA weighted by what is left
    with nullcontext(store) if store is not None else Store(out_dir / STORE_NAME) as store:
        cached = CachedEngine(engine, store)
        if hasattr(engine, "on_step"):  # the HF engine reports decode steps inside a batch: the bar moves meanwhile
            engine.on_step = bar.step
        records: dict[str, list[Record]] = {}
        score_opts: dict[str, EvalOptions] = {}  # per perspective: its options for scoring (Perspective.start_scoring)
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
                score_opts[name] = p.start_scoring(records[name], popts)  # toxicity: scoring starts on other cores
        finally:
            bar.stop()
            if hasattr(engine, "on_step"):
                engine.on_step = None
        if bar.mode != "off":  # scoring (toxicity's scorer, the bootstrap CIs) takes seconds: say what runs
            from comptrust.progress import stage

            stage(f"scoring {len(loaded)} perspective(s), with {CI_RESAMPLES}-resample bootstrap CIs")
        scores: dict[str, dict[str, Any]] = {}
        for name, (p, ld, popts) in loaded.items():
            sopts = score_opts[name]  # same public options; runtime helpers (a memoising scorer) added
            try:
                sc = p.score(records[name], sopts, ld)
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
            d["ci95"] = bootstrap_ci(p, sopts, ld, records[name], seed=opts.seed) if sc.score is not None else None
            if popts.extra.get("gen_kwargs"):
                d["notes"].append(OFF_PROTOCOL_NOTE)
            store.put_score(engine.fingerprint, name, popts.public(), d)
    stats = cached.stats.as_dict()
    stats["engine_load_seconds"] = round(getattr(engine, "load_seconds", 0.0), 2)
    result = EvalResult(out_dir, scores, not_run, stats, time.time() - t0, model_info, records)
    if write_files:
        write_outputs(result, records, opts, config)
    return result


def context_limit(engine: Any) -> int | None:
    """Positions the engine's model was trained for (config.json's max_position_embeddings or the like), for
    engines that load a local model and can tokenize; None where unknown (a served model: its server refuses
    what does not fit, and the item fails with the server's message)."""
    path = getattr(getattr(engine, "resolved", None), "path", None)
    if path is None or not callable(getattr(engine, "encode", None)):
        return None
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(c, dict):
            for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
                v = c.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def over_context_note(engine: Any, items: Sequence[Any]) -> str | None:
    """A note when some prompts do not fit the model's context with their new tokens.

    deviation: none. The protocol's rule (decodingtrust-protocol.md, generation: "the input prompt is never
    truncated") is followed: such prompts are generated untruncated, as the reference harness does. What is
    added is that this is said, with the count, instead of passing silently: outputs past the trained context
    are unreliable, and a reader of the score should know how many there were."""
    limit = context_limit(engine)
    if limit is None or not items:
        return None
    over, longest = 0, 0
    render = getattr(engine, "render", None)
    for it in items:
        room = limit - it.prompt.params.max_new_tokens - 8  # 8: special tokens the tokenizer may add
        if callable(render) and len(render(it.prompt).encode("utf-8")) <= room:
            continue  # fits for sure (a token is at least one byte): no tokenizing needed
        n = len(engine.encode(it.prompt))
        if n + it.prompt.params.max_new_tokens > limit:
            over += 1
            longest = max(longest, n)
    if not over:
        return None
    return (f"{over} of {len(items)} prompts do not fit the model's context of {limit} tokens with their new tokens "
            f"(longest prompt {longest} tokens); evaluated untruncated as the protocol says (DecodingTrust never "
            "truncates a prompt), so their outputs come from beyond the trained context")


CI_RESAMPLES = 200  # ~3 s over the mini suites on 2 cores; a study uses 1000 (its `bootstrap` key)
OFF_PROTOCOL_NOTE = ("not DecodingTrust: decoding settings were overridden with --gen-kwargs, so these scores are not "
                     "comparable with DecodingTrust's or with protocol runs")


def resampling_strata(records: Sequence[Record]) -> list[list[int]]:
    """Bootstrap strata: one per sub-scenario, except that single-item sub-scenarios are pooled into one stratum
    (a stratum of one item resamples to itself and adds no variance: at --limit 1 every sub-scenario is one) and a
    lone single-item stratum joins the smallest other one. The same rule as the study's analysis."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.item.group, []).append(i)
    big = [v for v in groups.values() if len(v) > 1]
    small = [i for v in groups.values() if len(v) == 1 for i in v]
    if len(small) > 1 or (small and not big):
        big.append(small)
    elif small:
        min(big, key=len).extend(small)
    return [sorted(v) for v in big]


def bootstrap_ci(p: Any, popts: EvalOptions, loaded: Loaded, recs: Sequence[Record], b: int = CI_RESAMPLES,
                 seed: int = 0) -> dict[str, Any] | None:
    """95% percentile bootstrap CI of a perspective's score over its items, stratified by sub-scenario (each keeps
    its size; single-item ones pooled, resampling_strata), every resample scored by the perspective's own score():
    the same resampling as a study's analysis, so a single evaluation's interval means what the report's does.
    None when fewer than two resamples score; low/high None (and why, under method) for a single item."""
    import numpy as np

    groups = [np.asarray(g) for g in resampling_strata(recs)]
    if sum(len(g) for g in groups) < 2:  # one item resamples to itself: no interval to give
        return {"low": None, "high": None, "resamples": 0, "scored_resamples": 0,
                "method": "not computed: a single item leaves nothing to resample"}
    popts = p.scoring_options(popts)
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
            "method": "percentile bootstrap over items, stratified by sub-scenario (single-item ones pooled), scored "
                      "by the perspective's metric"}


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
    scores_text = json.dumps(doc, indent=2, ensure_ascii=False, default=str)
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
    # one step: both temps are written before either file is replaced, so scores.json never describes other
    # generations than generations.jsonl beside it (a full disk leaves the old pair); generations first, the
    # file a reader checks for completeness (scores.json) last
    write_atomic_many([(result.out_dir / "generations.jsonl", "\n".join(lines) + ("\n" if lines else "")),
                       (result.out_dir / "scores.json", scores_text)])
