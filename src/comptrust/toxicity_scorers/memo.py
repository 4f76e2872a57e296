"""A scorer that remembers its texts' scores, and can start scoring before they are asked for."""

from __future__ import annotations

from typing import Any

from comptrust.toxicity_scorers.base import Scorer


class MemoScorer:
    """A toxicity scorer that remembers its texts' scores: a perspective's score and its bootstrap resamples score
    the same texts, each once.

    prefetch(texts) starts scoring texts ahead of need where the wrapped scorer can do it in the background (a
    toxicity_scorers.pool.ParallelScorer with a pool for that many texts); score() then collects them. Elsewhere
    prefetch does nothing and score() scores as it always did: the values are the wrapped scorer's either way."""

    def __init__(self, inner: Scorer):
        self.inner, self.name = inner, inner.name
        self.memo: dict[str, float | None] = {}
        self._pending: list[tuple[list[str], Any]] = []

    def prefetch(self, texts: list[str]) -> bool:
        """Begin scoring the texts not yet known; True when that runs in the background."""
        submit = getattr(self.inner, "submit", None)
        wants = getattr(self.inner, "parallel", None)
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if not new or submit is None or not callable(wants) or not wants(len(new)):
            return False
        self._pending.append((new, submit(new)))
        return True

    def _collect(self) -> None:
        while self._pending:
            texts, pending = self._pending.pop(0)
            self.memo.update(zip(texts, pending.result()))

    def score(self, texts: list[str]) -> list[float | None]:
        self._collect()
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.inner.score(new)))
        return [self.memo[t] for t in texts]
