"""The public Python API: ``import comptrust`` and call these. The CLI's commands call the same functions.

    import comptrust
    r = comptrust.evaluate(perspectives=["stereotype"], out="runs/smol", limit=2)
    print(r.score("stereotype"))
    ck = comptrust.compress(method="rtn", bits=8, out="models/rtn-w8")
    s = comptrust.run_study({"variants": ["dense", {"method": "rtn", "bits": 8}], "perspectives": ["ethics"]},
                            out="runs/study")
    print(s.to_pandas())

Keyword arguments are named like the CLI's options and the study file's keys (``limit``, ``data_dir``,
``toxicity_scorer``, ...): they are :class:`comptrust.config.EvalConfig` fields and are validated by it, so an
unknown or bad one is a :class:`comptrust.errors.UsageError` with a one-line message naming it.

Layer: the top, beside cli (it may import study, compress, evaluate and everything below).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from comptrust.config import EvalConfig
from comptrust.errors import UsageError
from comptrust.results import CompressResult, EvalResult, StudyCell, StudyResult


def _names(perspectives: str | Sequence[str]) -> list[str]:
    from comptrust import perspectives as registry

    if isinstance(perspectives, str):
        return registry.parse_list(perspectives)
    return registry.parse_list(",".join(perspectives)) if perspectives else registry.parse_list("")


def evaluate(
    model: str | None = None,
    perspectives: str | Sequence[str] = "all",
    out: str | Path | None = None,
    *,
    config: EvalConfig | None = None,
    progress: bool | None = None,
    cli_names: bool = False,
    **settings: Any,
) -> EvalResult:
    """Evaluate a model on DecodingTrust perspectives; writes scores.json and generations.jsonl into ``out``.

    Args:
        model: None for the embedded SmolLM2-135M-Instruct; a .gguf file; a Hugging Face model folder (e.g. what
            :func:`compress` wrote); a Hub id ``org/name[@revision]``; or ``openai:BASE_URL#NAME``.
        perspectives: "all", a comma list, or a list of names (toxicity, stereotype, advglue, ood, adv_demo,
            privacy, ethics, fairness, mmlu).
        out: results folder (created; a rerun reuses its cache, comptrust.sqlite).
        config: a ready :class:`EvalConfig`; or pass its fields as keyword arguments instead.
        progress: progress bar (default: when stderr is a terminal).
        cli_names: name settings as command-line options in messages (the CLI sets it).
        **settings: EvalConfig fields: suite, data_dir, mmlu_dir, profile, limit, n, seed, dt_quirks,
            original_scoring, raw, backend, device, dtype, batch_size, toxicity_scorer, advglue_tasks,
            advglue_dev, mmlu_context_tokens, context_tokenizer.

    Returns:
        An :class:`EvalResult` (per perspective: score, refusal rate, items, sub-scores, raw metrics).

    Raises:
        UsageError: bad input (unknown setting, missing data folder, unknown model); nothing is generated.
    """
    from comptrust.engine.select import open_engine
    from comptrust.evaluate import check_out_dir, discard_if_unused, prepare
    from comptrust.evaluate import evaluate as run_eval

    if out is None:
        raise UsageError("out: the results folder is required (e.g. out='runs/smol')")
    if config is not None and settings:
        raise UsageError(f"pass either config= or settings ({', '.join(settings)}), not both")
    cfg = config if config is not None else EvalConfig.build(flags=cli_names, **settings)
    names = _names(perspectives)
    for key in cfg.unused_args(names):
        from comptrust.config import PERSPECTIVE_ARGS

        shown = f"--{key.replace('_', '-')}" if cli_names else key
        print(f"warning: {shown} {getattr(cfg, key)} is not used: {PERSPECTIVE_ARGS[key]} is not among the "
              "perspectives", file=sys.stderr)
    out = Path(out)
    created = not out.expanduser().exists()
    check_out_dir(out)
    try:
        opts = cfg.to_options()
        if "toxicity" in names:  # built now, so that a bad scorer (no key, model not found) fails before generating
            from comptrust.perspectives.toxicity import resolve_scorer
            from comptrust.toxicity_scorers import get_scorer

            opts.extra["toxicity_scorer"] = get_scorer(cfg.toxicity_scorer) if cfg.toxicity_scorer else resolve_scorer(opts)
        prepared = prepare(names, opts)  # no data at all: exit 2 before any model is loaded
        with open_engine(model, **cfg.engine_kwargs()) as (engine, info):
            run = run_eval(engine, info, names, opts, out, progress=progress, config=cfg, prepared=prepared)
    except BaseException:
        if created:  # a check that failed after `out` was made leaves no empty folder behind
            discard_if_unused(out)
        raise
    finally:
        from comptrust.evaluate import release_out_dir

        release_out_dir(out)  # a notebook's kernel outlives the call: another process may write `out` next
    return EvalResult.from_run(run, cfg)


def compress(
    model: str | None = None,
    method: str | None = None,
    out: str | Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> CompressResult:
    """Compress a model and check the result; writes the checkpoint and its comptrust.json into ``out``.

    Args:
        model: None for the embedded SmolLM2-135M-Instruct; a .gguf file, a Hugging Face folder or a Hub id.
        method: a registered method (comptrust.compress.config.METHODS): gptq, awq, rtn, gptq-w8a8, fp8-dynamic
            (quantization), magnitude, sparsegpt, wanda (pruning), or recipe; None with ``recipe=`` set means
            recipe, as ``comptrust compress --recipe FILE`` does.
        out: the checkpoint folder (new, or an earlier comptrust checkpoint, which is replaced).
        progress: called with one line per step (default: lines on stderr).
        **settings: CompressionConfig fields, named like ``comptrust compress``'s options: bits, group_size,
            sparsity, structure, calibration, n_calib, seq_len, calib_batch, seed, awq_grid, actorder, recipe (an
            llm-compressor recipe file).

    Returns:
        A :class:`CompressResult`: the folder (a valid ``model=`` for :func:`evaluate`) and its record.
    """
    from comptrust.compress.api import RECORD_NAME
    from comptrust.compress.api import compress as run_compress
    from comptrust.compress.config import METHODS, CompressionConfig

    if out is None:
        raise UsageError("out: the checkpoint folder is required (e.g. out='models/gptq-w4')")
    if method is None and settings.get("recipe") is not None:
        method = "recipe"
    if method not in METHODS:
        raise UsageError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    cfg = CompressionConfig.build(method=method, **settings)
    say = progress or (lambda msg: print(f"[compress] {msg}", file=sys.stderr, flush=True))
    path = run_compress(model, cfg, Path(out), progress=say)
    record = json.loads((path / RECORD_NAME).read_text())
    return CompressResult(path=path, label=record.get("label", cfg.label()), config=cfg.model_dump(), record=record)


def _spec(spec: Any) -> Any:
    from comptrust.study.spec import StudySpec, load_spec, parse_spec

    if isinstance(spec, StudySpec):
        return spec
    if spec is None:
        return load_spec(None)
    if isinstance(spec, (str, Path)):
        return load_spec(Path(spec))
    if isinstance(spec, Mapping):
        return parse_spec(dict(spec), "<study dict>")
    raise UsageError(f"spec: expected a study file path, a dict of study keys or None, got {type(spec).__name__}")


def run_study(
    spec: str | Path | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    progress: bool | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    workers: int | None = 1,
    models_dir: str | Path | None = None,
) -> StudyResult:
    """Run (or resume) a study: compress each variant, evaluate every model, compare with dense, write the report.

    Args:
        spec: a study YAML file, a dict with the study file's keys (model, suite, profile, limit, n, seed,
            perspectives, variants, budget, ...), or None for the default study.
        out: the study folder (rerun with the same one to resume: done units are skipped).
        progress: progress bars (default: when stderr is a terminal).
        executor: "local" (units on this machine) or "ray".
        workers: with "local", worker processes running units side by side: 1 (the default here) runs them one
            after another in this process; None picks as ``comptrust study`` does (one per core on a CPU where the
            memory holds them). Workers start by "spawn", so a script that passes None or N > 1 needs the
            usual ``if __name__ == "__main__":`` guard. With "ray", the size of the local Ray cluster in CPUs.
        ray_address, models_dir: as ``comptrust study``'s --ray-address, --models-dir.

    Returns:
        The :class:`StudyResult` (``.to_pandas()`` for a long-form table, ``.recommendation``).
    """
    from comptrust.study.runner import run_study as _run

    if out is None:
        raise UsageError("out: the study folder is required (e.g. out='runs/study')")
    from comptrust.evaluate import release_out_dir

    try:
        _run(_spec(spec), Path(out), progress=progress, executor=executor, ray_address=ray_address, workers=workers,
             models_dir=Path(models_dir) if models_dir else None)
    finally:
        release_out_dir(Path(out))  # the lock is the call's, not the (long-lived) process's
    return load_study(out)


def build_report(out: str | Path) -> StudyResult:
    """Rebuild report.html, results.csv and results.json of the study in ``out`` from its store.

    Returns the :class:`StudyResult` of the rebuilt result.
    """
    from comptrust.study.runner import write_outputs

    out = Path(out)
    return _study_result(out, write_outputs(out))


def load_study(out: str | Path) -> StudyResult:
    """Read a study folder: results.json (built first if absent) and the per-unit scores in its store.

    Args:
        out: a folder written by :func:`run_study` or ``comptrust study --out``.
    """
    from comptrust.results import StudyReport
    from comptrust.store import STORE_NAME
    from comptrust.study.plan import load_study as load_spec_of
    from comptrust.study.runner import write_outputs

    out = Path(out)
    load_spec_of(out)  # a clear error when `out` is not a study folder
    if not (out / STORE_NAME).is_file():
        raise UsageError(f"{out} has no {STORE_NAME}: the study never ran there")
    results = out / "results.json"
    if not results.is_file():
        return _study_result(out, write_outputs(out))
    try:
        report = StudyReport.from_results_json(json.loads(results.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, ValueError) as e:
        why = " ".join(str(e).split())[:200]
        raise UsageError(f"{results} is damaged or from an older comptrust ({why}); rebuild it with "
                         f"comptrust.build_report({str(out)!r})") from None
    return _study_result(out, report)


def _study_result(out: Path, report: Any) -> StudyResult:
    """The API's view of a study result (a results.StudyReport): one cell per variant x seed x perspective, with
    each unit's own score from the store."""
    from comptrust.store import STORE_NAME, Store
    from comptrust.study.plan import Plan
    from comptrust.study.plan import load_study as load_spec_of

    spec = load_spec_of(out)
    analysis = report.analysis
    with Store(out / STORE_NAME, readonly=True) as store:
        stored = store.units()
    cells: list[StudyCell] = []
    plan = Plan.of(spec)
    status = {r["unit"]: r for r in plan.status(stored)}
    for u in plan.units:
        if u.kind != "eval" or u.perspective is None:
            continue
        st = status[u.id]
        done = st["status"] == "done"
        score = stored[u.id]["result"].get("score") or {} if done else {}
        row = analysis.variants.get(u.variant.name)
        cell = row.perspectives.get(u.perspective) if row else None
        ci = None
        if cell is not None:
            ci = cell.seed_ci.get(u.instance) or (cell.ci if len(u.variant.seeds) == 1 else None)
        cells.append(StudyCell(
            variant=u.variant.name,
            instance=u.instance,
            seed=None if u.variant.is_dense or u.variant.is_gguf else u.seed,
            perspective=u.perspective,
            status=st["status"],
            score=score.get("score"),
            ci_low=ci[0] if ci else None,
            ci_high=ci[1] if ci else None,
            refusal_rate=score.get("refusal_rate"),
            n_items=score.get("n_items"),
            error=None if done else st["error"],
        ))
    return StudyResult(
        out_dir=out,
        study=report.study,
        dense=analysis.dense,
        perspectives=list(report.perspectives),
        cells=cells,
        variants={k: v.model_dump(mode="json") for k, v in analysis.variants.items()},
        recommendation=analysis.recommendation,
        result=report,
    )
