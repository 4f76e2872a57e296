"""The comptrust command line. Each command parses options, builds typed objects and calls one function.

Errors: bad input -> one line "error: ..." and exit 2; runtime failures -> exit 1; Ctrl-C -> exit 130 with a
note that finished work is saved (the store commits every chunk) and a rerun resumes.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from comptrust.errors import ComptrustError, UsageError

app = typer.Typer(
    name="comptrust",
    help=(
        "Does compression keep an LLM trustworthy?\n\n"
        "Compress a model (GPTQ, AWQ, magnitude / SparseGPT / Wanda pruning), evaluate it on the eight "
        "DecodingTrust perspectives plus MMLU, and compare it with the dense model.\n\n"
        "Quick start (offline, built-in model and mini suites):\n\n"
        "  comptrust evaluate --perspectives stereotype --out runs/demo\n\n"
        "Every command has --help. Results go to the --out directory; rerunning a command reuses its cache."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

MODEL_HELP = (
    "Model to evaluate: omit for the embedded SmolLM2-135M-Instruct (offline); a .gguf file; a local Hugging "
    "Face model directory (e.g. the --out of `comptrust compress`); a Hub id org/name[@revision]; or a served "
    "model openai:BASE_URL#NAME (an OpenAI-compatible server: vLLM, TGI, llama.cpp, Ollama; API key from "
    "$OPENAI_API_KEY)."
)


@app.command()
def evaluate(
    out: Path = typer.Option(..., "--out", "-o", help="Results directory (created; reused by reruns)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    perspectives: str = typer.Option(
        "all",
        "--perspectives",
        "-p",
        help="Comma list or 'all': toxicity, stereotype, advglue, ood, adv_demo, privacy, ethics, fairness, mmlu.",
    ),
    suite: str = typer.Option(
        "mini", "--suite", help="mini = built-in offline mini suites; dt = DecodingTrust data (--data-dir)."
    ),
    profile: Optional[str] = typer.Option(
        None,
        "--profile",
        help="mini | lite (subsample per sub-scenario, n=1) | full (protocol counts, n=25 where sampled). "
        "Default: mini for --suite mini, lite for --suite dt.",
    ),
    data_dir: Optional[str] = typer.Option(
        None, "--data-dir", help="DecodingTrust data folder (its data/ layout), or hf:AI-Secure/DecodingTrust."
    ),
    mmlu_dir: Optional[str] = typer.Option(
        None, "--mmlu-dir", help="MMLU folder with dev/ and test/ CSVs (default: next to --data-dir), or hf:cais/mmlu."
    ),
    limit: Optional[int] = typer.Option(
        None, "--limit", help="Items per sub-scenario (deterministic subsample; paired across system prompts)."
    ),
    n: Optional[int] = typer.Option(None, "--n", help="Samples per prompt where the protocol samples (overrides the profile)."),
    seed: int = typer.Option(0, "--seed", help="Seed for subsampling and sampled decoding."),
    dt_quirks: bool = typer.Option(
        False, "--dt-quirks", help="Reproduce the reference harness's prompt-building quirks (e.g. duplicated task text)."
    ),
    original_scoring: bool = typer.Option(
        False, "--original-scoring", help="DecodingTrust's original score rules instead of comp-trust's patched ones."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="auto | bfloat16 | float32 | float16 (default: bf16 on GPU and on CPUs with native bf16)."
    ),
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="auto | hf | vllm | llamacpp. auto: vLLM when installed and on CUDA, else transformers (hf). "
        "llamacpp: serve the GGUF --model (default: the embedded one) with a llama.cpp server started here. "
        "openai:URL#NAME models always use the OpenAI-compatible client.",
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Max prompts per batch (default: the engine packs batches by a token budget)."
    ),
    raw: bool = typer.Option(False, "--raw", help="Raw-text prompts (no chat template), for base models."),
    toxicity_scorer: Optional[str] = typer.Option(
        None,
        "--toxicity-scorer",
        help="Toxicity scorer: offline | profanity-check | lexicon | hf:MODEL\\[#LABEL] | perspective "
        "(default: the toxicity protocol's default_scorer). See `comptrust toxicity-score --help`.",
    ),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."),
) -> None:
    """Evaluate a model on DecodingTrust perspectives; writes scores.json and generations.jsonl to --out.

    Examples:

      comptrust evaluate --perspectives stereotype --out runs/smol

      comptrust evaluate -p stereotype --suite dt --data-dir ../shared/data/decodingtrust --limit 32 --out runs/dt

      comptrust evaluate -m openai:http://127.0.0.1:8080/v1#my-model -p ethics --out runs/served

      comptrust evaluate --backend llamacpp -p stereotype --out runs/smol-llamacpp
    """
    from comptrust.api import evaluate as run_evaluate
    from comptrust.config import EvalConfig

    cfg = EvalConfig.build(
        flags=True, suite=suite, data_dir=data_dir, mmlu_dir=mmlu_dir, profile=profile, limit=limit, n=n, seed=seed,
        dt_quirks=dt_quirks, original_scoring=original_scoring, raw=raw, backend=backend, device=device, dtype=dtype,
        batch_size=batch_size, toxicity_scorer=toxicity_scorer,
    )
    result = run_evaluate(model, perspectives, out, config=cfg, progress=progress, cli_names=True)
    _print_scores(result)


def _print_scores(result) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"comptrust scores ({result.out_dir})")
    for col in ("perspective", "score", "refusal %", "items", "generations", "skipped parts"):
        t.add_column(col, justify="right" if col not in ("perspective", "skipped parts") else "left")
    for name, s in result.perspectives.items():
        fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        t.add_row(name, fmt(s.score), fmt(s.refusal_rate), str(s.n_items), str(s.n_generations), str(len(s.skipped)))
    for name, why in result.not_run.items():
        t.add_row(name, "not run", "", "", "", why)
    c = Console(stderr=False)
    c.print(t)
    st = result.generation
    c.print(
        f"generated {st['generated']} prompts ({st['new_tokens']} tokens, {st['tokens_per_s'] or 0} tok/s), "
        f"{st['cache_hits']} cache hits, wall {result.wall_seconds:.1f} s"
    )


@app.command("perspectives")
def list_perspectives() -> None:
    """List the perspectives this installation knows."""
    from comptrust import perspectives as registry

    avail = set(registry.available())
    for name in registry.REGISTRY:
        print(f"{name:12s} {'available' if name in avail else 'not implemented yet'}")


@app.command("model-info")
def model_info(model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP)) -> None:
    """Resolve a model (converting a GGUF once) and print its local path, fingerprint and metadata."""
    if model and model.startswith("openai:"):  # a served model: what the server says about it
        from comptrust.engine.select import open_engine

        with open_engine(model) as (_, info):
            print(json.dumps(info, indent=2, default=str))
        return
    from comptrust.models import resolve

    print(json.dumps(resolve(model).describe(), indent=2, default=str))


def _register_plugins() -> None:
    """Commands that live next to their feature (compress, study, ...) register themselves here."""
    import importlib

    for mod in ("comptrust.compress.command", "comptrust.study.command", "comptrust.toxicity_command"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue
            raise
        m.register(app)


_register_plugins()


def _click_exceptions():
    """typer >= 0.2x vendors click; catch both its copy and click proper."""
    mods = []
    try:
        import typer._click.exceptions as tce  # type: ignore[import-not-found]

        mods.append(tce)
    except ImportError:
        pass
    mods.append(click.exceptions)
    import typer.exceptions as tex

    mods.append(tex)

    def pick(name: str) -> tuple:
        return tuple({getattr(m, name) for m in mods if hasattr(m, name)})

    usage, abort, exit_, clicks = pick("UsageError"), pick("Abort"), pick("Exit"), pick("ClickException")
    return usage, abort, exit_, clicks


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and stable exit codes (2 usage, 1 runtime, 130 interrupted)."""
    usage, abort, exit_, clicks = _click_exceptions()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="comptrust")
        # typer turns KeyboardInterrupt into Exit(130) and, outside standalone mode, *returns* exit codes
        if rv == 130:
            raise KeyboardInterrupt
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:
            sys.exit(rv)
    except ComptrustError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except usage as e:
        msg = " ".join(e.format_message().split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except clicks as e:
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EISDIR,
                       errno.ENOTDIR):
            target = getattr(e, "filename2", None) or e.filename  # a rename names its destination second
            where = f" {target}" if target else ""
            print(f"error: cannot write{where}: {e.strerror}; work committed so far is kept", file=sys.stderr)
            sys.exit(1)
        raise
    except sqlite3.DatabaseError as e:  # a store damaged after it was opened (bad pages): say so in one line
        print(f"error: the results database (comptrust.sqlite in --out) is damaged: {e}; move it away and rerun "
              "(its generations are then made again)", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, *abort):
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except exit_ as e:
        sys.exit(e.exit_code)
