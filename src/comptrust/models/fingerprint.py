"""Content fingerprints of model files, so every stored result names exactly which weights produced it.

Hashing a 13 GB checkpoint takes a while, so a directory's fingerprint is memoised in $COMPTRUST_HOME under
a key of (path, file names, sizes, mtimes): touching or replacing any file invalidates it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from comptrust.paths import home

# files that change what a model generates: weights, config, tokenizer + chat template, compression record
_RELEVANT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".gguf")
# comptrust.json (compression record) holds wall times and timestamps: identical reruns must keep one fingerprint,
# and the weights it describes are hashed anyway
_IGNORED = {"comptrust-fingerprint.json", "comptrust.json"}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _relevant_files(d: Path) -> list[Path]:
    return sorted(
        p for p in d.iterdir() if p.is_file() and p.suffix in _RELEVANT_SUFFIXES and p.name not in _IGNORED
    )


def dir_fingerprint(d: Path) -> str:
    d = d.resolve()
    files = _relevant_files(d)
    stat_key = hashlib.sha256(
        json.dumps([[str(d)]] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]).encode()
    ).hexdigest()
    memo_dir = home() / "fingerprints"
    memo_dir.mkdir(parents=True, exist_ok=True)
    memo = memo_dir / f"{stat_key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode() + b"\n")
    fp = h.hexdigest()
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(fp)
    tmp.replace(memo)
    return fp
