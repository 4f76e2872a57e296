"""Optional experiment tracking: `--mlflow` / `--wandb` log a run to MLflow or Weights & Biases.

What is logged, for `comptrust evaluate` and `comptrust study` alike: the run's settings as parameters (the
EvalConfig, or the study file's keys), per-perspective scores, 95% CI bounds, refusal rates and item counts as
metrics (a study: per variant, with the delta vs dense), and the output files (scores.json, generations.jsonl; a
study's report.html, results.csv, results.json) as artifacts. Where the runs go is the tools' own settings:
MLFLOW_TRACKING_URI (default: a local file store, ./mlruns, no server needed; MLFLOW_ALLOW_FILE_STORE=true is set
for file stores, which MLflow 3 otherwise refuses) and MLFLOW_EXPERIMENT_NAME (default "comptrust"); WANDB_PROJECT (default "comptrust"), WANDB_MODE=offline for no network.

Neither package is a dependency: `check()` runs before any work and answers a missing one with the exact install
line (exit 2). This module takes plain dicts (what scores.json / results.json hold) and imports nothing of
comptrust's but errors, so any command can call it after writing its files.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from comptrust.errors import UsageError

# tool -> (import name, the pip line that installs it). mlflow-skinny is MLflow's client without the server and
# UI: it writes the local file store and installs without downgrading anything in comptrust's environment (the
# full `mlflow` pins pyarrow<26 and python-dateutil<3, below what the base install has)
TOOLS = {"mlflow": ("mlflow", "pip install mlflow-skinny"), "wandb": ("wandb", "pip install wandb")}


def check(mlflow: bool = False, wandb: bool = False) -> None:
    """UsageError (one line, the pip line in it) when a requested tracker is not installed; before any work."""
    for flag, wanted in (("mlflow", mlflow), ("wandb", wandb)):
        module, line = TOOLS[flag]
        if wanted and importlib.util.find_spec(module) is None:
            raise UsageError(f"--{flag} needs the {module} package, which is not installed: {line} "
                             "(or pip install 'comptrust[track]' for both trackers)")


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{key}."))
        elif v is not None:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:500]  # MLflow's parameter values are bounded; the full config is in the artifacts
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def evaluation_metrics(scores: Mapping[str, Any]) -> dict[str, float]:
    """scores.json's perspectives -> {"<perspective>/score": ..., "/ci95_low", "/ci95_high", "/refusal_rate",
    "/n_items"} (absent values left out)."""
    out: dict[str, float] = {}
    for name, s in (scores.get("perspectives") or {}).items():
        ci = s.get("ci95") or {}
        for key, value in (("score", s.get("score")), ("ci95_low", ci.get("low")), ("ci95_high", ci.get("high")),
                           ("refusal_rate", s.get("refusal_rate")), ("n_items", s.get("n_items"))):
            if _num(value) is not None:
                out[f"{name}/{key}"] = _num(value)  # type: ignore[assignment]
    return out


def study_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """results.json's analysis -> {"<variant>/<perspective>/score" (mean over seeds), "/delta", "/ci95_low",
    "/ci95_high", "/refusal_rate", "/n_items"}."""
    out: dict[str, float] = {}
    for vname, v in ((results.get("analysis") or {}).get("variants") or {}).items():
        for p, c in (v.get("perspectives") or {}).items():
            ci = c.get("ci") or [None, None]
            for key, value in (("score", c.get("mean")), ("delta", c.get("delta")), ("ci95_low", ci[0]),
                               ("ci95_high", ci[1]), ("refusal_rate", c.get("refusal")), ("n_items", c.get("n_items"))):
                if _num(value) is not None:
                    out[f"{vname}/{p}/{key}"] = _num(value)  # type: ignore[assignment]
    return out


def log_run(name: str, params: Mapping[str, Any], metrics: Mapping[str, float], files: Iterable[Path],
            tags: Mapping[str, str] | None = None, mlflow: bool = False, wandb: bool = False) -> list[str]:
    """Log one run to each requested tracker; returns one line per tracker saying where it went."""
    files = [Path(f) for f in files if Path(f).is_file()]
    said = []
    if mlflow:
        said.append(_mlflow(name, _flat(params), dict(metrics), files, dict(tags or {})))
    if wandb:
        said.append(_wandb(name, dict(params), dict(metrics), files, dict(tags or {})))
    return said


def _mlflow(name: str, params: dict[str, str], metrics: dict[str, float], files: list[Path],
            tags: dict[str, str]) -> str:
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()  # MLflow's classic default
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless this is set; it is the store
        # that needs no server and no database package (mlflow-skinny has no SQLAlchemy for sqlite:///)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "comptrust")
    # MLflow metric keys allow letters, digits, _ - . space / : a perspective or variant name is one of those
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags(tags)
        for i in range(0, len(items := list(params.items())), 100):  # log_params takes at most 100 at a time
            mlflow.log_params(dict(items[i:i + 100]))
        mlflow.log_metrics(metrics)
        for f in files:
            mlflow.log_artifact(str(f))
        run_id = run.info.run_id
    return f"mlflow: run {run_id} in {mlflow.get_tracking_uri()}"


def _wandb(name: str, params: dict[str, Any], metrics: dict[str, float], files: list[Path],
           tags: dict[str, str]) -> str:
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "comptrust", name=name, config=params,
                     tags=[f"{k}={v}"[:64] for k, v in tags.items()], reinit=True)
    try:
        run.log(metrics)
        art = wandb.Artifact(f"{name}-outputs".replace("/", "-")[:128], type="comptrust-outputs")
        for f in files:
            art.add_file(str(f))
        run.log_artifact(art)
        where = run.dir if getattr(run, "settings", None) and run.settings.mode == "offline" else run.url
    finally:
        run.finish()
    return f"wandb: run {run.id} ({where})"


def log_evaluation(out_dir: Path, mlflow: bool = False, wandb: bool = False) -> list[str]:
    """Log an evaluation from its --out folder (scores.json, generations.jsonl)."""
    out_dir = Path(out_dir)
    scores = json.loads((out_dir / "scores.json").read_text(encoding="utf-8"))
    params = {"model": (scores.get("model") or {}).get("spec") or (scores.get("model") or {}).get("name"),
              "perspectives": ",".join(scores.get("perspectives") or {}), **(scores.get("config") or {}),
              "config_fingerprint": scores.get("config_fingerprint")}
    tags = {"comptrust.kind": "evaluate", "comptrust.command": str(scores.get("command", ""))[:4000],
            "comptrust.version": str(scores.get("comptrust_version", ""))}
    return log_run(out_dir.name or "evaluate", params, evaluation_metrics(scores),
                   [out_dir / "scores.json", out_dir / "generations.jsonl"], tags, mlflow=mlflow, wandb=wandb)


def log_study(out_dir: Path, mlflow: bool = False, wandb: bool = False) -> list[str]:
    """Log a study from its folder (results.json, results.csv, report.html)."""
    out_dir = Path(out_dir)
    results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    rec = ((results.get("analysis") or {}).get("recommendation") or {})
    tags = {"comptrust.kind": "study", "comptrust.command": str(results.get("command", ""))[:4000],
            "comptrust.recommendation": str(rec.get("text", ""))[:4000]}
    return log_run(out_dir.name or "study", results.get("study") or {}, study_metrics(results),
                   [out_dir / "results.json", out_dir / "results.csv", out_dir / "report.html"], tags,
                   mlflow=mlflow, wandb=wandb)
