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


# Bounds on a GGUF header, checked before the gguf library reads it: GGUFReader builds Python objects for every
# element of a metadata array (~720 B of RAM per file byte: a crafted 4 MB file with one 4M-element array took
# 2 min and 2.9 GB). The largest real arrays are a tokenizer's tokens / scores / types / merges (~260k entries);
# the bounds keep what a crafted header can cost the reader to about a real large-vocabulary model's header.
MAX_ARRAY_ITEMS = 1 << 20
MAX_TOTAL_ITEMS = 1 << 22
MAX_KV = 10_000
MAX_TENSORS = 100_000
MAX_STRING = 1 << 24
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def prescan_gguf(path: Path) -> dict[str, Any] | None:
    """Walk the GGUF header (metadata and tensor infos) in bounded time and memory, building nothing big:
    UsageError for an array, string or count beyond the bounds above or beyond the file's end. Returns the
    header's summary (what inspect_gguf reports), or None for a layout it does not walk (v1, big-endian), which
    the gguf library then reads."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise UsageError(f"truncated GGUF file {path}: {len(head)} bytes of header")
        version = struct.unpack_from("<I", head, 4)[0]
        if version not in (2, 3):
            return None  # v1 or big-endian: the gguf library's own checks apply
        n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)

        def bad(what: str) -> UsageError:
            return UsageError(f"GGUF file {path}: {what}; not a model file comptrust reads")

        if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
            raise bad(f"header declares {n_kv:,} metadata entries and {n_tensors:,} tensors (at most {MAX_KV:,} and "
                      f"{MAX_TENSORS:,})")

        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) < n:
                raise UsageError(f"truncated GGUF file {path}: the header runs past the end of the file")
            return b

        def string(what: str) -> bytes:
            n = struct.unpack("<Q", read(8))[0]
            if n > MAX_STRING or n > size:
                raise bad(f"{what} declares a string of {n:,} bytes")
            return read(n)

        total = [0]

        def value(vtype: int, key: str, depth: int = 0) -> Any:
            """The value for scalars and strings (kept: a few header fields are reported), None for arrays."""
            if vtype in _SCALAR_SIZES:
                raw = read(_SCALAR_SIZES[vtype])
                return int.from_bytes(raw, "little") if vtype in (0, 2, 4, 10) else None
            if vtype == _STRING:
                return string(f"metadata {key!r}").decode("utf-8", "replace")
            if vtype != _ARRAY:
                raise bad(f"metadata {key!r} has unknown type {vtype}")
            etype, count = struct.unpack("<IQ", read(12))
            if count > MAX_ARRAY_ITEMS:
                raise bad(f"metadata array {key!r} has {count:,} elements (at most {MAX_ARRAY_ITEMS:,})")
            total[0] += count
            if total[0] > MAX_TOTAL_ITEMS:
                raise bad(f"its metadata arrays hold more than {MAX_TOTAL_ITEMS:,} elements in all")
            if etype in _SCALAR_SIZES:
                n = _SCALAR_SIZES[etype] * count
                if f.tell() + n > size:
                    raise UsageError(f"truncated GGUF file {path}: metadata array {key!r} runs past the end")
                f.seek(n, 1)
            elif etype == _STRING:
                for _ in range(count):
                    string(f"metadata array {key!r}")
            elif etype == _ARRAY and depth < 2:
                for _ in range(count):
                    value(_ARRAY, key, depth + 1)
            else:
                raise bad(f"metadata array {key!r} has elements of unknown type {etype}")
            return None

        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string("a metadata key").decode("utf-8", "replace")
            fields[key] = value(struct.unpack("<I", read(4))[0], key)
        tensors = []
        for _ in range(n_tensors):
            name = string("a tensor name").decode("utf-8", "replace")
            n_dims = struct.unpack("<I", read(4))[0]
            if n_dims > 8:
                raise bad(f"tensor {name!r} declares {n_dims} dimensions")
            dims = struct.unpack(f"<{n_dims}Q", read(8 * n_dims))
            ttype, offset = struct.unpack("<IQ", read(12))
            tensors.append((name, dims, ttype, offset))
        header_end = f.tell()
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    align = fields.get("general.alignment") or 32
    start = header_end + (-header_end % align)
    types: Counter = Counter()
    n_bytes = 0
    last = start
    for name, dims, ttype, offset in tensors:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise bad(f"tensor {name!r} has unknown type {ttype}") from None
        elems = 1
        for d in dims:
            elems *= d
        nb = elems * type_size // block
        types[qtype.name] += 1
        n_bytes += nb
        last = max(last, start + offset + nb)
    return {"architecture": fields.get("general.architecture"), "name": fields.get("general.name"),
            "tensor_types": dict(types), "n_tensors": len(tensors), "tensor_bytes": n_bytes, "_end": last}


def inspect_gguf(path: Path) -> dict[str, Any]:
    """Read the GGUF header: architecture, name, tensor type counts. Raises UsageError if corrupt."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UsageError(f"{path} is not a GGUF file (bad magic bytes {magic!r})")
    walked = prescan_gguf(path)
    if walked is not None:  # v2/v3 little-endian: the walk has it all (GGUFReader took 12 s for the embedded model)
        last = walked.pop("_end")
        if not walked["n_tensors"]:
            raise UsageError(f"corrupt or truncated GGUF file {path}: it holds no tensors")
        if last > path.stat().st_size:
            raise UsageError(f"truncated GGUF file {path}: tensors end at byte {last}, file has {path.stat().st_size}")
        return walked
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


def _cached_meta(meta_file: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


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
        meta = _cached_meta(meta_file)
        if meta is not None and meta.get("fingerprint") == fp:
            return out, fp, meta
        # truncated (a kill mid-write of an older version), edited or fingerprint-less: convert again
        stale = out.with_name(f".{out.name}.stale-{time.time_ns()}")
        try:
            out.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass

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
