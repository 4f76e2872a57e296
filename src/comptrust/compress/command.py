"""The `comptrust compress` command. Errors are raised (UsageError / RuntimeFailure); cli.main() reports them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from comptrust.compress.config import (
    DEFAULT_AWQ_GRID,
    DEFAULT_CALIB_BATCH,
    DEFAULT_GROUP_SIZE,
    DEFAULT_N_CALIB,
    DEFAULT_SEQ_LEN,
    METHODS,
    CompressionConfig,
)
from comptrust.errors import UsageError

HELP = f"""Compress a model and prove the result is what it claims to be.

[bold]Methods[/bold]
  [cyan]gptq[/cyan]       quantize, correcting rounding error with calibration data
  [cyan]awq[/cyan]        activation-aware scaling, then quantize (slow on CPU: --awq-grid)
  [cyan]rtn[/cyan]        round-to-nearest quantization, no data (baseline for gptq/awq)
  [cyan]gptq-w8a8[/cyan]  SmoothQuant + GPTQ, llm-compressor's W8A8 INT8 scheme (8-bit weights
             per channel, 8-bit activations per token when served)
  [cyan]fp8-dynamic[/cyan]
             FP8 weights per channel, dynamic FP8 activations (FP8_DYNAMIC), no data
  [cyan]magnitude[/cyan]  prune the smallest weights, no data
  [cyan]sparsegpt[/cyan]  prune and correct the remaining weights with calibration data
  [cyan]wanda[/cyan]      prune by |weight| x input norm from calibration data
  [cyan]recipe[/cyan]     an llm-compressor recipe file: --recipe recipe.yaml (no --method needed)

[bold]Quantization[/bold] (gptq, awq, rtn): --bits 2..8 (default 4) and --group-size
(default {DEFAULT_GROUP_SIZE}; 0 = one scale per row). Where a layer's input width is not a
multiple of the group size, the largest size dividing both is used (576 -> 64)
and recorded. gptq/rtn are symmetric, awq asymmetric.
gptq-w8a8 and fp8-dynamic are 8-bit with one scale per output channel (no
--bits/--group-size). Evaluation on the CPU dequantizes the weights and does
NOT quantize activations (a deviation: scores show the weight rounding only).

[bold]Pruning[/bold] (magnitude, sparsegpt, wanda): --sparsity in (0, 1) (default 0.5),
or --structure N:M, i.e. at most N nonzeros per M consecutive weights of a row
(2:4 and 4:8 are both 50%). Pruned models are saved dense (what comptrust
evaluates); 2:4 ones also in compressed-tensors' sparse-24-bitmask format in
<out>/sparse-2of4 (vLLM >= 0.19.1 no longer loads that format).

[bold]Recipes[/bold]: --recipe FILE runs an llm-compressor recipe (YAML stages of
modifiers) as is. It is checked before the model loads (a bad one: FILE:LINE:
what is wrong, exit 2) and must keep lm_head (ignore: \\[lm_head]). It is known
by its content (sha256 of the parsed YAML), and its bits, group size, sparsity
and N:M structure are read where it states them.

lm_head always stays dense.

[bold]Calibration[/bold] (gptq, awq, gptq-w8a8, sparsegpt, wanda, recipe): by default
{DEFAULT_N_CALIB} of comptrust's 152 built-in instruction/response conversations in the
model's chat template, drawn with --seed. Same seed and settings: the same checkpoint.

[bold]Output[/bold]: the checkpoint (compressed-tensors when quantized), the tokenizer
and comptrust.json with the settings, calibration, source fingerprint, time,
peak memory, library versions and measured checks: sparsity, N:M validity,
distinct values per group (<= 2^bits), held-out perplexity before/after, and a
sample generation. The directory is a valid --model for other commands.

[bold]Examples[/bold]
  comptrust compress --method gptq --bits 4 --out models/gptq-w4
  comptrust compress --method sparsegpt --structure 2:4 --out models/sgpt-2of4
  comptrust compress --method gptq-w8a8 --out models/w8a8
  comptrust compress --recipe recipe.yaml --out models/from-recipe
  comptrust compress --model my-model/ --method wanda --sparsity 0.5 \\
      --calibration chats.jsonl --seed 1 --out models/wanda-50
"""


def compress_command(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (must be new, or an earlier comptrust checkpoint, which is replaced)."),
    method: Optional[str] = typer.Option(None, "--method", help=f"One of: {', '.join(METHODS)} (recipe: implied by --recipe)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="An llm-compressor recipe (YAML) to run instead of a --method; validated before the model loads."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to compress: omit for the embedded SmolLM2-135M-Instruct; a .gguf file, a Hugging Face model directory, or a Hub id org/name\\[@revision]."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Quantization bits per weight, 2..8 (default 4). gptq/awq/rtn only."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help=f"Weights sharing one scale (default {DEFAULT_GROUP_SIZE}); 0 = per output row. gptq/awq/rtn only."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction of zero weights, in (0, 1) (default 0.5). Pruning only."),
    structure: Optional[str] = typer.Option(None, "--structure", help="'unstructured' (default) or N:M, e.g. 2:4 or 4:8. Pruning only."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration data: omit for the built-in set; a .jsonl file ({\"messages\": [...]} or {\"text\": ...} per line); a text file (blank lines separate samples); or a Hub dataset id org/name[:split]."),
    n_calib: Optional[int] = typer.Option(None, "--n-calib", help=f"Calibration samples drawn (default {DEFAULT_N_CALIB}; all when the set is smaller)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help=f"Max tokens per calibration sample (default {DEFAULT_SEQ_LEN})."),
    calib_batch: Optional[int] = typer.Option(None, "--calib-batch", help=f"Calibration samples per forward (default {DEFAULT_CALIB_BATCH}; 1 = one at a time, llm-compressor's default). Samples are grouped by length and cut to their batch's shortest, never padded."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling the calibration set; same seed, same checkpoint."),
    awq_grid: Optional[int] = typer.Option(None, "--awq-grid", help=f"AWQ grid points searched per layer group (default {DEFAULT_AWQ_GRID}; llm-compressor's own default is 20, about 1.5x slower). awq only."),
) -> None:
    from comptrust.extras import require

    require("comptrust compress", "compress")  # before any model is loaded
    if method is None and recipe is not None:
        method = "recipe"
    if method is None:
        raise UsageError(f"give --method ({', '.join(METHODS)}) or --recipe FILE")
    if method not in METHODS:
        import difflib

        hint = difflib.get_close_matches(method.lower(), METHODS, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UsageError(f"--method {method!r}{did}: choose one of {', '.join(METHODS)}")
    cfg = CompressionConfig.build(
        method=method,
        recipe=recipe,
        bits=bits,
        group_size=group_size,
        sparsity=sparsity,
        structure=structure,
        calibration=calibration,
        n_calib=n_calib,
        seq_len=seq_len,
        calib_batch=calib_batch,
        seed=seed,
        awq_grid=awq_grid,
    )
    from comptrust.compress.api import RECORD_NAME, compress

    def progress(msg: str) -> None:
        typer.echo(f"[compress] {msg}", err=True)

    path = compress(model, cfg, out, progress=progress)
    _summary(path / RECORD_NAME)


def _summary(record_path: Path) -> None:
    import json

    rec = json.loads(record_path.read_text())
    c = rec["checks"]
    ppl = c["perplexity"]
    lines = [f"wrote {record_path.parent}  ({rec['label']}, {rec['wall_time_s']:.1f} s, peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB)"]
    if "levels" in c and rec.get("bits"):
        lines.append(f"  levels per group: max {c['levels']['max']} (<= {2 ** rec['bits']}), mean {c['levels']['mean']:.1f}; group size by input width {rec['group_size_by_width']}")
    lines.append(f"  sparsity: {c['sparsity']['total']:.4f} (layers {c['sparsity']['min_layer']:.4f}..{c['sparsity']['max_layer']:.4f})")
    if "nm" in c:
        lines.append(f"  {c['nm']['structure']} pattern: {'valid' if c['nm']['valid'] else 'INVALID'} over {c['nm']['groups']} groups")
    if rec.get("sparse_2of4"):
        lines.append(f"  2:4 sparse copy: {record_path.parent / rec['sparse_2of4']['dir']} ({rec['sparse_2of4']['format']})")
    if rec.get("method") == "recipe":
        d = rec["method_details"]
        lines.append(f"  recipe {d['recipe_file']} (sha256 {d['recipe_sha256'][:12]}): {', '.join(d['recipe_modifiers'])}")
    lines.append(f"  perplexity (held-out, {ppl['tokens']} tokens): {ppl['before']:.2f} -> {ppl['after']:.2f}")
    lines.append(f"  sample: {c['sample_generation']['output'][:100]!r}")
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    app.command("compress", help=HELP, no_args_is_help=True)(compress_command)
