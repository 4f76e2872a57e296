"""Run a study's units in worker processes on this machine, side by side, so that a small CPU's cores stay busy.

Why: one unit at a time leaves cores idle on a small CPU, because neither kind of unit uses two threads well:
llm-compressor's per-module solves and the engine's decode steps are many small ops. Measured on a 2-core CPU
(embedded model, bench/results/study_workers.md): GPTQ 70-98 s at 2 threads alone, 101-110 s at 1 thread beside
another unit; an evaluation of the nine mini suites 121-155 s vs 184-230 s. Two units at one thread each finish
more of the study per second than one unit at two: the default study 1,273 s with 2 workers, 1,739 s without.

Shape (like the Ray executor, without Ray): this process schedules, the workers run units.compress_task and
units.eval_task. Differences, because everything is on one machine:
- workers write their generations straight into the study's store (SQLite in WAL mode takes several writers on
  one machine), chunk by chunk, so an interrupted study loses no more than the in-process executor does; unit
  rows are written here only;
- an evaluation is submitted once its compression is recorded (this process holds the dependency, not Ray);
- compressions are submitted first: they are on the critical path of their evaluations, and the evaluations
  that are ready fill the other worker;
- every unit runs with the same thread count (cores // workers): results depend on it (a GPTQ checkpoint made
  at 1 thread differs from one made at 2), and a unit must give the same result whichever unit it ran beside;
- a worker that dies (killed, out of memory) is replaced and its unit run again, at most MAX_RETRIES times,
  then recorded as failed; the other workers' units go on (each worker is a pool of one process). Ctrl-C here
  stops the workers (they ignore SIGINT themselves); what they committed stays.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comptrust.store import STORE_NAME, Store
from comptrust.study.plan import Plan, instance_key
from comptrust.study.spec import StudySpec, Variant
from comptrust.study.units import backend_for, compress_task, eval_task, model_work, record_compress, record_eval

MAX_RETRIES = 2  # re-runs of a unit whose worker died
PER_WORKER_BASE = 1.5 * 2**30  # a worker's memory beyond the model: torch, transformers, llm-compressor
PER_WORKER_WEIGHTS = 6  # x the model's weight files: its bf16 copy, fp32 during compression, a reloaded checkpoint


@dataclass
class _Job:
    kind: str  # compress | eval
    v: Variant
    seed: int | None
    ckpt: Path | None = None
    model_ref: str | None = None
    pending: list[str] = field(default_factory=list)
    tries: int = 0

    @property
    def inst(self) -> str:
        return instance_key(self.v, self.seed)


def auto_workers(spec: StudySpec, cores: int, models: int, mem_available: int | None = None,
                 weight_bytes: int | None = None) -> tuple[int, str]:
    """How many worker processes a local study gets when --workers is not given, and why (one line).

    Several only on a CPU (a GPU runs one unit at a time, its batches fill it), with at least two cores, when the
    model's weights are on this machine (their size bounds each worker's memory) and that many workers fit in
    the memory available now. One worker per core, at most one per model of the study (`models`: the dense model
    and every compressed variant at every seed).
    """
    if cores < 2:
        return 1, "one core"
    if spec.device not in ("auto", "cpu") or (spec.device == "auto" and _has_cuda()):
        return 1, "a GPU runs one unit at a time"
    weight_bytes = _weight_bytes(spec.model) if weight_bytes is None else weight_bytes
    if weight_bytes is None:
        return 1, f"the size of {spec.model} is not known here"
    mem_available = _mem_available() if mem_available is None else mem_available
    per = PER_WORKER_BASE + PER_WORKER_WEIGHTS * weight_bytes
    by_memory = int(mem_available // per) if mem_available else 1
    n = max(1, min(cores, by_memory, models))
    why = (f"{cores} cores, {models} models, memory for {by_memory} "
           f"({per / 2**30:.1f} GiB each of {mem_available / 2**30:.1f} GiB available)")
    return n, why


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 -- no usable torch build: no GPU
        return False


def _weight_bytes(model: str | None) -> int | None:
    """Size of the model's weight files when they are on this machine (the embedded model, a GGUF file, a local
    directory); None for a Hub id (not resolved here: that could download)."""
    p = Path(model).expanduser() if model and model != "embedded" else None
    if p is None:
        from comptrust.models.resolve import embedded_gguf

        try:
            p = embedded_gguf()
        except Exception:  # noqa: BLE001 -- not installed: the study reports that itself
            return None
    if p.is_file():
        return p.stat().st_size * (4 if p.suffix.lower() == ".gguf" else 1)  # a GGUF is quantized: ~4x as bf16
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
    return None


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _resolve_once(model: str | None) -> None:
    """Resolve (for a GGUF: convert) the model here before the workers start, so that they do not all convert
    it at once; each then finds it cached. A model that does not resolve is left to the units to report."""
    from comptrust.models.resolve import resolve

    try:
        resolve(model)
    except Exception:  # noqa: BLE001 -- the units record the error, one line each, as without workers
        pass


def _init_worker(threads: int) -> None:
    """Before anything in the worker imports torch: its thread count; Ctrl-C is the driver's to handle."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(pool: ProcessPoolExecutor, job: _Job, spec_dict: dict[str, Any], spec: StudySpec, store_path: Path,
           threads: int, log_path: Path | None) -> Future:
    log = str(log_path) if log_path else None
    if job.kind == "compress":
        return pool.submit(compress_task, spec_dict, job.v.name, job.seed or 0, str(job.ckpt), threads, log)
    return pool.submit(eval_task, spec_dict, job.model_ref, job.pending, spec.device, threads, None,
                       backend_for(spec, job.v), str(store_path), log)


def run_in_pool(spec: StudySpec, out_dir: Path, plan: Plan, store: Store, say: Any, workers: int,
                cores: int, log_path: Path | None = None, models_dir: Path | None = None) -> None:
    threads = max(1, cores // workers)
    say(f"{workers} worker processes, {threads} CPU thread{'s' if threads > 1 else ''} each")
    spec_dict = {k: v for k, v in spec.to_dict().items() if k != "source"}
    stored = store.units()
    ready: deque[_Job] = deque()
    waiting: dict[str, _Job] = {}  # evaluations whose compression is still to be made
    for v, seed in plan.instances():
        w = model_work(spec, plan, stored, v, seed, out_dir, models_dir)
        if w.need_compress:
            ready.append(_Job("compress", v, seed, ckpt=w.ckpt))
        if w.pending:
            job = _Job("eval", v, seed, ckpt=w.ckpt, model_ref=w.model_ref, pending=w.pending)
            if w.need_compress:
                waiting[instance_key(v, seed)] = job
            else:
                ready.append(job)
    ready = deque(sorted(ready, key=lambda j: j.kind != "compress"))  # stable: the plan's order within a kind
    store_path = out_dir / STORE_NAME
    _resolve_once(spec.model)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this process's torch threads

    def new_slot() -> ProcessPoolExecutor:  # one pool of one process per worker: a death breaks only its own
        return ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker, initargs=(threads,))

    slots = [new_slot() for _ in range(workers)]
    running: dict[Future, tuple[int, _Job]] = {}
    try:
        while ready or running:
            busy = {slot for slot, _ in running.values()}
            free = [i for i in range(workers) if i not in busy]
            while ready and free:
                job, i = ready.popleft(), free.pop(0)
                say(f"{job.kind} {job.inst}" + (f" on {', '.join(job.pending)}" if job.kind == "eval" else ""))
                running[_start(slots[i], job, spec_dict, spec, store_path, threads, log_path)] = (i, job)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                i, job = running.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool:  # its worker died: a new one, and the unit runs again
                    slots[i].shutdown(wait=True)
                    slots[i] = new_slot()
                    job.tries += 1
                    if job.tries <= MAX_RETRIES:
                        say(f"worker died during {job.kind} {job.inst}; running it again")
                        ready.appendleft(job)
                        continue
                    out = {"status": "failed", "seconds": 0.0,
                           "error": f"worker died {job.tries} times (killed or out of memory)"}
                _record(store, spec, job, out, say, waiting, ready)
    except BaseException:
        for slot in slots:
            _stop(slot)
        raise
    for slot in slots:
        slot.shutdown(wait=True)


def _record(store: Store, spec: StudySpec, job: _Job, out: dict[str, Any], say: Any, waiting: dict[str, _Job],
            ready: deque[_Job]) -> None:
    secs = out.get("seconds", 0.0)
    ok = out["status"] == "done"
    if job.kind == "compress":
        record_compress(store, job.v, job.seed or 0, secs, out.get("record"), out.get("error"), job.ckpt)
        say(f"compress {job.inst} in {secs:.0f} s" if ok else f"FAILED compress {job.inst}: {out['error']}")
        say.finished("compress", 1, secs, failed=not ok, instance=job.inst)
        after = waiting.pop(job.inst, None)
        if after is not None and ok:
            ready.append(after)
        elif after is not None:
            say.blocked(len(after.pending), instance=job.inst)
        return
    record_eval(store, spec, job.v, job.seed, job.pending, secs, out.get("outcome"), out.get("error"))
    say(f"evaluate {job.inst} in {secs:.0f} s" if ok else f"FAILED evaluate {job.inst}: {out['error']}")
    say.finished("eval", len(job.pending), secs, failed=not ok, instance=job.inst)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Ctrl-C or an error here: end the workers now (a compression in flight cleans its temporary folder on
    SIGTERM; generations already committed stay in the store)."""
    procs = list(getattr(pool, "_processes", {}).values())  # no public way to end a pool's workers before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
