"""The plan of a study: its units of work, their ids, fingerprints and the evaluation settings they run with.

Below the runner, the Ray executor, the analysis and the report, which all read it (the runner executes it,
the analysis and the report read stored units through it), so none of them imports another's module to learn
what a unit is. Unit ids:
  compress:<variant>@s<seed>        make the checkpoint
  eval:<instance>:<perspective>     evaluate one model on one perspective (instance = dense | <variant>@s<seed>)
are built here only (compress_unit, eval_unit, Unit.id), never parsed back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from comptrust import perspectives as registry
from comptrust.config import EvalConfig
from comptrust.errors import UsageError
from comptrust.perspectives.base import EvalOptions
from comptrust.study.spec import StudySpec, Variant, parse_spec

SPEC_NAME = "study.json"


def compress_unit(instance: str) -> str:
    """The id of the unit that compresses `instance` (ids are built here and in eval_unit only)."""
    return f"compress:{instance}"


def eval_unit(instance: str, perspective: str) -> str:
    """The id of the unit that evaluates `instance` on `perspective`."""
    return f"eval:{instance}:{perspective}"


def instance_key(v: Variant, seed: int | None) -> str:
    """'dense', or '<variant>@s<seed>': the evaluated model, its checkpoint folder name and part of unit ids."""
    return v.instance(seed)


@dataclass(frozen=True)
class Unit:
    """One unit of work: compress a variant for one seed, or evaluate one model on one perspective.

    The local runner, the Ray executor, --status and the report all read these fields; the id and the instance
    key are built here, never parsed back from strings.
    """

    kind: Literal["compress", "eval"]
    variant: Variant
    seed: int | None  # calibration seed; None for dense
    perspective: str | None  # eval units only
    fingerprint: str  # what a done unit must have been made from (else it is stale)

    @property
    def instance(self) -> str:
        return instance_key(self.variant, self.seed)

    @property
    def id(self) -> str:
        if self.kind == "compress":
            return compress_unit(self.instance)
        assert self.perspective is not None
        return eval_unit(self.instance, self.perspective)


def eval_config(spec: StudySpec) -> EvalConfig:
    """The study's evaluation settings: the EvalConfig every eval unit runs with."""
    return spec.eval_config()


def eval_options(spec: StudySpec) -> EvalOptions:
    return eval_config(spec).to_options()


def eval_fingerprint(spec: StudySpec, variant: Variant, seed: int | None, perspective: str) -> str:
    """What an eval unit is made from: the model, the variant's compression, the perspective (and its version)
    and EvalConfig.fingerprint for that perspective (data, profile, limit, n, seed, fidelity switches and the
    perspective's own arguments)."""
    body = {
        "model": spec.model,
        "variant": None if variant.is_dense else variant.fingerprint(seed or 0),
        "config": eval_config(spec).fingerprint(perspective),
        "perspective": perspective,
        "perspective_version": registry.get(perspective).version,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """Every unit of the study in execution order, with what a done unit must have been made from."""

    spec: StudySpec
    units: list[Unit] = field(default_factory=list)

    @classmethod
    def of(cls, spec: StudySpec) -> "Plan":
        plan = cls(spec)
        for v, seed in plan.instances():
            if not v.is_dense:
                plan.units.append(Unit("compress", v, seed, None, v.fingerprint(seed or 0)))
            for p in spec.perspectives:
                plan.units.append(Unit("eval", v, seed, p, eval_fingerprint(spec, v, seed, p)))
        return plan

    def instances(self) -> list[tuple[Variant, int | None]]:
        """(variant, seed) of every model the study evaluates, in order; seed None for dense."""
        return [(v, seed) for v in self.spec.variants for seed in ([None] if v.is_dense else list(v.seeds))]

    def status(self, stored: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per unit: done | failed | pending | stale (done with other settings) | blocked."""
        rows = []
        failed_compress: set[str] = set()
        for unit in self.units:
            u = stored.get(unit.id)
            inst = unit.instance
            if u is None:
                st = "blocked" if unit.kind == "eval" and inst in failed_compress else "pending"
            elif u["status"] == "done" and u["result"].get("fingerprint") != unit.fingerprint:
                st = "stale"
            else:
                st = u["status"]
            if unit.kind == "compress" and st == "failed":
                failed_compress.add(inst)
            rows.append(
                {"unit": unit.id, "kind": unit.kind, "variant": unit.variant.name, "instance": inst,
                 "perspective": unit.perspective, "status": st,
                 "seconds": u["seconds"] if u else None, "error": u["error"] if u else None}
            )
        return rows


def load_study(out_dir: Path) -> StudySpec:
    path = Path(out_dir) / SPEC_NAME
    if not path.is_file():
        raise UsageError(f"{out_dir} is not a study directory (no {SPEC_NAME}); run comptrust study --out {out_dir}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is damaged ({e}); it is rewritten by rerunning the study with its YAML and "
                         f"--out {out_dir}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is damaged (not a study); rerun the study with its YAML and --out {out_dir}")
    keep = {k: v for k, v in data.items() if k != "source"}
    return parse_spec(keep, str(path))
