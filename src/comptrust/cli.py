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

from comptrust import perspectives as registry
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

def _version(value: bool) -> None:
    if value:
        from comptrust import __version__

        print(f"comptrust {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Does compression keep an LLM trustworthy? (see the command list below)"""


MODEL_HELP = (
    "Model to evaluate: omit for the embedded SmolLM2-135M-Instruct (offline); a .gguf file; a local Hugging "
    "Face model directory (e.g. the --out of `comptrust compress`); a Hub id org/name[@revision]; or a served "
    "model openai:BASE_URL#NAME (an OpenAI-compatible server: vLLM, TGI, llama.cpp, Ollama; API key from "
    "$OPENAI_API_KEY)."
)


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})  # lm-eval flags: answered
def evaluate(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", "--output-path", "--output_path",
        help="Results directory (created; reused by reruns). --output_path (lm-eval's name) is the same.",
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    perspectives: str = typer.Option(
        "all",
        "--perspectives",
        "-p",
        "--tasks",
        help=f"Comma list or 'all' (any case): {', '.join(registry.REGISTRY)}. --tasks (lm-eval's name) is the "
        "same; 'list' prints them (comptrust perspectives).",
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
    batch_size: Optional[str] = typer.Option(
        None, "--batch-size", "--batch_size",
        help="Max prompts per batch, or auto (the default: the engine packs batches by a token budget).",
    ),
    raw: bool = typer.Option(False, "--raw", help="Raw-text prompts (no chat template), for base models."),
    toxicity_scorer: Optional[str] = typer.Option(
        None,
        "--toxicity-scorer",
        help="Toxicity scorer: offline | profanity-check | lexicon | hf:MODEL\\[#LABEL] | perspective "
        "(default: the toxicity protocol's default_scorer). See `comptrust toxicity-score --help`.",
    ),
    progress: Optional[bool] = typer.Option(
        None, "--progress/--no-progress",
        help="Progress bar (default: a bar on a terminal, plain progress lines every 10 s when stderr is a file).",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config",
        help="A YAML file with a study file's keys (model, perspectives, suite, data_dir, limit, n, seed, backend, "
        "...) for this one evaluation; options given on the command line override it.",
    ),
    gen_kwargs: Optional[str] = typer.Option(
        None, "--gen-kwargs", "--gen_kwargs",
        help="Off-protocol decoding for every prompt, e.g. temperature=0.7,max_new_tokens=64 (keys: temperature, "
        "top_p, max_new_tokens, n, seed, do_sample). Recorded in the outputs; scores are marked 'not DecodingTrust'.",
    ),
    log_samples: bool = typer.Option(
        False, "--log-samples", "--log_samples",
        help="Accepted for lm-eval users; comptrust always writes every prompt, output and parse to generations.jsonl.",
    ),
    mlflow: bool = typer.Option(
        False, "--mlflow",
        help="Log config, scores, CIs, refusal rates and scores.json / generations.jsonl to MLflow (MLFLOW_TRACKING_URI; "
        "default ./mlruns, a local file store). Needs mlflow-skinny.",
    ),
    wandb: bool = typer.Option(
        False, "--wandb",
        help="The same to Weights & Biases (WANDB_PROJECT, default comptrust; WANDB_MODE=offline). Needs wandb.",
    ),
) -> None:
    """Evaluate a model on DecodingTrust perspectives; writes scores.json and generations.jsonl to --out.

    For lm-eval users: --tasks, --output_path, --batch_size, --gen_kwargs and --log_samples are accepted; other
    lm-eval flags (--model_args, --num_fewshot, ...) are answered with comptrust's way of doing the same.

    Examples:

      comptrust evaluate --perspectives stereotype --out runs/smol

      comptrust evaluate -p stereotype --suite dt --data-dir ../shared/data/decodingtrust --limit 32 --out runs/dt

      comptrust evaluate -m openai:http://127.0.0.1:8080/v1#my-model -p ethics --out runs/served

      comptrust evaluate --backend llamacpp -p stereotype --out runs/smol-llamacpp

      comptrust evaluate --config run.yaml --out runs/from-file
    """
    _answer_extra_args(ctx)
    from comptrust import tracking

    tracking.check(mlflow=mlflow, wandb=wandb)  # a missing tracker: one line with the pip line, before any work
    if perspectives.strip().lower() == "list":  # lm-eval's `--tasks list`
        _print_perspectives([limit or 1])
        return
    if out is None:
        raise UsageError("--out DIR is required: the results folder (lm-eval's --output_path)")
    if log_samples:
        print("note: --log_samples is not needed: generations.jsonl in --out always holds every prompt, output and "
              "parse", file=sys.stderr)
    settings = dict(
        suite=suite, data_dir=data_dir, mmlu_dir=mmlu_dir, profile=profile, limit=limit, n=n, seed=seed,
        dt_quirks=dt_quirks, original_scoring=original_scoring, raw=raw, backend=backend, device=device, dtype=dtype,
        batch_size=_batch_size(batch_size), toxicity_scorer=toxicity_scorer, gen_kwargs=gen_kwargs,
    )
    if config is not None:
        model, perspectives, settings = _with_config_file(ctx, config, model, perspectives, settings)
    if model in LM_EVAL_MODEL_TYPES and not Path(model).exists():
        raise UsageError(f"--model {model} is an lm-evaluation-harness model type; comptrust's --model is the model "
                         f"itself (a .gguf, a folder, a Hub id or openai:URL#NAME) and --backend hf|vllm|llamacpp "
                         "picks the engine (lm-eval's --model_args pretrained=X is --model X)")
    from comptrust.progress import stage

    stage(f"resolving model {model or '(embedded SmolLM2-135M-Instruct)'}; output in {out}")
    from comptrust.api import evaluate as run_evaluate
    from comptrust.config import EvalConfig
    from comptrust.logs import third_party_to_log

    cfg = EvalConfig.build(flags=True, **settings)
    with third_party_to_log(out / LOG_NAME):
        result = run_evaluate(model, perspectives, out, config=cfg, progress=progress, cli_names=True)
    _print_scores(result)
    for line in tracking.log_evaluation(out, mlflow=mlflow, wandb=wandb) if (mlflow or wandb) else []:
        print(f"[comptrust] logged to {line}", file=sys.stderr)


LOG_NAME = "comptrust.log"  # transformers' / llm-compressor's bars and warnings, out of the terminal

# lm-eval's --model values (model types, not models): answered instead of looked up as a Hub id
LM_EVAL_MODEL_TYPES = ("hf", "hf-auto", "huggingface", "vllm", "sglang", "gguf", "ggml", "openai-completions",
                       "openai-chat-completions", "local-completions", "local-chat-completions", "hf-multimodal")

# lm-evaluation-harness flags with no comptrust twin: what to use instead (those with a twin are aliases above)
LM_EVAL_ANSWERS = {
    "--model_args": "comptrust takes the model itself: --model PATH_OR_HUB_ID (with --dtype, --device; lm-eval's "
                    "--model hf|vllm is --backend hf|vllm)",
    "--num_fewshot": "the shot counts are DecodingTrust's protocol (MMLU 5-shot, adv_demo's demonstrations) and "
                     "are not changed per run",
    "--fewshot_as_multiturn": "demonstrations are placed as the DecodingTrust protocol places them",
    "--apply_chat_template": "the model's chat template is applied by default; --raw sends raw text (base models)",
    "--system_instruction": "each perspective uses DecodingTrust's own system prompts",
    "--max_batch_size": "use --batch-size N (or auto, the default)",
    "--use_cache": "every generation is cached in --out/comptrust.sqlite; rerunning the same command reuses it",
    "--cache_requests": "every generation is cached in --out/comptrust.sqlite; rerunning the same command reuses it",
    "--write_out": "generations.jsonl in --out holds every prompt as sent",
    "--show_config": "scores.json records the options and config of the run",
    "--include_path": "perspectives are built in; point --suite dt --data-dir at DecodingTrust data",
    "--check_integrity": "the tests are run with pytest (make test)",
    "--predict_only": "generations.jsonl is always written; scores come with it",
    "--trust_remote_code": "comptrust never runs code shipped with a checkpoint",
    "--wandb_args": "use --wandb (project from WANDB_PROJECT, WANDB_MODE=offline for no network); --mlflow for MLflow",
    "--hf_hub_log_args": "not supported; scores.json and generations.jsonl are the records to upload",
    "--verbosity": "comptrust's own warnings go to stderr; third-party logs to --out/comptrust.log",
    "--samples": "use --limit N (items per sub-scenario) and --seed",
    "--metadata": "scores.json records model, options, versions and command line",
}


def _answer_extra_args(ctx: typer.Context) -> None:
    """evaluate accepts unknown arguments only to answer them: an lm-eval flag gets comptrust's equivalent, any
    other unknown option the usual "No such option" with a suggestion from evaluate's own options."""
    if not ctx.args:
        return
    import difflib

    first = ctx.args[0]
    flag = first.split("=", 1)[0]
    if flag in LM_EVAL_ANSWERS or flag.replace("-", "_") in LM_EVAL_ANSWERS:
        answer = LM_EVAL_ANSWERS.get(flag) or LM_EVAL_ANSWERS[flag.replace("-", "_")]
        raise UsageError(f"{flag} is an lm-evaluation-harness flag: {answer}")
    if flag.startswith("-"):
        known = [o for prm in ctx.command.params for o in (*prm.opts, *getattr(prm, "secondary_opts", []))]
        hint = difflib.get_close_matches(flag, known, n=1)
        raise UsageError(f"No such option: {flag}" + (f" (did you mean {hint[0]}?)" if hint else "")
                         + "; see comptrust evaluate --help")
    raise UsageError(f"unexpected argument {first!r}; options take the form --name VALUE (see comptrust evaluate --help)")


def _batch_size(value: str | None) -> int | None:
    """--batch-size N, or auto / auto:N (lm-eval's spellings): None, i.e. the engine's token-budget packing."""
    if value is None or value.strip().lower().split(":")[0] == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"--batch-size {value}: expected a positive number of prompts or auto") from None
    if n <= 0:
        raise UsageError(f"--batch-size {value}: must be positive")
    return n


STUDY_ONLY_KEYS = ("variants", "budget", "alpha", "bootstrap", "decision", "max_ppl_ratio", "compare_to")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was set on the command line (not left to its default)."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name in ("COMMANDLINE", "ENVIRONMENT")


def _with_config_file(ctx: typer.Context, path: Path, model: str | None, perspectives: str,
                      settings: dict) -> tuple[str | None, str, dict]:
    """Settings from a study-style YAML file (read by the study loader: same keys, same line-numbered errors),
    under the options given on the command line. A file with compression variants is a study, not an evaluation."""
    import yaml

    from comptrust.study.spec import load_spec

    spec = load_spec(path)
    try:
        keys = set(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, TypeError):  # load_spec accepted it; a top level that is not a mapping has no keys
        keys = set()
    compressed = [v.name for v in spec.variants if not v.is_dense]
    if "variants" in keys and compressed:
        raise UsageError(f"{path}: variants {', '.join(compressed)}: an evaluation runs one model; run the file as a "
                         f"study (comptrust study {path} --out DIR) or give only the evaluation keys")
    unused = [k for k in STUDY_ONLY_KEYS if k in keys and k != "variants"]
    if unused:
        print(f"warning: {path}: {', '.join(unused)} apply to studies only; not used by evaluate", file=sys.stderr)
    from_file = {k: v for k, v in spec.eval_config().model_dump().items() if k in keys and k in settings}
    merged = {**settings, **{k: v for k, v in from_file.items() if not _given(ctx, k)}}
    if "model" in keys and not _given(ctx, "model"):
        model = spec.model
    if "perspectives" in keys and not _given(ctx, "perspectives"):
        perspectives = ",".join(spec.perspectives)
    return model, perspectives, merged


def _print_scores(result) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"comptrust scores ({result.out_dir})")
    for col in ("perspective", "score", "95% CI", "refusal %", "items", "generations", "skipped parts"):
        t.add_column(col, justify="right" if col not in ("perspective", "skipped parts") else "left")
    for name, s in result.perspectives.items():
        fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        ci = getattr(s, "ci95", None) or {}
        shown = f"{ci['low']:.1f}-{ci['high']:.1f}" if ci.get("low") is not None else "-"
        t.add_row(name, fmt(s.score), shown, fmt(s.refusal_rate), str(s.n_items), str(s.n_generations),
                  str(len(s.skipped)))
    for name, why in result.not_run.items():
        t.add_row(name, "not run", "", "", "", "", why)
    c = Console(stderr=False)
    c.print(t)
    st = result.generation
    c.print(
        f"generated {st['generated']} prompts ({st['new_tokens']} tokens, {st['tokens_per_s'] or 0} tok/s), "
        f"{st['cache_hits']} cache hits, wall {result.wall_seconds:.1f} s"
    )


@app.command("perspectives")
def list_perspectives(
    limit: list[int] = typer.Option(
        [1], "--limit", help="Also count prompts at this --limit (items per sub-scenario); repeat for several."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON (sub-scenario names included)."),
) -> None:
    """Describe each perspective: what it measures, its sub-scenarios, and how many prompts a run sends.

    Counts come from each perspective's own loader on the built-in mini suite (fast: no model is loaded);
    'gens' is prompts x samples. --suite dt runs scale the same way per sub-scenario.
    """
    _print_perspectives(list(limit), as_json)


def _print_perspectives(limits: list[int], as_json: bool = False) -> None:
    from comptrust.config import EvalConfig
    from comptrust.evaluate import load_perspectives

    for lim in limits:
        if lim <= 0:
            raise UsageError(f"--limit {lim}: must be a positive number of items")
    avail = set(registry.available())
    names = [n for n in registry.REGISTRY if n in avail]
    runs = {"mini": load_perspectives(names, EvalConfig().to_options())[0]}
    for lim in limits:
        runs[f"--limit {lim}"] = load_perspectives(names, EvalConfig(limit=lim).to_options())[0]
    rows = []
    for name in registry.REGISTRY:
        row: dict = {"perspective": name, "available": name in avail, "description": ""}
        if name in runs["mini"]:
            p, ld, _ = runs["mini"][name]
            row["title"] = p.title
            row["description"] = p.description
            row["sub_scenarios"] = list(dict.fromkeys(it.group for it in ld.items))
            for label, loaded in runs.items():
                items = loaded[name][1].items if name in loaded else []
                row[label] = {"prompts": len(items), "generations": sum(it.prompt.params.n for it in items)}
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    import shutil
    import textwrap

    width = min(shutil.get_terminal_size((100, 20)).columns, 120)
    wrap = lambda text: textwrap.fill(text, width, initial_indent=" " * 13, subsequent_indent=" " * 13)  # noqa: E731
    totals = {label: 0 for label in runs}
    for row in rows:
        if not row["available"]:
            print(f"{row['perspective']:12s} not implemented in this version")
            continue
        print(f"{row['perspective']:12s} {row['title']}")
        print(wrap(row["description"]))
        subs = row["sub_scenarios"]
        print(wrap(f"{len(subs)} sub-scenarios: " + ", ".join(subs[:6]) + (", ..." if len(subs) > 6 else "")))
        counts = []
        for label in runs:
            c = row.get(label, {"prompts": 0, "generations": 0})
            totals[label] += c["prompts"]
            gens = f" ({c['generations']} generations)" if c["generations"] != c["prompts"] else ""
            counts.append(f"{'mini suite' if label == 'mini' else label}: {c['prompts']}{gens}")
        print(wrap("prompts: " + " | ".join(counts)))
    print("all          prompts: " + " | ".join(f"{'mini suite' if k == 'mini' else k}: {v}" for k, v in totals.items()))
    print(wrap("(per sub-scenario counts scale the same way on --suite dt; --profile full samples n=25 for toxicity "
               "and stereotype)"))


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

    for mod in ("comptrust.compress.command", "comptrust.study.command", "comptrust.toxicity_command",
                "comptrust.cache_command"):
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


def _check_environment() -> None:
    """Environment switches that every command reads, checked before any work: a typo must not surface as a
    traceback after the model loaded (COMPTRUST_CHUNK_SIZE) or as a cache in an odd place (COMPTRUST_HOME)."""
    import os

    raw = os.environ.get("COMPTRUST_CHUNK_SIZE")
    if raw is not None and raw.strip():
        if not raw.strip().isdigit() or int(raw) <= 0:
            raise UsageError(f"COMPTRUST_CHUNK_SIZE={raw!r}: expected a positive number of prompts per chunk")
    home = os.environ.get("COMPTRUST_HOME")
    if home:
        p = Path(home).expanduser()
        if p.exists() and not p.is_dir():
            raise UsageError(f"COMPTRUST_HOME={home}: not a folder (it is a file); point it at a folder for "
                             "comptrust's caches")
    from comptrust.store import _busy_timeout

    _busy_timeout()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and stable exit codes (2 usage, 1 runtime, 130 interrupted,
    143 terminated by SIGTERM). Every message is flattened to one line and has its secrets redacted."""
    import signal

    from comptrust.errors import INTERRUPTED, one_line, redact

    def say(msg: str) -> None:
        print(f"error: {redact(one_line(msg))}", file=sys.stderr)

    terminated: list[int] = []
    INTERRUPTED.clear()  # a previous main() in this process (tests) must not stop this one

    def on_signal(signum, frame):  # noqa: ARG001 -- SIGTERM ends the run like Ctrl-C: committed work is kept
        if signum == signal.SIGTERM:
            terminated.append(signum)
        INTERRUPTED.set()  # kept even where the KeyboardInterrupt itself gets swallowed (see errors.INTERRUPTED)
        raise KeyboardInterrupt

    # Installed over whatever was inherited, SIG_IGN included. Python turns SIGINT into KeyboardInterrupt only when
    # it starts with SIGINT at SIG_DFL; a non-interactive shell starts background jobs (`make test &`, nohup) with
    # SIGINT ignored, their children inherit that, and such a run ignored Ctrl-C, ran on and exited 0 (issue 21).
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (main() called from a test's thread): leave signals alone
            pass
    usage, abort, exit_, clicks = _click_exceptions()
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):  # Path("") is ".": an empty --out would silently write into the current folder
        if (a in ("--out", "-o") and i + 1 < len(args) and not args[i + 1].strip()) or a == "--out=":
            say("--out '': give a folder name (an empty one would write into the current folder)")
            sys.exit(2)
    try:
        _check_environment()
        rv = app(args=argv, standalone_mode=False, prog_name="comptrust")
        # typer turns KeyboardInterrupt into Exit(130) and, outside standalone mode, *returns* exit codes
        if rv == 130:
            raise KeyboardInterrupt
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:
            sys.exit(rv)
    except ComptrustError as e:
        say(str(e))
        sys.exit(e.exit_code)
    except usage as e:
        say(e.format_message())
        sys.exit(2)
    except clicks as e:
        say(e.format_message())
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno == errno.EISDIR and e.filename and not getattr(e, "comptrust_write", False):
            # a folder where a file (a data file, a model file) was expected: bad input, not a failed write
            say(f"{e.filename} is a folder where a file was expected")
            sys.exit(2)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EISDIR,
                       errno.ENOTDIR):
            target = getattr(e, "filename2", None) or e.filename  # a rename names its destination second
            where = f" {target}" if target else ""
            say(f"cannot write{where}: {e.strerror}; work committed so far is kept")
            sys.exit(1)
        raise
    except sqlite3.DatabaseError as e:  # a store damaged after it was opened (bad pages): say so in one line
        if "locked" in str(e) or "busy" in str(e):  # another process holds it: busy, never "move it away"
            say(f"the results database (comptrust.sqlite in --out) is busy: another comptrust process is writing "
                f"it ({e}); wait for that run to finish or use another --out; nothing stored was lost")
        else:
            say(f"the results database (comptrust.sqlite in --out) is damaged: {e}; move it away and rerun "
                "(its generations are then made again)")
        sys.exit(1)
    except (KeyboardInterrupt, *abort):
        if terminated:
            print("terminated (SIGTERM): finished work is saved; rerun the same command to resume", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except exit_ as e:
        sys.exit(e.exit_code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
