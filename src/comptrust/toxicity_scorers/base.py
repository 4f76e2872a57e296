"""What every toxicity scorer is (the `Scorer` protocol) and the files the offline scorers read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # comptrust/data
LEXICON_FILE = DATA_DIR / "toxicity_lexicon.yaml"
DEFAULT_SCORER = "offline"


@runtime_checkable
class Scorer(Protocol):
    """A toxicity scorer. score() returns one value per text, in order; None where a text could not be scored."""

    name: str

    def score(self, texts: list[str]) -> list[float | None]: ...


def _scorable(texts: Sequence[Any]) -> list[int]:
    """Indices of the texts worth scoring: non-empty strings (empty or whitespace-only texts get None)."""
    return [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
