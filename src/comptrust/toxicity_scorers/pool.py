"""Scoring many texts on several CPU cores: the offline scorers' work split over a pool of worker processes.

The offline scorers (offline, lexicon, profanity-check) score every text on its own, single-threaded in Python
(regular expressions, a bag-of-words model): ~4 ms a text for `offline`, so the full profile's 180k toxicity
generations take minutes on one core. `ParallelScorer` cuts a large batch into contiguous slices, scores them in
worker processes and joins the slices in input order: the same scores, in the same order, as the wrapped scorer
run in this process (each text's score depends on that text alone; tests/test_toxicity_parallel.py checks it).

Workers: COMPTRUST_SCORE_WORKERS if set (0 or 1: never a pool), else the usable cores less one, and no pool on
fewer than 4 cores (a 2-core laptop scores in process, as before). Batches under PARALLEL_MIN_TEXTS are scored in
process too. The workers are started on first use (fresh interpreters that import only the scorers: they
inherit neither CUDA nor the engine's threads, and the caller's script is not run again) and live until the
process exits. `submit()` starts scoring and returns at once, so a caller can score
one perspective's generations while the engine generates the next's.

The pipe between this process and a worker carries JSON lines (never pickle: no deserialisation of code-bearing
objects, as everywhere in comptrust): the scorer's name and the texts one way, the scores or an error message back.
A worker builds its scorer with get_scorer(name), so only scorers built from a name with no options are pooled
(what resolve_scorer makes).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any

from comptrust.errors import RuntimeFailure, UsageError
from comptrust.toxicity_scorers.base import Scorer

PARALLEL_MIN_TEXTS = 512  # below this one process scores faster than shipping slices to workers
SLICES_PER_WORKER = 4  # several slices per worker, so that a slow slice does not leave the others idle
ENV_WORKERS = "COMPTRUST_SCORE_WORKERS"


def score_workers() -> int:
    """How many worker processes scoring may use (1: score in this process)."""
    raw = os.environ.get(ENV_WORKERS, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise UsageError(f"{ENV_WORKERS}={raw!r}: expected a whole number of worker processes (0 or 1: none)") from None
        if n < 0:
            raise UsageError(f"{ENV_WORKERS}={raw!r}: expected a whole number of worker processes (0 or 1: none)")
        return max(n, 1)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores - 1 if cores >= 4 else 1


def _worker_main() -> None:
    """A worker process: read {"scorer": name, "texts": [...]} lines from stdin, write {"ok": scores} or
    {"error": message} lines to stdout, until stdin closes. Each scorer is built once, by name."""
    from comptrust.toxicity_scorers import get_scorer

    stdout = sys.stdout
    scorers: dict[str, Any] = {}
    for line in sys.stdin:
        try:
            msg = json.loads(line)
            name = msg["scorer"]
            if name not in scorers:
                scorers[name] = get_scorer(name)
            reply: dict[str, Any] = {"ok": list(scorers[name].score(msg["texts"]))}
        except Exception as e:  # sent back: the parent raises it in the caller's thread
            reply = {"error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


class _Worker:
    """One scoring process (started with this interpreter and this process's sys.path, importing only the scorer
    modules: no fork of a process with CUDA or engine threads, and no re-run of the caller's main script) and the
    thread that feeds it slices from the pool's queue."""

    def __init__(self, jobs: "queue.Queue[tuple[str, list[str], Future] | None]"):
        code = (f"import sys; sys.path[:0] = {[p for p in sys.path if p]!r}; "
                "from comptrust.toxicity_scorers.pool import _worker_main; _worker_main()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                     text=True, encoding="utf-8")
        self.jobs = jobs
        threading.Thread(target=self._run, daemon=True, name="comptrust-score-worker").start()

    def _run(self) -> None:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        while True:
            job = self.jobs.get()
            if job is None:
                return
            name, texts, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                stdin.write(json.dumps({"scorer": name, "texts": texts}) + "\n")
                stdin.flush()
                line = stdout.readline()
                if not line:
                    raise EOFError("no reply")
                reply = json.loads(line)
            except (OSError, EOFError, ValueError) as e:
                fut.set_exception(RuntimeFailure(f"a toxicity scoring worker (pid {self.proc.pid}) stopped: "
                                                 f"{type(e).__name__}; exit code {self.proc.poll()}"))
                return
            if "ok" in reply:
                fut.set_result(reply["ok"])
            else:
                fut.set_exception(RuntimeFailure(f"toxicity scoring worker: {reply.get('error')}"))

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


class _Pool:
    """`workers` scoring processes sharing one queue of slices."""

    def __init__(self, workers: int):
        self.jobs: "queue.Queue[tuple[str, list[str], Future] | None]" = queue.Queue()
        self.workers = [_Worker(self.jobs) for _ in range(workers)]

    def submit(self, name: str, texts: list[str]) -> Future:
        fut: Future = Future()
        self.jobs.put((name, texts, fut))
        return fut

    def close(self) -> None:
        for _ in self.workers:
            self.jobs.put(None)
        for w in self.workers:
            w.close()


_POOLS: dict[int, _Pool] = {}
_LOCK = threading.Lock()


def _pool(workers: int) -> _Pool:
    with _LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = _Pool(workers)
        return pool


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


class PendingScores:
    """Scores being computed by the pool; result() waits for them and returns them in input order."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def result(self) -> list[float | None]:
        out: list[float | None] = []
        for fut in self.futures:
            out.extend(fut.result())
        return out


class ParallelScorer:
    """A scorer that scores large batches with `inner` in worker processes (each builds get_scorer(inner.name));
    small ones (and all of them where score_workers() is 1) in this process. Same name, same scores, same order
    as `inner`."""

    def __init__(self, inner: Scorer, workers: int | None = None, min_texts: int = PARALLEL_MIN_TEXTS):
        self.inner = inner
        self.name = inner.name
        self.workers = score_workers() if workers is None else max(1, workers)
        self.min_texts = min_texts

    def parallel(self, n_texts: int) -> bool:
        """Whether a batch of n_texts goes to the workers."""
        return self.workers > 1 and n_texts >= self.min_texts

    def submit(self, texts: list[str]) -> PendingScores:
        """Start scoring `texts` in the pool and return at once."""
        texts = list(texts)
        n = min(len(texts), self.workers * SLICES_PER_WORKER) or 1
        bounds = [len(texts) * k // n for k in range(n + 1)]
        slices = [texts[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        pool = _pool(self.workers)
        return PendingScores([pool.submit(self.name, s) for s in slices])

    def score(self, texts: list[str]) -> list[float | None]:
        if not self.parallel(len(texts)):
            return self.inner.score(texts)
        return self.submit(texts).result()


def parallel_scorer(scorer: Scorer) -> Scorer:
    """`scorer` wrapped in a ParallelScorer when it can run in worker processes (its class says so with
    `process_safe = True`: the offline scorers; not a GPU classifier, nor the rate-limited Perspective client)
    and more than one worker is allowed; else `scorer` itself. For a scorer built with get_scorer(name) and no
    options (what resolve_scorer passes): the workers build theirs by that name."""
    if isinstance(scorer, ParallelScorer) or not getattr(type(scorer), "process_safe", False):
        return scorer
    workers = score_workers()
    return ParallelScorer(scorer, workers) if workers > 1 else scorer
