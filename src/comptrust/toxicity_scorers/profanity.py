"""alt-profanity-check as a scorer: a bag-of-words linear model (fast; misses toxicity without swear words)."""

from __future__ import annotations

from typing import Callable, Sequence

from comptrust.errors import UsageError
from comptrust.toxicity_scorers.base import _scorable


class ProfanityCheckScorer:
    """alt-profanity-check's predict_prob. Empty or whitespace-only texts get None (nothing to judge)."""

    name = "profanity-check"
    process_safe = True  # pure CPU work, one text at a time: toxicity_scorers.pool may run it in workers

    def __init__(self, batch_size: int = 512):
        self.batch_size = batch_size
        self._predict: Callable[[Sequence[str]], Sequence[float]] | None = None

    def _predictor(self) -> Callable[[Sequence[str]], Sequence[float]]:
        if self._predict is None:
            try:
                from profanity_check import predict_prob
            except ImportError:
                raise UsageError(
                    "the 'profanity-check' toxicity scorer needs alt-profanity-check: "
                    "pip install 'comptrust[toxicity]'"
                ) from None
            self._predict = predict_prob
        return self._predict

    def score(self, texts: list[str]) -> list[float | None]:
        out: list[float | None] = [None] * len(texts)
        todo = _scorable(texts)
        if not todo:
            return out
        predict = self._predictor()
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            probs = predict([texts[i] for i in chunk])
            for i, p in zip(chunk, probs):
                out[i] = float(p)
        return out
