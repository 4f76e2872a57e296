"""Progress a person can plan by: stage lines at once, a bar that moves inside long batches, lines when piped.

Why this shape: the generation of a run used to be shown per committed chunk (128 prompts), so on a CPU the bar sat
at 0 with no ETA for minutes, then jumped; and nothing at all was printed when stderr was a file (nohup, Slurm).
Now the bar advances after every engine batch (CachedEngine's on_batch) and, inside a batch, after decode steps
(the HF engine's on_step hook: prompts in the batch x steps done / max new tokens), so it moves every few seconds
and rich can estimate an ETA within the first minute. When stderr is not a terminal the same numbers go out as
plain lines (counts, rate, ETA) at most every LINE_EVERY seconds, plus one at the end.

Cache hits count as done at once; the ETA is from the generation rate measured so far.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LINE_EVERY = 10.0  # seconds between plain progress lines when stderr is not a terminal


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
    def start(self, total: int, label: str) -> None:
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
            TimeRemainingColumn,
        )

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
        self.advance(n, tokens)

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

    def eta(self) -> float | None:
        r = self.rate()
        left = self.total - self.done - self.partial
        return left / r if r else None

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


def _console(stream: TextIO):
    from rich.console import Console

    return Console(file=stream)
