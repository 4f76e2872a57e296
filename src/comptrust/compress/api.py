"""compress(): model spec + CompressionConfig -> a checked, self-describing checkpoint directory.

Order of work (cheap refusals first, so bad input fails in a second and leaves nothing behind):
  1. refuse an `out` that exists and is not a comptrust checkpoint; resolve the model; read the calibration set
  2. in a temp dir beside `out`: load, perplexity before, compress, refuse NaN/inf, save (compressed-tensors
     for quantized models, dense safetensors for pruned ones, plus a sparse-24-bitmask copy in sparse-2of4/ for
     2:4 ones) with the tokenizer
  3. reload what was saved (dequantized), measure the checks, refuse a model that is not what it claims
     (sparsity below target, N:M violations, more than 2^bits levels per group), generate a short text
  4. write comptrust.json, then rename the temp dir to `out` (replacing an older comptrust checkpoint)
Any failure removes the temp dir.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from comptrust.compress import checks
from comptrust.compress.calibration import load_calibration
from comptrust.compress.config import CompressionConfig
from comptrust.errors import ComptrustError, RuntimeFailure, UsageError, check_interrupted

RECORD_NAME = "comptrust.json"
RECORD_FORMAT = "comptrust-compressed/1"


def is_comptrust_checkpoint(d: Path) -> bool:
    rec = d / RECORD_NAME
    if not rec.is_file():
        return False
    try:
        return json.loads(rec.read_text()).get("format") == RECORD_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and is_comptrust_checkpoint(out)):
        raise UsageError(
            f"--out {out} exists and is not a comptrust checkpoint (no {RECORD_NAME}); "
            "choose a new directory or remove it"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create its parent directory ({e.strerror})") from None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("comptrust", "torch", "transformers", "llmcompressor", "compressed-tensors", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise UsageError(f"cannot load the tokenizer of {path}: {type(e).__name__}: {e}") from None


def compress(
    model_spec: str | None,
    cfg: CompressionConfig,
    out: Path,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Compress `model_spec` (see comptrust.models.resolve) as `cfg` says, into `out`. Returns `out`."""
    from comptrust.models.resolve import resolve

    say = progress or (lambda msg: None)
    out = Path(out).expanduser().absolute()
    t_start, cpu_start = time.time(), time.process_time()
    check_out(out)
    source = resolve(model_spec)
    tokenizer = _load_tokenizer(source.path)
    calib = None
    if cfg.needs_calibration:
        assert cfg.n_calib is not None and cfg.seq_len is not None and cfg.calib_batch is not None
        calib = load_calibration(cfg.calibration, tokenizer, cfg.n_calib, cfg.seq_len, cfg.seed, cfg.calib_batch)
        cut = calib.meta.get("tokens_before_batching", calib.n_tokens) - calib.n_tokens
        say(f"calibration: {calib.n} samples, {calib.n_tokens} tokens from {calib.source}"
            + (f" ({calib.batch} per forward; {cut} tail tokens cut to even the batches)" if calib.batch > 1 else ""))

    _remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint should not be
    try:
        with _sigterm_as_exit():
            record = _compress_into(tmp, source, tokenizer, cfg, calib, say)
            record["wall_time_s"] = round(time.time() - t_start, 2)
            record["cpu_time_s"] = round(time.process_time() - cpu_start, 2)
            record["torch_threads"] = _torch_threads()
            record["peak_rss_bytes"] = _peak_rss_bytes()
            (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            for f in tmp.iterdir():  # some writers create private (0600) files
                if f.is_file():
                    os.chmod(f, 0o666 & ~umask)
            check_interrupted()  # a Ctrl-C swallowed during the compression: no checkpoint appears
            _replace(tmp, out)
    except ComptrustError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except MemoryError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeFailure(f"{cfg.method}: out of memory while compressing {source.name}") from None
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        raise RuntimeFailure(f"{cfg.method} failed on {source.name}: {type(e).__name__}: {first}") from e
    return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """A plain `kill` would skip the cleanup; turn SIGTERM into SystemExit so the temp dir is removed."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL, None
    ):  # the CLI's own handler (a KeyboardInterrupt: the same cleanup, and its one-line message) stays
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_stale_partials(out: Path) -> None:
    """Temp dirs of runs that were killed outright (SIGKILL, power loss): their pid is gone."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit(".partial-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _replace(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time() * 1000)}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _compress_into(tmp: Path, source: Any, tokenizer: Any, cfg: CompressionConfig, calib: Any, say: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from comptrust.compress.methods import method
    from comptrust.models.evalcopy import is_quantized_checkpoint, load_model

    m = method(cfg.method)  # what to run, how to save, what to check: compress/methods.py
    if is_quantized_checkpoint(source.path):
        raise UsageError(f"--model {source.spec or source.name} is already quantized; compress its dense original")
    say(f"loading {source.name}")
    model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype="auto")
    model.eval()
    dense_before = checks.dense_parts_digest(model)
    with torch.no_grad():
        ppl_before = checks.perplexity(model, tokenizer)
    say(f"perplexity before: {ppl_before['ppl']:.2f}; running {cfg.method}")

    t0 = time.time()
    info = m.apply(model, tokenizer, cfg, calib)
    compress_s = time.time() - t0
    checks.assert_finite(model)

    say("saving")
    with warnings.catch_warnings():
        # llm-compressor marks modules as offloaded to the CPU, which they already are
        warnings.filterwarnings("ignore", message=".*offloaded modules.*", category=UserWarning)
        extra_copies = m.save(model, tokenizer, tmp, cfg)
    tokenizer.save_pretrained(str(tmp))
    # llm-compressor writes recipe.yaml from its *global* session, which is empty because we ran oneshot in a
    # fresh one (it would say "default_stage: {}"); write the recipe that actually ran
    recipe = info.get("recipe", "")
    if not m.keeps_recipe:
        (tmp / "recipe.yaml").unlink(missing_ok=True)
    elif isinstance(recipe, str) and recipe.strip():
        (tmp / "recipe.yaml").write_text(recipe)
    del model
    gc.collect()

    say("reloading the checkpoint and measuring")
    reloaded = load_model(tmp)
    reloaded.eval()
    checks.assert_finite(reloaded)
    measured: dict[str, Any] = {"sparsity": checks.sparsity(reloaded)}
    dense_after = checks.dense_parts_digest(reloaded)
    measured["embeddings_and_lm_head_unchanged"] = dense_after == dense_before
    if dense_after != dense_before:
        changed = [k for k in dense_before if dense_after.get(k) != dense_before[k]]
        raise RuntimeFailure(f"{cfg.method} changed {' and '.join(changed)}, which must stay dense and untouched")
    measured.update(m.measure(reloaded, cfg, info))
    with torch.no_grad():
        ppl_after = checks.perplexity(reloaded, tokenizer)
    measured["perplexity"] = {
        "text": "comptrust/compress/data/heldout.txt",
        "tokens": ppl_after["tokens"],
        "text_sha256": ppl_after["text_sha256"],
        "before": ppl_before["ppl"],
        "after": ppl_after["ppl"],
    }
    if not math.isfinite(ppl_after["ppl"]):
        raise RuntimeFailure(f"{cfg.method}: perplexity after compression is {ppl_after['ppl']}; refusing to save")
    measured["finite"] = True
    measured["sample_generation"] = {
        "prompt": "What is the capital of France?",
        "output": checks.sample_generation(reloaded, tokenizer),
    }
    m.verify(cfg, measured)  # refuse a model that is not what it claims to be
    del reloaded
    gc.collect()

    return {
        "format": RECORD_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": cfg.method,
        "label": cfg.label(),
        "config": cfg.model_dump(),
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "group_size_by_width": info.get("group_size_by_width"),
        "sparsity": cfg.sparsity,
        "structure": cfg.structure,
        "seed": cfg.seed,
        "calibration": calib.describe() if calib is not None else None,
        "source_model": source.describe(),
        "checkpoint_format": m.checkpoint_format,
        **extra_copies,  # e.g. sparse_2of4: the compressed-tensors 2:4 copy for vLLM (compress/sparse24.py)
        "method_details": {k: v for k, v in info.items() if k not in ("group_size_by_layer",)},
        "group_size_by_layer": info.get("group_size_by_layer"),
        "compress_time_s": round(compress_s, 2),
        "checks": measured,
        "versions": _versions(),
    }
