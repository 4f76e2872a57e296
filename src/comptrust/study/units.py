"""The unit helpers every executor runs (the in-process runner, the local worker pool, the Ray executor): make a
checkpoint, evaluate a model, record either outcome in the store, and work out what a model of the study still
needs; and the two tasks (compress_task, eval_task) that the pool and Ray run in worker processes.

They live here, below runner.py and the executors, so that the runner can dispatch to an executor without the
executor importing the runner back.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comptrust.errors import ComptrustError, UsageError
from comptrust.perspectives.base import EvalOptions
from comptrust.store import Store
from comptrust.study.plan import (
    Plan,
    compress_unit,
    eval_config,
    eval_fingerprint,
    eval_options,
    eval_unit,
    instance_key,
)
from comptrust.study.spec import StudySpec, Variant, parse_spec
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


@dataclass(frozen=True)
class ModelWork:
    """What one model of the study still needs, and where it is: every executor plans from this."""

    need_compress: bool
    pending: list[str]  # perspectives still to evaluate
    ckpt: Path | None  # the checkpoint folder (None: the dense model)
    model_ref: str | None  # what the engine loads: the study's model, or the checkpoint (its GGUF for gguf)


def model_work(spec: StudySpec, plan: Plan, stored: dict[str, dict[str, Any]], v: Variant, seed: int | None,
               out_dir: Path, models_dir: Path | None = None) -> ModelWork:
    need_compress, pending = pending_work(spec, plan, stored, v, seed, out_dir, models_dir)
    if v.is_dense:
        return ModelWork(need_compress, pending, None, spec.model)
    inst = instance_key(v, seed)
    ckpt = stored_checkpoint(stored, inst, checkpoint_dir(out_dir, inst, models_dir))
    return ModelWork(need_compress, pending, ckpt, model_in(v, ckpt))


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


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def _third_party_log(stack: ExitStack, log_path: str | None) -> None:
    """In a worker process: the libraries' chatter into the study's comptrust.log, as in the driver."""
    if log_path:
        from comptrust.logs import third_party_to_log

        stack.enter_context(third_party_to_log(Path(log_path)))


def compress_task(spec_dict: dict[str, Any], variant: str, seed: int, ckpt: str, cpus: int,
                  log_path: str | None = None) -> dict[str, Any]:
    """A compression unit in a worker process: {status: done, record} or {status: failed, error}, with seconds."""
    _threads(cpus)
    print(f"[worker {os.getpid()}] compress {variant} seed {seed} into {ckpt}", file=sys.stderr, flush=True)
    t0 = time.time()
    spec = parse_spec(spec_dict)
    with ExitStack() as stack:
        _third_party_log(stack, log_path)
        try:
            record = compress_checkpoint(spec, spec.variant(variant), seed, Path(ckpt))
            return {"status": "done", "record": record, "seconds": time.time() - t0, "pid": os.getpid()}
        except Exception as e:
            if not isinstance(e, ComptrustError):
                traceback.print_exc(file=sys.stderr)
            return {"status": "failed", "error": _one_line(e), "seconds": time.time() - t0, "pid": os.getpid()}


def eval_task(spec_dict: dict[str, Any], model_ref: str | None, pending: list[str], device: str, cpus: int,
              compressed: dict[str, Any] | None, backend: str | None = None, store_path: str | None = None,
              log_path: str | None = None) -> dict[str, Any]:
    """An evaluation unit in a worker process.

    compressed: the compression task's result where the executor passes it (Ray, once that task has finished);
    a failed one blocks the evaluation. store_path: the study's store, which the worker then writes its
    generations to chunk by chunk (the local pool: one machine, SQLite in WAL mode); without it (Ray: workers
    may be on other machines) the worker generates into a private temporary store and returns the rows for the
    driver to commit.
    """
    if compressed is not None and compressed["status"] != "done":
        return {"status": "blocked", "seconds": 0.0}
    _threads(cpus)
    print(f"[worker {os.getpid()}] evaluate {model_ref or 'the embedded model'} on {', '.join(pending)}",
          file=sys.stderr, flush=True)
    t0 = time.time()
    spec = parse_spec(spec_dict)
    opts = eval_options(spec)
    with ExitStack() as stack:
        _third_party_log(stack, log_path)
        # evaluate's own folder (its lock, nothing else with write_files off): private, the driver holds --out's
        where = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comptrust-worker-")))
        st = stack.enter_context(Store(Path(store_path) if store_path else where / "worker.sqlite"))
        try:
            result = evaluate_model(spec, model_ref, pending, opts, where, st, progress=False, device=device,
                                    backend=backend)
        except Exception as e:
            if not isinstance(e, ComptrustError):
                traceback.print_exc(file=sys.stderr)
            return {"status": "failed", "error": _one_line(e), "seconds": time.time() - t0}
        rows = [] if store_path else st.generation_rows()
    return {"status": "done", "outcome": eval_outcome(result), "generations": rows, "seconds": time.time() - t0,
            "pid": os.getpid()}
