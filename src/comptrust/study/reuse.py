"""What studies share through $COMPTRUST_HOME: compressed checkpoints and generations, keyed by fingerprints.

A study's own folder (its comptrust.sqlite, models/) already makes a rerun of the *same* study resume. These caches
make a *new* study (a fresh --out) skip what an earlier one on this machine computed:

  $COMPTRUST_HOME/study-cache/checkpoints/<key>/   a compressed checkpoint; key = sha256 of the source model's
                                                   fingerprint (its content hash), the compression config (method,
                                                   settings, calibration seed) and the versions that make it
  $COMPTRUST_HOME/study-cache/generations.sqlite   generations, in the store's own layout: keyed by (model
                                                   fingerprint, rendered prompt, decoding parameters, seed), as in a
                                                   study's store, so a hit is the output the same model gave; a
                                                   study's look-ups read through to it (ReadThrough) and copy
                                                   only the hits they use

Checkpoints are copied in as hard links where the file system allows (no extra disk; clearing the cache never
breaks a study that used one), else as copies. Off with COMPTRUST_STUDY_CACHE=off; emptied with
`comptrust cache clear`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from comptrust.errors import ComptrustError
from comptrust.paths import home

ENV = "COMPTRUST_STUDY_CACHE"


def enabled() -> bool:
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def cache_root() -> Path:
    return home() / "study-cache"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("comptrust", "llmcompressor", "compressed-tensors", "torch", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def checkpoint_key(model: str | None, config: dict[str, Any]) -> str:
    """The cache key of the checkpoint that compressing `model` with `config` (CompressConfig.model_dump()) makes.

    The model enters by content (its resolved fingerprint), not by name: a local folder whose weights changed is
    another model.
    """
    from comptrust.models import resolve

    body = {"model": resolve(model).fingerprint, "config": config, "versions": _versions()}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def safe_checkpoint_key(model: str | None, config: dict[str, Any]) -> str:
    """checkpoint_key, or "" (no reuse) when the cache is off or the model cannot be resolved here: then the
    compression itself reports the model's problem, not the cache."""
    if not enabled():
        return ""
    try:
        return checkpoint_key(model, config)
    except Exception:  # noqa: BLE001 -- a cache must never be why a unit fails
        return ""


def _link_tree(src: Path, dst: Path) -> None:
    """Copy folder src to dst (which must not exist) file by file as hard links, falling back to copies."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def _place(src: Path, dst: Path) -> None:
    """Link src's files into dst through a temporary sibling renamed at the end: a half-made dst never exists."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        tmp.rmdir()
        _link_tree(src, tmp)
        if dst.exists():  # another process placed it first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.replace(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def restore_checkpoint(key: str, dst: Path, record_name: str) -> dict[str, Any] | None:
    """Place the cached checkpoint `key` at dst and return its record, or None when there is none."""
    src = cache_root() / "checkpoints" / key
    if not enabled() or not (src / record_name).is_file() or dst.exists():
        return None
    try:
        record = json.loads((src / record_name).read_text())
        _place(src, dst)
    except (OSError, ValueError):
        return None  # a damaged cache entry only costs the compression it would have saved
    return record


def save_checkpoint(key: str, src: Path, record_name: str) -> None:
    """Keep a finished checkpoint for later studies (best effort: a full disk must not fail the study)."""
    dst = cache_root() / "checkpoints" / key
    if not enabled() or not (src / record_name).is_file() or dst.exists():
        return
    with contextlib.suppress(OSError):
        _place(src, dst)


def _shared_store():
    from comptrust.store import Store

    return Store(cache_root() / "generations.sqlite")


def _warn(what: str, e: BaseException) -> None:
    print(f"warning: study cache: could not {what} ({type(e).__name__}: {e}); the study goes on without it",
          file=sys.stderr, flush=True)


class ReadThrough:
    """A study's store whose generation look-ups fall through to the shared cache.

    A key the study's store lacks is looked up in $COMPTRUST_HOME/study-cache/generations.sqlite; a hit is copied
    into the study's store (so the study keeps exactly the generations it used, as if it had made them) and
    served as a cache hit. New generations go to both. Everything else is the study's store: evaluate() and
    CachedEngine use this object where they would use the Store. A damaged or busy shared cache warns once and is
    then left alone.
    """

    def __init__(self, store: Any, shared: Any):
        self._store, self._shared = store, shared
        self.reused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _drop_shared(self, what: str, e: BaseException) -> None:
        _warn(what, e)
        self._shared = None

    def get_generations(self, keys: Any) -> dict[str, tuple[list[str], list[int]]]:
        keys = list(keys)
        hits = self._store.get_generations(keys)
        missing = [k for k in keys if k not in hits]
        if missing and self._shared is not None:
            try:
                rows = []
                for i in range(0, len(missing), 500):
                    chunk = missing[i : i + 500]
                    rows += self._shared.db.execute(
                        "SELECT key, model, prompt, params, outputs, n_tokens FROM generations WHERE key IN "
                        f"({','.join('?' * len(chunk))})", chunk).fetchall()
            except (OSError, sqlite3.Error) as e:
                self._drop_shared("read earlier generations", e)
                rows = []
            if rows:
                self._store.put_generation_rows(rows)
                hits.update(self._store.get_generations([r[0] for r in rows]))
                self.reused += len(rows)
        return hits

    def put_generations(self, rows: Any) -> None:
        rows = list(rows)
        self._store.put_generations(rows)  # the study's own copy first: it alone must not fail silently
        if self._shared is not None:
            try:
                self._shared.put_generations(rows)
            except (OSError, sqlite3.Error, ComptrustError) as e:
                self._drop_shared("keep generations for later studies", e)


@contextlib.contextmanager
def generations_through_cache(store: Any) -> Iterator[Any]:
    """Yield the store to evaluate with: `store` itself when the cache is off or cannot be opened, else a
    ReadThrough on it."""
    if not enabled():
        yield store
        return
    try:
        shared = _shared_store()
    except (OSError, sqlite3.Error, ComptrustError) as e:
        _warn("open the shared generation cache", e)
        yield store
        return
    try:
        yield ReadThrough(store, shared)
    finally:
        shared.close()


def describe() -> dict[str, Any]:
    """What the caches hold: {"root", "checkpoints", "generations", "bytes"}."""
    root = cache_root()
    ckpts = [p for p in (root / "checkpoints").glob("*") if p.is_dir() and not p.name.startswith(".")]
    n_gen: int | None = 0
    if (root / "generations.sqlite").is_file():
        try:
            with _shared_store() as shared:
                n_gen = shared.count_generations()
        except (OSError, sqlite3.Error, ComptrustError):
            n_gen = None  # damaged or busy: `comptrust cache clear` still removes it
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    return {"root": str(root), "checkpoints": len(ckpts), "generations": n_gen, "bytes": size}


def clear() -> dict[str, Any]:
    """Remove both caches; returns what they held. Studies that used a checkpoint keep their own links to it."""
    before = describe()
    shutil.rmtree(cache_root(), ignore_errors=True)
    return before
