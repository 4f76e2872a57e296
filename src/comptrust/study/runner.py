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
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from comptrust.cpu import cpu_threads
from comptrust.errors import ComptrustError, UsageError, check_interrupted
from comptrust.evaluate import check_out_dir, load_perspectives
from comptrust.perspectives.base import EvalOptions
from comptrust.progress import StudyProgress, work_of
from comptrust.results import StudyReport
from comptrust.store import STORE_NAME, Store, write_atomic, write_atomic_many

# the plan (units, ids, fingerprints, the study's EvalConfig) lives in study/plan.py, the unit helpers the local
# and the Ray executor share in study/units.py
from comptrust.study.plan import (
    SPEC_NAME,
    Plan,
    compress_unit,
    eval_options,
    eval_unit,
    instance_key,
    load_study,
)
from comptrust.study.spec import StudySpec, Variant
from comptrust.study.units import (
    _one_line,
    backend_for,
    compress_checkpoint,
    eval_outcome,
    evaluate_model,
    model_work,
    record_compress,
    record_eval,
)


def run_study(spec: StudySpec, out_dir: Path, progress: bool | None = None,
              on_unit: Callable[[str], None] | None = None, executor: str = "local",
              ray_address: str | None = None, workers: int | None = None,
              models_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the study into out_dir, then write the report. Returns the analysis.

    executor "local" runs the units on this machine: one after another in this process (workers 1), or in
    `workers` processes side by side (comptrust.study.pool_executor; workers None: pool_executor.auto_workers
    decides); "ray" runs them as Ray tasks (comptrust.study.ray_executor) while this process alone writes the
    unit rows, `workers` being the size of the local Ray cluster in CPUs.
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
        n = _local_workers(spec, workers, len({r["instance"] for r in todo})) if executor == "local" else 1
        # rates are kept per setting: a unit among n side by side runs at another pace than one alone
        say = StudyProgress(len(rows), len(rows) - len(todo), todo, work=_plan_work(spec, opts, todo),
                            methods={v.name: v.method for v in spec.variants}, parallel=n,
                            key=f"{spec.model}|{spec.backend}|{spec.device}|{platform.node()}"
                            + (f"|{n} workers" if n > 1 else ""))
        say.announce(out_dir)  # with the estimate: the plan's work at a stored (or rough) rate
        if executor == "ray":
            from comptrust.study.ray_executor import run_on_ray

            run_on_ray(spec, out_dir, plan, store, say, address=ray_address, workers=workers, models_dir=models_dir)
        elif n > 1:
            from comptrust.logs import current_log
            from comptrust.study.pool_executor import run_in_pool

            run_in_pool(spec, out_dir, plan, store, say, n, cpu_threads(), log_path=current_log(),
                        models_dir=models_dir)
        else:
            for v, seed in plan.instances():
                _run_instance(spec, v, seed, plan, store, opts, out_dir, say, progress, on_unit)
    return write_report(out_dir)


def _local_workers(spec: StudySpec, workers: int | None, models: int) -> int:
    """Worker processes for the local executor: --workers (at most one per model with work left), else
    pool_executor.auto_workers (said on stderr). models: the models with units still to run."""
    if models <= 1:
        return 1
    if workers is not None:
        return min(workers, models)
    from comptrust.study.pool_executor import auto_workers

    n, why = auto_workers(spec, cpu_threads(), models=models)
    print(f"[study] {n} worker{'s' if n > 1 else ''} ({why}; --workers N sets it)", file=sys.stderr, flush=True)
    return n


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
    write_atomic_many([(Path(out_dir) / name, text) for name, text in render(result).items()])  # the three, or none
    return result


def write_report(out_dir: Path) -> dict[str, Any]:
    """write_outputs, returning the analysis as results.json holds it (what the CLI's summary prints)."""
    return write_outputs(out_dir).analysis.model_dump(mode="json")


def _plan_work(spec: StudySpec, opts: EvalOptions, todo: list[dict[str, Any]]) -> dict[str, float]:
    """Estimated generation work per perspective (progress.work_of), for the study's up-front ETA."""
    try:
        loaded, _ = load_perspectives(spec.perspectives, opts) if any(r["kind"] == "eval" for r in todo) else ({}, {})
        return {n: work_of([it.prompt for it in ld.items]) for n, (_, ld, _o) in loaded.items()}
    except Exception:  # an estimate never stops a study; evaluate reports bad data itself
        return {}


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


def _run_instance(spec: StudySpec, v: Variant, seed: int | None, plan: Plan, store: Store, opts: EvalOptions,
                  out_dir: Path, say: StudyProgress, progress: bool | None, on_unit: Callable[[str], None] | None) -> None:
    inst = instance_key(v, seed)
    w = model_work(spec, plan, store.units(), v, seed, out_dir)
    pending = w.pending
    if w.ckpt is not None:
        ckpt = w.ckpt
        if w.need_compress:
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
                say.finished("compress", 1, time.time() - t0, failed=True)
                say.blocked(len(pending))
                return
            record_compress(store, v, seed or 0, time.time() - t0, record, None, ckpt)
            say.finished("compress", 1, time.time() - t0)
    if not pending:
        return
    for p in pending:
        if on_unit:
            on_unit(eval_unit(inst, p))
    say(f"evaluate {inst} on {', '.join(pending)}")
    t0 = time.time()
    try:
        result = evaluate_model(spec, w.model_ref, pending, opts, out_dir, store, progress, backend=backend_for(spec, v))
        check_interrupted()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if not isinstance(e, ComptrustError):
            traceback.print_exc(file=sys.stderr)
        record_eval(store, spec, v, seed, pending, time.time() - t0, None, _one_line(e))
        say(f"FAILED evaluate {inst}: {_one_line(e)}")
        say.finished("eval", len(pending), time.time() - t0, failed=True)
        return
    record_eval(store, spec, v, seed, pending, time.time() - t0, eval_outcome(result), None)
    say.finished("eval", len(pending), time.time() - t0)
