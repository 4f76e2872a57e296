"""Progress a person can plan by: stage lines at once, a bar that moves inside long batches, lines when piped.

Why this shape: the generation of a run used to be shown per committed chunk (128 prompts), so on a CPU the bar sat
at 0 with no ETA for minutes, then jumped; and nothing at all was printed when stderr was a file (nohup, Slurm).
Now the bar advances after every engine batch (CachedEngine's on_batch) and, inside a batch, after decode steps
(the HF engine's on_step hook: prompts in the batch x steps done / max new tokens), so it moves every few seconds
and rich can estimate an ETA within the first minute. When stderr is not a terminal the same numbers go out as
plain lines (counts, rate, ETA) at most every LINE_EVERY seconds, plus one at the end.

Cache hits count as done at once. The ETA is weighted by what remains, not by prompt counts: the cost of each
perspective's prompts is estimated from their length (prefill) and their decode steps (work_of), and the rate is
measured in those units. Why: the perspectives run in a fixed order and
toxicity's and stereotype's 150-token continuations come first, so a rate in prompts/s measured in the first
minute was ~2.5x too slow for the short-answer perspectives after them (bench/results/progress_22/eta.md).

Study level (StudyProgress): an estimate before any unit runs, from the plan's work (the same weights, per
perspective) and a rate prior (this machine's rates from earlier runs in $COMPTRUST_HOME/rates.json, else the rate
the running evaluation measures, else a rough built-in figure for the embedded model on a 2-core CPU), improved
with every unit that finishes; failed units are counted as failed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping, Sequence, TextIO

LINE_EVERY = 10.0  # seconds between plain progress lines when stderr is not a terminal
# cost model of generating a set of prompts, in "characters": each prompt's text (prefill) plus STEP_WEIGHT per decode
# step, where the prompts of one max_new_tokens group share their steps in batches of up to BATCH_GUESS sequences.
# Fitted on the embedded model, 2-core CPU (bench/results/progress_22/eta.md): prefill ~1.4 ms per character, a
# decode step ~0.15 s whatever the batch size up to ~36; the fit's residuals are ~30% per perspective
STEP_WEIGHT = 100.0
BATCH_GUESS = 32
LAST_RATE: dict[str, float] = {}  # "work_per_s": the latest generation rate measured (read by StudyProgress)


def _chars(prompt: Any) -> int:
    raw = getattr(prompt, "raw", None)
    return len(raw) if raw is not None else sum(len(m.content) for m in getattr(prompt, "messages", ()))


def work_of(prompts: Sequence[Any]) -> float:
    """Estimated cost of generating `prompts` together (one generate call), in characters: their text plus
    STEP_WEIGHT per decode step (prompts with the same new-token budget share steps, BATCH_GUESS at a time)."""
    groups: dict[int, int] = {}
    chars = 0
    for p in prompts:
        chars += _chars(p)
        params = getattr(p, "params", None)
        new = params.max_new_tokens if params is not None else 16
        groups[new] = groups.get(new, 0) + (max(params.n, 1) if params is not None else 1)
    steps = sum(-(-count // BATCH_GUESS) * new for new, count in groups.items())
    return float(chars + STEP_WEIGHT * steps)


def stage(msg: str, stream: TextIO | None = None) -> None:
    """One status line on stderr, flushed at once (a first sign of life before slow imports and loads)."""
    s = stream or sys.stderr
    print(f"[comptrust] {msg}", file=s, flush=True)


def _short_label(label: str, width: int = 36) -> str:
    """'generating (toxicity, stereotype, ... mmlu)' -> 'generating (9 perspectives)': a long label took the
    terminal's width from the bar, and rich cut off the ETA column."""
    if len(label) <= width or " (" not in label:
        return label
    head, _, rest = label.partition(" (")
    return f"{head} ({rest.rstrip(')').count(',') + 1} perspectives)"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class GenerationProgress:
    """Progress over the prompts of one run.

    mode: "bar" (rich bar, a terminal), "lines" (plain lines, e.g. stderr is a file) or "off".
    Calls: start(total, label) once (later calls are ignored: one bar for all perspectives); advance(n, tokens)
    for finished prompts (cache hits, engine batches); step(prompts, done, max_new) from inside a batch;
    commit(n, tokens) per committed chunk (advances whatever the batches did not already report); stop().
    """

    def __init__(self, mode: str = "bar", stream: TextIO | None = None, every: float = LINE_EVERY):
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode {mode!r}")
        self.mode = mode
        self.stream = stream or sys.stderr
        self.every = every
        self.bar = None
        self.task = None
        self.total = 0
        self.done = 0.0  # prompts finished (cache hits included)
        self.partial = 0.0  # fraction of the running batch, in prompts
        self.tokens = 0
        self.generated = 0  # prompts generated now (not cache hits)
        self.t0 = time.time()
        self.t_gen: float | None = None  # when the first prompt was handed to the engine
        self._since_commit = 0
        self._tokens_since_commit = 0
        self._last_line = 0.0
        self.label = ""
        self.segments: list[tuple[int, float]] = []  # (prompts, work) of each generate call, in order (plan())
        self.hit_work = 0.0  # work of cache hits (done, but not generated: kept out of the rate)
        # time between one generate call's last batch and the next call's start is not generation (parsing, and
        # toxicity's scoring, which evaluate starts there): kept out of the rate
        self.idle = 0.0
        self._last_gen: float | None = None

    @classmethod
    def for_stream(cls, enabled: bool | None, stream: TextIO | None = None) -> "GenerationProgress":
        """enabled None: a bar on a terminal, lines otherwise; False: off; True: a bar."""
        s = stream or sys.stderr
        if enabled is False:
            return cls("off", s)
        if enabled is None and not s.isatty():
            return cls("lines", s)
        return cls("bar", s)

    # -- events ------------------------------------------------------------------------------------------------
    def plan(self, segments: Sequence[Sequence[Any]]) -> None:
        """The prompts of each generate call, in the order they will run: the ETA is then weighted by their
        estimated cost (work_of) instead of counting every prompt as equal."""
        self.segments = [(len(ps), work_of(ps)) for ps in segments if len(ps)]

    def work_at(self, position: float) -> float:
        """Estimated work done when `position` prompts (in plan order) are done; prompts when there is no plan."""
        if not self.segments:
            return position
        work, left = 0.0, position
        for n, w in self.segments:
            if left <= n:
                return work + w * left / n
            work, left = work + w, left - n
        return work

    def total_work(self) -> float:
        return sum(w for _, w in self.segments) if self.segments else float(self.total)

    def _idle_now(self, now: float) -> float:
        """Seconds since the last batch when every prompt of the calls so far is done (between two calls)."""
        if self._last_gen is None or self.partial or not self.segments:
            return 0.0
        ends, acc = set(), 0
        for n, _ in self.segments:
            acc += n
            ends.add(acc)
        return now - self._last_gen if self.done in ends else 0.0

    def start(self, total: int, label: str) -> None:
        if self.total and self.mode != "off":  # the next generate call begins: the pause before it is not generation
            self.idle += self._idle_now(time.time())
            self._last_gen = None
        if self.total or total == 0 or self.mode == "off":
            return
        self.total, self.label = total, _short_label(label)
        self.t0 = time.time()
        # the weights load on the engine's first batch (seconds to minutes): say so before the bar sits at 0
        stage(f"{total} prompts to answer; loading the model weights (first batch), then generating", self.stream)
        if self.mode == "lines":
            self._line(force=True)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("prompts"),
            TimeElapsedColumn(),
            _EtaColumn(self),
            TextColumn("{task.fields[rate]}"),
            transient=False,
            console=_console(self.stream),
        )
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=total, rate="")

    def engine_started(self) -> None:
        """The first batch is about to be generated (the model loads first: its time is not a generation rate)."""
        if self.t_gen is None:
            self.t_gen = time.time()

    def advance(self, n: int, tokens: int = 0) -> None:
        """n prompts done that were not generated by an engine batch (cache hits): not part of the rate."""
        if n:
            self.hit_work += self.work_at(self.done + n) - self.work_at(self.done)
        self.done += n
        self.tokens += tokens
        self._show()

    def batch(self, n: int, tokens: int) -> None:
        """An engine batch of n prompts finished (CachedEngine's on_batch)."""
        self.engine_started()
        self.generated += n
        self.partial = 0.0
        self._since_commit += n
        self._tokens_since_commit += tokens
        self.done += n
        self.tokens += tokens
        self._last_gen = time.time()
        self._show()

    def step(self, prompts: int, steps_done: int, max_new: int) -> None:
        self.engine_started()
        self.partial = prompts * min(steps_done, max_new) / max(max_new, 1) * 0.999
        self._show()

    def commit(self, n: int, tokens: int) -> None:
        """A chunk of n prompts was committed; engines that report no batches advance here."""
        rest, rest_tok = n - self._since_commit, tokens - self._tokens_since_commit
        self._since_commit = self._tokens_since_commit = 0
        if rest > 0:
            self.engine_started()
            self.generated += rest
            self.done += rest
            self._last_gen = time.time()
            self.tokens += max(rest_tok, 0)
            self._show()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif self.mode == "lines" and self.total:
            self._line(force=True)

    # -- display -----------------------------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Prompts per second since generation started (fractional progress inside batches included)."""
        if self.t_gen is None:
            return None
        dt = time.time() - self.t_gen
        gen = self.generated + self.partial
        return gen / dt if dt > 0.5 and gen > 0 else None

    def work_rate(self) -> float | None:
        """Estimated work (work_of units) generated per second since generation started."""
        if self.t_gen is None:
            return None
        now = time.time()
        dt = now - self.t_gen - self.idle - self._idle_now(now)
        gen = self.work_at(self.done + self.partial) - self.hit_work
        if dt > 0.5 and gen > 0:
            LAST_RATE["work_per_s"] = gen / dt
            return gen / dt
        return None

    def eta(self) -> float | None:
        """Seconds left: the estimated work left over the work rate measured so far."""
        r = self.work_rate()
        left = self.total_work() - self.work_at(self.done + self.partial)
        return max(left, 0.0) / r if r else None

    def _show(self) -> None:
        if self.bar is not None:
            dt = max(time.time() - self.t0, 1e-6)
            self.bar.update(self.task, completed=min(self.done + self.partial, self.total),
                            rate=f"{self.tokens / dt:.0f} tok/s")
        elif self.mode == "lines":
            self._line()

    def _line(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_line < self.every:
            return
        self._last_line = now
        shown = min(self.done + self.partial, self.total)
        pct = 100 * shown / self.total if self.total else 100.0
        r = self.rate()
        rate = f"{r:.2f} prompts/s, {self.tokens / max(now - (self.t_gen or now), 1e-6):.0f} tok/s" if r else "rate ?"
        print(f"[comptrust] {self.label}: {shown:.0f}/{self.total} prompts ({pct:.0f}%), {rate}, "
              f"elapsed {_clock(now - self.t0)}, ETA {_clock(self.eta()) if shown < self.total else '0:00'}",
              file=self.stream, flush=True)


def eta_text(bar: "GenerationProgress") -> str:
    """'ETA m:ss' as the bar shows it, computed when drawn: it keeps falling (or the rate keeps dropping) during
    a long prefill with no event, instead of standing still."""
    if bar.done + bar.partial >= bar.total:
        return "ETA 0:00"
    return f"ETA {_clock(bar.eta())}"


def _EtaColumn(bar: GenerationProgress) -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class EtaColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(eta_text(bar))

    return EtaColumn()


def _console(stream: TextIO):
    from rich.console import Console

    return Console(file=stream)


# -- study level ----------------------------------------------------------------------------------------------------
# priors when nothing was measured on this machine yet: the embedded model on the shared 2-core CPU. Evaluation:
# work_of units per second of a whole eval unit (model load and scoring included; -p all --limit 1 is ~154k units,
# ~230 s). Compression: seconds per method (bench/results/compress_table.md, wall s). Marked "rough" when used.
DEFAULT_EVAL_RATE = 650.0
DEFAULT_COMPRESS_S = {"rtn": 22.0, "gptq": 155.0, "awq": 540.0, "magnitude": 19.0, "sparsegpt": 150.0,
                      "wanda": 100.0, "gguf": 30.0}
RATES_FILE = "rates.json"


def _rates_path() -> Any:
    from comptrust.paths import home

    return home() / RATES_FILE


def load_rates() -> dict[str, Any]:
    """Rates measured by earlier studies on this machine ({key: {"eval": work/s, "compress": {method: s}}})."""
    try:
        d = json.loads(_rates_path().read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except Exception:  # a missing or damaged file is no prior, never a failure
        return {}


def save_rate(key: str, kind: str, value: float, method: str | None = None) -> None:
    """Keep a measured rate for the next study's up-front estimate (best effort: a read-only home is no error)."""
    try:
        rates = load_rates()
        entry = rates.setdefault(key, {})
        if kind == "compress" and method:
            entry.setdefault("compress", {})[method] = round(value, 2)
        else:
            entry["eval"] = round(value, 2)
        from comptrust.store import write_atomic

        write_atomic(_rates_path(), json.dumps(rates, indent=1, sort_keys=True))
    except Exception:
        pass


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else _clock(seconds)


class StudyProgress:
    """The study's own lines: an estimate before any unit runs, improved as units finish; failed units apart.

    todo: the plan's rows of units still to run, in execution order ({"kind": "compress"|"eval", "perspective",
    "variant", ...}); work: estimated cost per perspective (work_of of its prompts); methods: variant name ->
    compression method; key: what the stored rates are kept under (model, backend, device, host).
    Calls (the runner's and the executors'): say(msg) prints a line; finished(kind, n, seconds, failed=...,
    instance=...) after each unit (or an instance's eval units together); blocked(n, instance=...) for eval units
    that will not run. instance: the model whose units these are; without it, the first n queued (units finishing
    in plan order, as in the in-process runner). parallel: units running side by side (the worker pool); the
    measured rates are those of one unit among them, so the time left is divided by it.
    """

    def __init__(self, total: int, done: int, todo: Sequence[Mapping[str, Any]] = (),
                 work: Mapping[str, float] | None = None, methods: Mapping[str, str] | None = None,
                 key: str | None = None, stream: TextIO | None = None, parallel: int = 1):
        self.total, self.done, self.failed, self.t0 = total, done, 0, time.time()
        self.parallel = max(1, parallel)
        self.stream = stream
        self.work = dict(work or {})
        self.methods = dict(methods or {})
        self.key = key
        self.queue: dict[str, list[Mapping[str, Any]]] = {"compress": [], "eval": []}
        for r in todo:
            self.queue.setdefault(r["kind"], []).append(r)
        stored = load_rates().get(key or "", {}) if key else {}
        self.eval_prior: tuple[float, str] | None = (
            (float(stored["eval"]), "measured before") if isinstance(stored.get("eval"), (int, float)) else None)
        self.compress_prior: dict[str, float] = {m: float(s) for m, s in (stored.get("compress") or {}).items()
                                                 if isinstance(s, (int, float))}
        self.eval_done: list[tuple[float, float]] = []  # (work, seconds) of eval units that finished done
        self.compress_done: dict[str, list[float]] = {}

    @property
    def left(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.queue.items()}

    def __call__(self, msg: str) -> None:
        print(f"[study] {msg}", file=self.stream or sys.stderr, flush=True)

    # -- estimate --------------------------------------------------------------------------------------------------
    def eval_rate(self) -> tuple[float, str]:
        if self.eval_done:
            w, s = sum(x for x, _ in self.eval_done), sum(y for _, y in self.eval_done)
            if s > 0 and w > 0:
                return w / s, "measured"
        if self.eval_prior:
            return self.eval_prior
        if LAST_RATE.get("work_per_s"):  # the evaluation running now (generation only: a little optimistic)
            return LAST_RATE["work_per_s"], "measured so far"
        return DEFAULT_EVAL_RATE, "rough"

    def compress_seconds(self, method: str) -> tuple[float, str]:
        if self.compress_done.get(method):
            v = self.compress_done[method]
            return sum(v) / len(v), "measured"
        if method in self.compress_prior:
            return self.compress_prior[method], "measured before"
        if method in DEFAULT_COMPRESS_S:
            return DEFAULT_COMPRESS_S[method], "rough"
        measured = [s for v in self.compress_done.values() for s in v]
        return (sum(measured) / len(measured), "rough") if measured else (120.0, "rough")

    def estimate(self) -> tuple[float, str]:
        """(seconds left, how sure): 'measured' once every kind left has a measured rate, else 'rough'/'prior'."""
        rate, how = self.eval_rate()
        left = sum(self.work.get(str(r.get("perspective")), 0.0) for r in self.queue["eval"]) / rate
        hows = {how} if self.queue["eval"] else set()
        for r in self.queue["compress"]:
            s, h = self.compress_seconds(self.methods.get(str(r.get("variant")), ""))
            left += s
            hows.add(h)
        sure = "rough" if "rough" in hows else "prior" if hows - {"measured"} else "measured"
        return left / self.parallel, sure

    def _eta(self) -> str:
        left, sure = self.estimate()
        note = {"measured": "", "prior": " (from rates measured before)",
                "rough": " (rough: built-in figures for what has not run on this machine yet)"}[sure]
        return f"ETA {_dur(left)}{note}"

    def announce(self, out_dir: Any) -> None:
        """The first line: units, what is done, and the estimate before anything runs."""
        todo = sum(self.left.values())
        self(f"{self.total} units ({self.done} done, {todo} to run) in {out_dir}"
             + (f"; {self._eta()}" if todo else ""))

    # -- events ----------------------------------------------------------------------------------------------------
    def _take(self, kind: str, n: int, instance: str | None) -> list[Mapping[str, Any]]:
        """Out of the queue: the first n units of `kind` (of `instance`, where given)."""
        queue = self.queue.setdefault(kind, [])
        picked = [i for i, r in enumerate(queue) if instance is None or r.get("instance") == instance][:n]
        skip = set(picked)
        self.queue[kind] = [r for i, r in enumerate(queue) if i not in skip]
        return [queue[i] for i in picked]

    def blocked(self, n: int, instance: str | None = None) -> None:
        """n eval units that will not run (their compression failed): out of the estimate, counted as failed."""
        self._take("eval", n, instance)
        self.failed += n

    def finished(self, kind: str, n: int, seconds: float, failed: bool = False, instance: str | None = None) -> None:
        units = self._take(kind, n, instance)
        if failed:
            self.failed += n
        else:
            self.done += n
            if kind == "eval" and seconds > 0:
                w = sum(self.work.get(str(r.get("perspective")), 0.0) for r in units)
                if w > 0:
                    self.eval_done.append((w, seconds))
                    if self.key:
                        save_rate(self.key, "eval", self.eval_rate()[0])
            elif kind == "compress" and units and seconds > 0:
                method = self.methods.get(str(units[0].get("variant")), "")
                self.compress_done.setdefault(method, []).append(seconds)
                if self.key and method:
                    save_rate(self.key, "compress", seconds, method)
        finished = self.done + self.failed
        counts = f"{self.done} done" + (f", {self.failed} failed" if self.failed else "")
        todo = sum(self.left.values())
        self(f"{finished}/{self.total} units finished ({counts}), elapsed {_dur(time.time() - self.t0)}"
             + (f", {self._eta()}" if todo else ""))
