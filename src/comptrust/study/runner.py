"""Run a study as units of work, each committed to the store when it finishes, so that a rerun resumes.

Units:
  compress:<variant>@s<seed>        make the checkpoint (api.compress writes it in a temp dir, then renames)
  eval:<instance>:<perspective>     evaluate one model on one perspective (instance = dense | <variant>@s<seed>)

A unit is *done* only once its row is in the ``units`` table; generations are cached per chunk underneath, so a
run killed mid-evaluation regenerates nothing that was committed. A failing unit is recorded with its error and
the study goes on; a rerun retries failed and pending units and skips done ones. Every unit stores the
fingerprint of what produced it, and a unit whose settings changed since is redone rather than reused.

All of a model's pending perspectives are generated with one model load (each perspective in batches of its own,
so its score does not depend on which others were pending), then
recorded one unit per perspective.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from comptrust.errors import ComptrustError, UsageError, check_interrupted
from comptrust.evaluate import check_out_dir
from comptrust.perspectives.base import EvalOptions
from comptrust.results import StudyReport
from comptrust.store import STORE_NAME, Store, write_atomic

# the plan (units, ids, fingerprints, the study's EvalConfig) lives in study/plan.py, below this module and the
# report; re-exported here for callers that import it from the runner
from comptrust.study.plan import (  # noqa: F401
    SPEC_NAME,
    Plan,
    Unit,
    compress_unit,
    eval_config,
    eval_fingerprint,
    eval_options,
    eval_unit,
    instance_key,
    load_study,
)
from comptrust.study.spec import DENSE, StudySpec, Variant  # noqa: F401 -- DENSE: re-exported for ray_executor
from comptrust.types import Record


def _one_line(e: BaseException) -> str:
    """A unit's error as stored and printed: one line, secrets redacted (it lands in comptrust.sqlite,
    results.json and report.html)."""
    from comptrust.errors import redact

    msg = " ".join(str(e).split()) or type(e).__name__
    return redact(msg if isinstance(e, ComptrustError) else f"{type(e).__name__}: {msg}")


def _compact(records: list[Record]) -> list[dict[str, Any]]:
    return [
        {"id": r.item.id, "o": r.outputs, "p": [[x.label, x.refused, x.correct, x.value] for x in r.parsed]}
        for r in records
    ]


class _Say:
    """Study progress lines with an overall ETA from the measured time per unit kind."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.t0 = total, done, time.time()
        self.spent: dict[str, list[float]] = {"compress": [], "eval": []}
        self.left: dict[str, int] = {"compress": 0, "eval": 0}

    def __call__(self, msg: str) -> None:
        print(f"[study] {msg}", file=sys.stderr, flush=True)

    def finished(self, kind: str, n: int, seconds: float) -> None:
        self.done += n
        self.left[kind] -= n
        self.spent[kind].append(seconds / max(n, 1))
        eta = sum(
            self.left[k] * (sum(v) / len(v)) for k, v in self.spent.items() if v and self.left[k] > 0
        )
        unknown = any(self.left[k] > 0 and not v for k, v in self.spent.items())
        self(
            f"{self.done}/{self.total} units done, elapsed {time.time() - self.t0:.0f} s, "
            f"ETA {'?' if unknown else f'{eta:.0f} s'}"
        )


def run_study(spec: StudySpec, out_dir: Path, progress: bool | None = None,
              on_unit: Callable[[str], None] | None = None, executor: str = "local",
              ray_address: str | None = None, workers: int | None = None,
              models_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the study into out_dir, then write the report. Returns the analysis.

    executor "local" runs the units one after another in this process; "ray" runs them as Ray tasks
    (comptrust.study.ray_executor) while this process alone writes the store.
    """
    if executor not in ("local", "ray"):
        raise UsageError(f"--executor {executor!r}: choose local or ray")
    out_dir = check_out_dir(Path(out_dir))
    _check_same_study(spec, out_dir)
    if progress is False or (progress is None and not sys.stderr.isatty()):
        os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' own bars (weights loading, calibration) too
    write_atomic(out_dir / SPEC_NAME, json.dumps(spec.to_dict(), indent=2))
    opts = eval_options(spec)
    plan = Plan.of(spec)
    with Store(out_dir / STORE_NAME) as store:
        rows = plan.status(store.units())
        todo = [r for r in rows if r["status"] != "done"]
        say = _Say(len(rows), len(rows) - len(todo))
        for r in todo:
            say.left[r["kind"]] += 1
        say(f"{len(rows)} units ({len(rows) - len(todo)} done, {len(todo)} to run) in {out_dir}")
        if executor == "ray":
            from comptrust.study.ray_executor import run_on_ray

            run_on_ray(spec, out_dir, plan, store, say, address=ray_address, workers=workers, models_dir=models_dir)
        else:
            for v, seed in plan.instances():
                _run_instance(spec, v, seed, plan, store, opts, out_dir, say, progress, on_unit)
    return write_report(out_dir)


def load_result(out_dir: Path) -> StudyReport:
    """The study's typed result, built from study.json and the store (read-only: works mid-study too)."""
    from comptrust.study.analysis import build_result

    out_dir = Path(out_dir)
    spec = load_study(out_dir)
    if not (out_dir / STORE_NAME).is_file():  # an empty report would replace the good one: refuse
        raise UsageError(f"{out_dir} has no {STORE_NAME}: nothing to report from; report.html, results.csv and "
                         "results.json are left as they are")
    with Store(out_dir / STORE_NAME, readonly=True) as store:
        stored = store.units()
    return build_result(spec, stored)


def write_outputs(out_dir: Path, result: StudyReport | None = None) -> StudyReport:
    """Write results.json, results.csv and report.html of the study in out_dir, rendered from its result (built
    from the store when not given). Returns the result."""
    from comptrust.report import render

    result = result if result is not None else load_result(out_dir)
    for name, text in render(result).items():
        write_atomic(Path(out_dir) / name, text)
    return result


def write_report(out_dir: Path) -> dict[str, Any]:
    """write_outputs, returning the analysis as results.json holds it (what the CLI's summary prints)."""
    return write_outputs(out_dir).analysis.model_dump(mode="json")


def _check_same_study(spec: StudySpec, out_dir: Path) -> None:
    """A directory holds one study's model and data; a different model there would mix results."""
    old_path = out_dir / SPEC_NAME
    if not old_path.is_file():
        return
    try:
        old = json.loads(old_path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    for key in ("model", "suite", "data_dir"):
        if old.get(key) != getattr(spec, key):
            raise UsageError(
                f"--out {out_dir} holds a study with {key}={old.get(key)!r}, not {getattr(spec, key)!r}; "
                "use a new output directory"
            )


def checkpoint_dir(out_dir: Path, inst: str, models_dir: Path | None = None) -> Path:
    """models/<instance>. Guarded although spec.py refuses unsafe names: a study.json edited by hand, or a
    caller that builds a Variant itself, must not make a checkpoint land outside the models folder."""
    from comptrust.study.spec import check_variant_name

    base = Path(models_dir) if models_dir else out_dir / "models"
    why = check_variant_name(inst)
    if why or Path(inst).name != inst:
        raise UsageError(f"variant instance {inst!r} {why or 'is not one folder name'}: refusing to write its "
                         f"checkpoint outside {base}")
    return base / inst


def record_compress(store: Store, v: Variant, seed: int, seconds: float, record: dict[str, Any] | None,
                    error: str | None, path: Path | None = None) -> None:
    fp = v.fingerprint(seed)
    uid = compress_unit(instance_key(v, seed))
    if error is None:
        store.put_unit(uid, "compress", "done", {"fingerprint": fp, "record": record, "path": str(path)}, seconds)
    else:
        store.put_unit(uid, "compress", "failed", {"fingerprint": fp}, seconds, error)


def record_eval(store: Store, spec: StudySpec, v: Variant, seed: int | None, pending: list[str], seconds: float,
                outcome: dict[str, Any] | None, error: str | None) -> None:
    """outcome: {scores, records (compact), not_run, model, stats}; or error for all pending perspectives."""
    inst = instance_key(v, seed)
    for p in pending:
        fp = eval_fingerprint(spec, v, seed, p)
        share = seconds / len(pending)
        if error is not None or outcome is None:
            store.put_unit(eval_unit(inst, p), "eval", "failed", {"fingerprint": fp}, share, error or "not run")
        elif p in outcome["scores"]:
            res = {"fingerprint": fp, "score": outcome["scores"][p], "records": outcome["records"][p],
                   "model": outcome["model"], "generation": outcome["stats"]}
            store.put_unit(eval_unit(inst, p), "eval", "done", res, share)
        else:
            store.put_unit(eval_unit(inst, p), "eval", "failed", {"fingerprint": fp}, share,
                           outcome["not_run"].get(p, "not run"))


def eval_outcome(result: Any) -> dict[str, Any]:
    """The serialisable part of an EvalResult that the units keep."""
    return {"scores": result.scores, "records": {p: _compact(r) for p, r in result.records.items()},
            "not_run": result.not_run, "model": result.model, "stats": result.stats}


def pending_work(spec: StudySpec, plan: Plan, stored: dict[str, dict[str, Any]], v: Variant, seed: int | None,
                 out_dir: Path, models_dir: Path | None = None) -> tuple[bool, list[str]]:
    """(compression needed?, perspectives still to evaluate) for one model of the study."""
    status = {r["unit"]: r["status"] for r in plan.status(stored)}
    inst = instance_key(v, seed)
    need_compress = False
    if not v.is_dense:
        done = stored.get(compress_unit(inst)) if status[compress_unit(inst)] == "done" else None
        path = (done or {}).get("result", {}).get("path") or str(checkpoint_dir(out_dir, inst, models_dir))
        need_compress = done is None or not Path(path).is_dir()
    return need_compress, [p for p in spec.perspectives if status[eval_unit(inst, p)] != "done"]


def stored_checkpoint(stored: dict[str, dict[str, Any]], inst: str, default: Path) -> Path:
    u = stored.get(compress_unit(inst))
    path = u["result"].get("path") if u and u["status"] == "done" else None
    return Path(path) if path and Path(path).is_dir() else default


def _run_instance(spec: StudySpec, v: Variant, seed: int | None, plan: Plan, store: Store, opts: EvalOptions,
                  out_dir: Path, say: _Say, progress: bool | None, on_unit: Callable[[str], None] | None) -> None:
    inst = instance_key(v, seed)
    need_compress, pending = pending_work(spec, plan, store.units(), v, seed, out_dir)
    model_ref: str | None = spec.model
    if not v.is_dense:
        ckpt = stored_checkpoint(store.units(), inst, checkpoint_dir(out_dir, inst))
        if need_compress:
            if on_unit:
                on_unit(compress_unit(inst))
            say(f"compress {inst} ({v.label(seed or 0)}" + ("" if v.is_gguf else f", seed {seed}") + ")")
            t0 = time.time()
            try:
                record = compress_checkpoint(spec, v, seed or 0, ckpt)
                check_interrupted()  # a Ctrl-C that a library swallowed: the unit is not recorded as done
            except KeyboardInterrupt:
                raise
            except Exception as e:  # recorded; the study goes on with the other variants
                record_compress(store, v, seed or 0, time.time() - t0, None, _one_line(e))
                say(f"FAILED compress {inst}: {_one_line(e)}")
                say.finished("compress", 1, time.time() - t0)
                say.left["eval"] -= len(pending)
                return
            record_compress(store, v, seed or 0, time.time() - t0, record, None, ckpt)
            say.finished("compress", 1, time.time() - t0)
        model_ref = model_in(v, ckpt)
    if not pending:
        return
    for p in pending:
        if on_unit:
            on_unit(eval_unit(inst, p))
    say(f"evaluate {inst} on {', '.join(pending)}")
    t0 = time.time()
    try:
        result = evaluate_model(spec, model_ref, pending, opts, out_dir, store, progress, backend=backend_for(spec, v))
        check_interrupted()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if not isinstance(e, ComptrustError):
            traceback.print_exc(file=sys.stderr)
        record_eval(store, spec, v, seed, pending, time.time() - t0, None, _one_line(e))
        say(f"FAILED evaluate {inst}: {_one_line(e)}")
        say.finished("eval", len(pending), time.time() - t0)
        return
    record_eval(store, spec, v, seed, pending, time.time() - t0, eval_outcome(result), None)
    say.finished("eval", len(pending), time.time() - t0)


def model_in(v: Variant, ckpt: Path) -> str:
    """What the engine loads for a compressed variant: its checkpoint folder, or the GGUF inside for gguf."""
    if v.is_gguf:
        from comptrust.compress.gguf import MODEL_FILE

        return str(ckpt / MODEL_FILE)
    return str(ckpt)


def backend_for(spec: StudySpec, v: Variant) -> str:
    """gguf variants are served by llama.cpp; every other model goes to the study's backend."""
    return "llamacpp" if v.is_gguf else spec.backend


def compress_checkpoint(spec: StudySpec, v: Variant, seed: int, ckpt: Path) -> dict[str, Any]:
    from comptrust.compress.api import RECORD_NAME, compress, is_comptrust_checkpoint

    if v.is_gguf:
        from comptrust.compress import gguf

        return gguf.stored_record(ckpt, v.settings) or gguf.prepare(spec.model, v.settings, ckpt)
    from comptrust.study import reuse

    cfg = v.config(seed)
    if is_comptrust_checkpoint(ckpt):  # made by a run killed before it could record the unit
        rec = json.loads((ckpt / RECORD_NAME).read_text())
        if rec.get("config") == cfg.model_dump():
            return rec
    key = reuse.safe_checkpoint_key(spec.model, cfg.model_dump())
    if key and (rec := reuse.restore_checkpoint(key, ckpt, RECORD_NAME)) is not None:
        print(f"[compress] reused {ckpt.name} from {reuse.cache_root()} (same model, config and versions)",
              file=sys.stderr, flush=True)
        return rec
    compress(spec.model, cfg, ckpt, progress=lambda msg: print(f"[compress] {msg}", file=sys.stderr, flush=True))
    if key:
        reuse.save_checkpoint(key, ckpt, RECORD_NAME)
    return json.loads((ckpt / RECORD_NAME).read_text())


def evaluate_model(spec: StudySpec, model_ref: str | None, names: list[str], opts: EvalOptions, out_dir: Path,
                   store: Store, progress: bool | None, device: str | None = None, backend: str | None = None) -> Any:
    from comptrust.engine.select import open_engine
    from comptrust.evaluate import evaluate

    kw = eval_config(spec).engine_kwargs()  # the study's backend, device, dtype, batch size and raw prompts
    if device:  # the Ray executor places units on a device
        kw["device"] = None if device == "auto" else device
    if backend:  # gguf variants: llama.cpp
        kw["backend"] = backend
    from comptrust.study import reuse

    # what an earlier study generated with the same model (fingerprint), prompt and decoding is not generated again
    with open_engine(model_ref, **kw) as (engine, info), reuse.generations_through_cache(store) as st:
        return evaluate(engine, info, names, opts, out_dir, progress=progress, write_files=False, store=st)
