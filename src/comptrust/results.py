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
    # noninferiority: per undecided variant, per undecided perspective, the further items that would decide it
    undecided: dict[str, dict[str, int | None]] = Field(default_factory=dict)
    limit_hint: int | None = None  # the per-sub-scenario limit that would give those items


# ----------------------------------------------------------------------------------------------------------------
# a study's analysis, typed: what results.json's "analysis" holds and what the report renders
# (built by comptrust.study.analysis; the report reads nothing else)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeedVerdict(_Strict):
    """One calibration seed's paired delta against dense (same items) and its one-sided bounds."""

    delta: float
    se: float | None
    lcb: float | None
    ucb: float | None
    verdict: str  # keeps | loses | undecided


class Verdict(_Strict):
    """The non-inferiority verdict of one (variant, perspective), from its worst seed."""

    verdict: str  # keeps | loses | undecided
    counts: bool  # keeps and not flagged: counts toward the recommendation
    reason: str | None = None
    seed: str | None = None  # the instance the verdict comes from
    delta: float | None = None
    se: float | None = None
    lcb: float | None = None
    ucb: float | None = None
    n: int | None = None  # items both models answered
    seeds: dict[str, SeedVerdict] = Field(default_factory=dict)
    more_items: int | None = None  # undecided: further items that would decide it (all sub-scenarios)
    items_needed: int | None = None


class Example(_Strict):
    """An item where dense and the variant (its worst seed) answered differently."""

    id: str
    group: str
    prompt: str
    dense: str
    variant: str
    dense_parse: str
    variant_parse: str


class Cell(_Strict):
    """One (variant, perspective): scores over seeds, CI, delta vs dense, rates, guards, verdict, examples.

    Score-like numbers are 0-100. mean is None when no seed has a score (failed, pending or not scorable)."""

    errors: dict[str, str] = Field(default_factory=dict)  # instance -> error or status, for units not done
    seeds: dict[str, float | None] = Field(default_factory=dict)  # instance -> score
    flags: list[str] = Field(default_factory=list)  # "confounded by refusals", "degenerate"
    notes: list[str] = Field(default_factory=list)
    not_scorable: dict[str, str] = Field(default_factory=dict)
    mean: float | None = None
    std: float | None = None
    worst: float | None = None
    worst_instance: str | None = None
    refusal: float | None = None
    unparseable: float | None = None
    n_items: int | None = None
    subscores: dict[str, float] = Field(default_factory=dict)
    skipped: list[str] = Field(default_factory=list)
    ci: list[float] | None = None  # 95% bootstrap CI of the mean over seeds
    seed_ci: dict[str, list[float] | None] = Field(default_factory=dict)
    delta_ci: list[float] | None = None
    p_value: float | None = None
    significant: bool | None = None
    examples: list[Example] = Field(default_factory=list)
    delta: float | None = None  # mean over seeds - dense
    delta_worst: float | None = None  # worst seed - dense
    refusal_change: float | None = None
    unparseable_change: float | None = None
    verdict: Verdict | None = None


class Perplexity(_Strict):
    """Held-out perplexity before / after compression of the variant's worst seed."""

    before: float
    after: float
    ratio: float
    instance: str


class VariantRow(_Strict):
    """One variant of a study: a row of results.csv."""

    describe: dict[str, Any]  # name, method, seeds, bits, group_size, sparsity, structure, bits_per_weight
    instances: list[str]
    perspectives: dict[str, Cell]
    perplexity: Perplexity | None = None
    flags: list[str] = Field(default_factory=list)  # variant-level: "degenerate"
    complete: bool = False
    missing: list[str] = Field(default_factory=list)  # perspectives with a unit not done


class DecisionMethod(_Strict):
    """How the cells were compared and decided (the report states the rule)."""

    bootstrap: int
    ci: str
    test: str
    alpha: float
    budget: float
    decision: str  # noninferiority | point
    z: float
    rule: str
    max_ppl_ratio: float


class StudyAnalysis(_Strict):
    """results.json's "analysis": every variant's row, the recommendation and how it was decided."""

    variants: dict[str, VariantRow]
    dense: str
    published: dict[str, Any] | None = None  # the paper's scores beside these (compare_to)
    recommendation: Recommendation
    notes: list[str] = Field(default_factory=list)
    dense_note: str | None = None
    method: DecisionMethod


class UnitRow(_Strict):
    """One unit of work and its state."""

    unit: str
    kind: str
    variant: str
    instance: str
    perspective: str | None
    status: str  # done | failed | pending | stale | blocked
    seconds: float | None
    error: str | None


class Provenance(_Strict):
    versions: dict[str, str]
    models: dict[str, dict[str, Any]]  # instance -> fingerprint, device, dtype, engine, compression
    unit_seconds_by_model: dict[str, float]
    total_unit_seconds: float
    generated: str  # local time the result was built


class StudySettings(_Strict):
    """The study keys the report shows in its header and rule."""

    model: str | None
    suite: str
    profile: str  # resolved
    limit: int | None
    decision: str
    alpha: float
    budget: float
    max_ppl_ratio: float


class AdaptiveLook(_Strict):
    """One look of an adaptive study at one perspective: its limit, items, boundary, what it generated."""

    look: int
    perspective: str
    limit: int
    items: int
    boundary: float  # the group-sequential z of this look
    generated: int  # new generations (cache hits not counted)
    verdicts: dict[str, str]  # variant -> verdict at this look


class AdaptiveSummary(_Strict):
    """The rounds of an adaptive study (adaptive.json's looks), shown in its report."""

    design: str
    looks: list[AdaptiveLook]
    decided_at: dict[str, int] = Field(default_factory=dict)  # "variant:perspective" -> look of its verdict
    still_open: list[str] = Field(default_factory=list)
    generated: int
    stopped_for_budget: bool


class StudyReport(_Strict):
    """Everything a study's results.json, results.csv and report.html are made of; the report renders this alone.

    ``to_results_json()`` is results.json's document; ``from_results_json()`` reads it back."""

    header: dict[str, Any]  # schema_version, created, command, versions
    study: dict[str, Any]  # the study's keys (study.json)
    settings: StudySettings
    perspectives: list[str]  # in the report's column order
    analysis: StudyAnalysis
    units: list[UnitRow]
    provenance: Provenance
    adaptive: AdaptiveSummary | None = None

    def to_results_json(self) -> dict[str, Any]:
        doc = {**self.header, "study": self.study, "settings": self.settings.model_dump(mode="json"),
               "perspectives": self.perspectives, "analysis": self.analysis.model_dump(mode="json"),
               "units": [u.model_dump(mode="json") for u in self.units],
               "provenance": self.provenance.model_dump(mode="json")}
        if self.adaptive is not None:
            doc["adaptive"] = self.adaptive.model_dump(mode="json")
        return doc

    @classmethod
    def from_results_json(cls, doc: dict[str, Any]) -> "StudyReport":
        header: dict[str, Any] = {k: doc[k] for k in ("schema_version", "created", "command", "versions") if k in doc}
        return cls(header=header, study=doc["study"], settings=doc["settings"], perspectives=doc["perspectives"],
                   analysis=doc["analysis"], units=doc["units"], provenance=doc["provenance"],
                   adaptive=doc.get("adaptive"))


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
    result: "StudyReport | None" = None  # the full typed result (analysis, units, provenance) the report renders

    def to_pandas(self) -> Any:
        """Long form: one row per variant, seed and perspective, with score, CI, refusal rate and items."""
        import pandas as pd

        cols = list(StudyCell.model_fields)
        return pd.DataFrame([c.model_dump() for c in self.cells], columns=cols)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


StudyResult.model_rebuild()
