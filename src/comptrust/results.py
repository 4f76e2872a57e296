"""Typed results: what an evaluation and a study produced, as pydantic models with JSON round-trips.

Why: results used to be nested dicts read by string keys (``result.scores["toxicity"]["score"]``); a typo was a
KeyError at the end of a run and editors could not follow them. These models are what the Python API returns;
``model_dump_json()`` / ``model_validate_json()`` round-trip them. They are built *from* the files a run writes
(scores.json, results.json, the store), so they never disagree with them.

Layer: types level (pydantic and the standard library; pandas only inside ``to_pandas``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PerspectiveResult(BaseModel):
    """One perspective's outcome. score and refusal_rate are on a 0-100 scale (None: not computable)."""

    model_config = ConfigDict(extra="allow")  # scores.json may carry more (future) keys; they are kept

    perspective: str
    score: float | None
    refusal_rate: float | None = None
    n_items: int = 0
    n_generations: int = 0
    subscores: dict[str, float | None] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    skipped: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    model_fingerprint: str | None = None
    perspective_version: int | None = None
    options_used: dict[str, Any] = Field(default_factory=dict)


class EvalResult(BaseModel):
    """One evaluation: a model on a set of perspectives, as written to ``out_dir/scores.json``."""

    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    perspectives: dict[str, PerspectiveResult]
    not_run: dict[str, str] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    generation: dict[str, Any] = Field(default_factory=dict)
    wall_seconds: float = 0.0
    config: dict[str, Any] = Field(default_factory=dict)  # EvalConfig.model_dump() of the run
    config_fingerprint: str | None = None

    def score(self, perspective: str) -> float | None:
        """The 0-100 score of one perspective (KeyError naming the perspectives run, if it was not)."""
        if perspective not in self.perspectives:
            raise KeyError(f"{perspective!r} was not scored; scored: {', '.join(self.perspectives) or 'none'}")
        return self.perspectives[perspective].score

    @classmethod
    def from_run(cls, run: Any, config: Any = None) -> "EvalResult":
        """From evaluate.evaluate()'s in-memory result (and the EvalConfig that made it)."""
        return cls(
            out_dir=Path(run.out_dir),
            perspectives={k: PerspectiveResult.model_validate(v) for k, v in run.scores.items()},
            not_run=dict(run.not_run),
            model=json.loads(json.dumps(run.model, default=str)),
            generation=dict(run.stats),
            wall_seconds=round(float(run.wall_seconds), 2),
            config=config.model_dump(mode="json") if config is not None else {},
            config_fingerprint=config.fingerprint() if config is not None else None,
        )

    @classmethod
    def load(cls, out_dir: Path | str) -> "EvalResult":
        """Read ``out_dir/scores.json`` (written by ``comptrust evaluate``)."""
        out_dir = Path(out_dir)
        from comptrust.errors import UsageError

        path = out_dir / "scores.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{out_dir} holds no scores.json (not the --out of an evaluation)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{path} is damaged ({e}); rerun the evaluation") from None
        return cls(
            out_dir=out_dir,
            perspectives={k: PerspectiveResult.model_validate(v) for k, v in doc.get("perspectives", {}).items()},
            not_run=doc.get("not_run", {}),
            model=doc.get("model", {}),
            generation=doc.get("generation", {}),
            wall_seconds=doc.get("wall_seconds", 0.0),
            config=doc.get("config", {}),
            config_fingerprint=doc.get("config_fingerprint"),
        )


class CompressResult(BaseModel):
    """A compressed checkpoint: its folder (a valid ``model=`` for evaluate) and its comptrust.json record."""

    path: Path
    label: str
    config: dict[str, Any]
    record: dict[str, Any]


class StudyCell(BaseModel):
    """One (variant, seed, perspective) of a study: a row of :meth:`StudyResult.to_pandas`."""

    variant: str
    instance: str  # "dense" or "<variant>@s<seed>"
    seed: int | None  # calibration seed (None: dense and gguf variants)
    perspective: str
    status: str  # done | failed | pending | stale | blocked
    score: float | None = None
    ci_low: float | None = None  # 95% bootstrap CI over items of this seed's score
    ci_high: float | None = None
    refusal_rate: float | None = None
    n_items: int | None = None
    error: str | None = None


class Recommendation(BaseModel):
    variant: str | None  # None: no compressed variant kept every perspective within budget
    text: str
    kept: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)


class StudyResult(BaseModel):
    """A study directory read back: its cells (one per variant x seed x perspective), per-variant summaries
    (the rows of results.csv, as dicts) and the recommendation."""

    out_dir: Path
    study: dict[str, Any]  # the study's keys (study.json)
    dense: str
    perspectives: list[str]
    cells: list[StudyCell]
    variants: dict[str, dict[str, Any]]  # the analysis per variant: describe, perspectives (mean, std, delta, ...)
    recommendation: Recommendation

    def to_pandas(self) -> Any:
        """Long form: one row per variant, seed and perspective, with score, CI, refusal rate and items."""
        import pandas as pd

        cols = list(StudyCell.model_fields)
        return pd.DataFrame([c.model_dump() for c in self.cells], columns=cols)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
