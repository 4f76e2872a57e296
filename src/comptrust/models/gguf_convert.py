"""GGUF -> safetensors, once per file content.

transformers can load a GGUF directly but dequantizes it on every load (15 s for the embedded model) and
refuses to save it; we convert once into $COMPTRUST_HOME/models/gguf-<sha>/ and load the safetensors copy
afterwards (0.4 s). The GGUF's own quantization types are recorded: a GGUF "dense" model is usually already
quantized (the embedded SmolLM2 is Q4_1: at most 16 values per 32-weight block), which matters when it is
the baseline of a compression study.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from comptrust.errors import UsageError
from comptrust.models.fingerprint import file_sha256
from comptrust.paths import models_cache

META_NAME = "comptrust-model.json"


def inspect_gguf(path: Path) -> dict[str, Any]:
    """Read the GGUF header: architecture, name, tensor type counts. Raises UsageError if corrupt."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UsageError(f"{path} is not a GGUF file (bad magic bytes {magic!r})")
    try:
        from gguf import GGUFReader

        r = GGUFReader(str(path))
        types = Counter(t.tensor_type.name for t in r.tensors)
        n_bytes = sum(int(t.n_bytes) for t in r.tensors)
        last = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)

        def field(name: str) -> Any:
            fld = r.fields.get(name)
            if fld is None:
                return None
            try:
                return fld.contents()
            except Exception:  # older gguf versions
                return None

        info = {
            "architecture": field("general.architecture"),
            "name": field("general.name"),
            "tensor_types": dict(types),
            "n_tensors": len(r.tensors),
            "tensor_bytes": n_bytes,
        }
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"corrupt or truncated GGUF file {path}: {type(e).__name__}: {e}") from None
    if last > path.stat().st_size:
        raise UsageError(f"truncated GGUF file {path}: tensors end at byte {last}, file has {path.stat().st_size}")
    return info


def quantization_note(types: dict[str, int]) -> str | None:
    quant = {k: v for k, v in types.items() if k not in ("F32", "F16", "BF16")}
    if not quant:
        return None
    main = max(quant, key=quant.get)
    return (
        f"the source GGUF is quantized ({', '.join(f'{k} x{v}' for k, v in sorted(quant.items()))}); "
        f"its dequantized copy is the 'dense' baseline, so the baseline itself is already {main}"
    )


def convert(gguf_path: Path) -> tuple[Path, str, dict[str, Any]]:
    """Return (hf_dir, fingerprint, meta), converting only if this content was never converted."""
    gguf_path = gguf_path.resolve()
    info = inspect_gguf(gguf_path)
    fp = file_sha256(gguf_path)
    out = models_cache() / f"gguf-{fp[:24]}"
    meta_file = out / META_NAME
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return out, meta["fingerprint"], meta

    import sys

    # a first conversion takes ~20 s (SmolLM2) to minutes: say what is happening before transformers' imports
    print(f"[comptrust] converting GGUF {gguf_path.name} to safetensors (once; cached in {out})", file=sys.stderr,
          flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=models_cache()))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as e:
            raise UsageError(f"cannot load GGUF file {gguf_path}: {type(e).__name__}: {e}") from None
        # transformers refuses to serialise a model that still carries its GGUF quantizer; the weights are
        # already dequantized in memory, so dropping it is safe (reload is bit-identical).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        meta = {
            "fingerprint": fp,
            "source": str(gguf_path),
            "source_kind": "gguf",
            "gguf": info,
            "quantization_note": quantization_note(info["tensor_types"]),
            "converted_in_s": round(time.time() - t0, 2),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
        if out.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out, fp, meta
