"""Study variants of kind ``gguf``: what llama.cpp serves, evaluated as served.

    variants:
      - {method: gguf}                      # the model's own GGUF, served by llama.cpp (next to its transformers copy)
      - {method: gguf, quant: Q8_0}         # a llama.cpp quantization of it (llama-cpp-python's quantize API)
      - {method: gguf, file: my.Q4_K_M.gguf}  # a GGUF made elsewhere

The "compression" step makes the checkpoint folder the study evaluates: ``model.gguf`` (quantized here, or a link
to the GGUF served as is) and ``comptrust-gguf.json`` (what was done). No calibration: llama.cpp's quantizers are
deterministic, so a gguf variant has one instance, seed 0. The source must be a GGUF (the embedded model, or a
study ``model:`` that is a .gguf file); quantizing an already-quantized source requantizes it (the embedded model
is Q4_1), which llama.cpp allows and which compounds both formats' errors -- the report says which source it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from comptrust.errors import UsageError

RECORD = "comptrust-gguf.json"
MODEL_FILE = "model.gguf"

# Nominal bits per weight of llama.cpp's tensor types and file types (block scales included; the K_S/K_M/K_L
# file types mix tensor types, so theirs are llama.cpp's quoted averages). Used to order variants in the report.
GGUF_BITS = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q5_K": 5.5, "Q5_K_S": 5.5, "Q5_K_M": 5.69, "Q4_1": 5.0, "Q4_0": 4.5, "Q4_K": 4.5, "Q4_K_S": 4.58,
    "Q4_K_M": 4.89, "Q3_K": 3.4375, "Q3_K_S": 3.5, "Q3_K_M": 3.91, "Q3_K_L": 4.27, "Q2_K": 2.625,
    "Q2_K_S": 2.63, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "IQ3_S": 3.44, "IQ3_XXS": 3.06, "IQ2_XS": 2.31,
}


def source_gguf(model: str | None) -> Path:
    """The GGUF a gguf variant starts from: the study's model when it is a .gguf file, else the embedded one."""
    from comptrust.models.resolve import gguf_file

    return gguf_file(model, "gguf variants need a GGUF model (the embedded one, or model: a .gguf file); "
                     "{spec} is not one (give the variant a file: instead)", "model {spec}: no such GGUF file")


def main_type(path: Path) -> str | None:
    """The tensor type that most of a GGUF's tensors have (its quantization, for the report)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _main_type(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _main_type(path: str, size: int, mtime_ns: int) -> str | None:
    """Read once per file version: Variant.bits() asks for every sort, description and recommendation."""
    from comptrust.engine.llamacpp import gguf_tensor_types

    try:
        counts = Counter(gguf_tensor_types(path))
    except Exception:  # noqa: BLE001 -- unreadable file: reported when it is served
        return None
    return counts.most_common(1)[0][0] if counts else None


def nominal_bits(settings: dict[str, Any], model: str | None) -> float:
    quant = settings.get("quant")
    if quant:
        return GGUF_BITS.get(str(quant).upper(), 16.0)
    try:
        path = Path(settings["file"]).expanduser() if settings.get("file") else source_gguf(model)
    except UsageError:
        return 16.0
    return GGUF_BITS.get(main_type(path) or "", 16.0)


def check_settings(settings: dict[str, Any], model: str | None) -> None:
    """Validate a gguf variant's settings before any work starts (UsageError naming the bad one)."""
    extra = [k for k in settings if k not in ("quant", "file")]
    if extra:
        raise UsageError(f"gguf variants take quant and file only (got {', '.join(extra)})")
    quant, file = settings.get("quant"), settings.get("file")
    if quant is not None and file is not None:
        raise UsageError("give a gguf variant quant (quantize the model's GGUF) or file (serve that GGUF), not both")
    if quant is not None and (not isinstance(quant, str) or str(quant).upper() not in GGUF_BITS):
        raise UsageError(f"quant: {quant!r}; llama.cpp types include {', '.join(sorted(GGUF_BITS))}")
    if file is not None:
        if not isinstance(file, str) or not Path(file).expanduser().is_file():
            raise UsageError(f"file: {file!r} is not a GGUF file")
    elif model is not None and not str(model).lower().endswith(".gguf"):
        raise UsageError(f"gguf variants need a GGUF model (the embedded one, or model: a .gguf file), "
                         f"not {model}; or give the variant a file:")


def label(settings: dict[str, Any]) -> str:
    if settings.get("quant"):
        return f"llama.cpp {str(settings['quant']).upper()}"
    if settings.get("file"):
        return f"GGUF {Path(settings['file']).name}"
    return "the model's GGUF as is"


def auto_name(settings: dict[str, Any]) -> str:
    if settings.get("quant"):
        return f"gguf-{str(settings['quant']).lower()}"
    if settings.get("file"):
        return f"gguf-{Path(settings['file']).stem.lower()}"
    return "gguf"


def prepare(model: str | None, settings: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """Make the checkpoint folder `ckpt` (model.gguf + record); written beside and renamed, so a killed run
    leaves no half folder. Returns the record."""
    t0 = time.time()
    src = Path(settings["file"]).expanduser() if settings.get("file") else source_gguf(model)
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    record: dict[str, Any] = {"method": "gguf", "source": str(src.resolve()), "source_type": main_type(src),
                              **{k: v for k, v in settings.items() if v is not None}}
    if settings.get("quant"):
        from comptrust.engine.llamacpp import quantize_gguf

        q = quantize_gguf(src, tmp / MODEL_FILE, str(settings["quant"]))
        record.update(quantize_seconds=round(q["seconds"], 2), bytes=q["bytes"], tensor_types=q["tensor_types"])
    else:  # served as is: a link, not a copy (a GGUF can be tens of GB)
        os.symlink(src.resolve(), tmp / MODEL_FILE)
        record["bytes"] = src.stat().st_size
    record["seconds"] = round(time.time() - t0, 2)
    (tmp / RECORD).write_text(json.dumps(record, indent=2))
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)
    return record


def stored_record(ckpt: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a checkpoint folder made earlier with the same settings (a run killed before recording)."""
    try:
        rec = json.loads((ckpt / RECORD).read_text())
    except (OSError, ValueError):
        return None
    same = all(rec.get(k) == v for k, v in settings.items() if v is not None)
    return rec if same and (ckpt / MODEL_FILE).exists() else None
