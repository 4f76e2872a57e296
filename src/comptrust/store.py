"""One SQLite database per results directory: the generation cache, scores, and small key-value caches.

Why SQLite: a study runs for hours and gets killed; every chunk of generations is committed in one
transaction (WAL journal), so a kill loses at most the chunk in flight and a rerun regenerates nothing that
was committed. The cache key names the model fingerprint, the *rendered* prompt (after the chat template),
the decoding parameters and the seed: two models, or two templates, never share answers (lm-eval's cache
key, which omits the model, is the counter-example).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

from comptrust.errors import RuntimeFailure, UsageError, redact
from comptrust.failpoints import failpoint
from comptrust.types import GenParams, sha256_text

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    params TEXT NOT NULL,
    outputs TEXT NOT NULL,      -- JSON list of n strings
    n_tokens TEXT NOT NULL,     -- JSON list of n ints (new tokens per output)
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS generations_model ON generations(model);
CREATE TABLE IF NOT EXISTS scores (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    perspective TEXT NOT NULL,
    options TEXT NOT NULL,
    score TEXT NOT NULL,        -- JSON of comptrust.types.Score
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS units (
    id TEXT PRIMARY KEY,        -- e.g. "compress:gptq-w4@s0", "eval:gptq-w4@s0:ethics"
    kind TEXT NOT NULL,         -- compress | eval
    status TEXT NOT NULL,       -- done | failed
    result TEXT NOT NULL,       -- JSON: the unit's result (score, records, checkpoint record) or {}
    error TEXT,                 -- one line, for failed units
    seconds REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (ns, key)
);
"""


def _is_write_failure(e: sqlite3.Error) -> bool:
    msg = str(e).lower()
    return any(w in msg for w in ("disk i/o error", "disk is full", "readonly database", "unable to open"))


def _guard_writes(method):
    """A write that fails (full disk, I/O error) becomes one RuntimeFailure line; SQLite rolls the transaction
    back, so everything committed before stays intact."""

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise RuntimeFailure(busy_message(self.path, _busy_timeout(), e)) from None
            if _is_write_failure(e):
                raise RuntimeFailure(f"cannot write the results database {self.path}: {e} (disk full?); "
                                     "work committed so far is kept") from None
            raise

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def generation_key(model_fp: str, rendered: str, params: GenParams) -> str:
    return sha256_text(json.dumps([model_fp, rendered, params.key()], ensure_ascii=False, sort_keys=True))


def _busy_timeout() -> float:
    """Seconds a store held by another process is waited for: $COMPTRUST_STORE_WAIT, default 60."""
    raw = os.environ.get("COMPTRUST_STORE_WAIT", "").strip()
    if not raw:
        return 60.0
    try:
        val = float(raw)
    except ValueError:
        val = -1.0
    if not 0 <= val <= 86400:
        raise UsageError(f"COMPTRUST_STORE_WAIT={raw!r}: expected seconds between 0 and 86400")
    return val


def _is_busy(e: sqlite3.Error) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def busy_message(path: Path, waited: float, e: BaseException) -> str:
    return (f"the results database {path} is busy: another process holds a lock on it ({e}, waited {waited:g} s); "
            "nothing stored was lost: rerun when that run has finished, or use another --out")


# columns each table must have (a store of an older layout lacks some: refused when it is opened, not after a
# chunk was generated)
_COLUMNS = {
    "meta": {"key", "value"},
    "generations": {"key", "model", "prompt", "params", "outputs", "n_tokens", "created"},
    "scores": {"id", "model", "perspective", "options", "score", "created"},
    "units": {"id", "kind", "status", "result", "error", "seconds", "created"},
    "kv": {"ns", "key", "value", "created"},
}


class Store:
    """A thin, explicit wrapper around one SQLite file. Not shared across threads.

    readonly=True opens an existing store for queries only (``study --status``, reports): it works on read-only
    media and never creates, migrates or locks the file for writing. Every open checks the schema: a store of a
    newer comptrust is refused (its rows may mean something this version does not know), one of an older layout
    is named as such, and one locked by another process is waited for (COMPTRUST_STORE_WAIT s), then reported as
    busy, never as damaged.
    """

    def __init__(self, path: Path | str, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        wait = _busy_timeout()
        try:
            if readonly:
                if not self.path.is_file():
                    raise UsageError(f"{self.path} does not exist (no results database here)")
                self.db = self._connect_readonly(wait)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(str(self.path), timeout=wait)
        except (OSError, sqlite3.Error) as e:
            raise UsageError(f"cannot open the results database {self.path}: {e}") from None
        try:
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self._check_schema()
            if not readonly:
                self.db.executescript(_SCHEMA)
                self.db.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
                self.db.commit()
        except UsageError:
            self.db.close()
            raise
        except sqlite3.DatabaseError as e:
            self.db.close()
            if _is_busy(e):
                raise RuntimeFailure(busy_message(self.path, wait, e)) from None
            if _is_write_failure(e):
                raise RuntimeFailure(f"cannot write the results database {self.path}: {e} (disk full?)") from None
            raise UsageError(f"{self.path} is not a comptrust results database ({e})") from None

    def _connect_readonly(self, wait: float) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=wait)
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if _is_busy(e):
                raise
            # read-only media: a WAL store cannot make its -shm file there; read it as an immutable file
            return sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro&immutable=1", uri=True)

    def _check_schema(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables & set(_COLUMNS):
            if self.readonly:
                raise UsageError(f"{self.path} is not a comptrust results database (none of its tables)")
            return  # a new, empty file
        version = None
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = row[0] if row else None
        try:
            v = int(version) if version is not None else None
        except ValueError:
            v = None
        if v is not None and v > SCHEMA_VERSION:
            raise UsageError(
                f"{self.path} was written by a newer comptrust (store schema_version {v}; this version reads "
                f"{SCHEMA_VERSION}): upgrade comptrust to read it, or use another --out; the file is left as it is")
        missing = {t: sorted(cols - {r[1] for r in self.db.execute(f"PRAGMA table_info({t})")})
                   for t, cols in _COLUMNS.items() if t in tables}
        missing = {t: c for t, c in missing.items() if c}
        what = "; ".join(f"{t} lacks {', '.join(c)}" for t, c in missing.items())
        if v is None or v >= SCHEMA_VERSION:
            if missing:  # another program's SQLite file, or tables edited by hand
                raise UsageError(f"{self.path} is not a comptrust results database ({what})")
            return  # no version row (written between schema and meta): the tables are complete or get made
        if v < SCHEMA_VERSION:
            raise UsageError(
                f"{self.path} was written by an older comptrust (store schema_version {version or 'none'}"
                f"{'; ' + what if what else ''}) that this version cannot read: use another --out (the file is left "
                "as it is; its generations would be made again)")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- generations -----------------------------------------------------------------------------------------
    def get_generations(self, keys: Sequence[str]) -> dict[str, tuple[list[str], list[int]]]:
        out: dict[str, tuple[list[str], list[int]]] = {}
        for i in range(0, len(keys), 500):
            chunk = list(keys[i : i + 500])
            q = f"SELECT key, outputs, n_tokens FROM generations WHERE key IN ({','.join('?' * len(chunk))})"
            for k, outs, ntok in self.db.execute(q, chunk):
                out[k] = (json.loads(outs), json.loads(ntok))
        return out

    @_guard_writes
    def put_generations(self, rows: Iterable[tuple[str, str, str, GenParams, list[str], list[int]]]) -> None:
        """rows of (key, model, rendered prompt, params, outputs, n_tokens), committed as one transaction."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO generations(key, model, prompt, params, outputs, n_tokens, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (k, m, p, json.dumps(g.key(), sort_keys=True), json.dumps(o, ensure_ascii=False), json.dumps(t), now)
                    for k, m, p, g, o, t in rows
                ],
            )
            failpoint("store.put_generations")

    def generation_rows(self, model: str | None = None) -> list[tuple[str, str, str, str, str, str]]:
        """Every cached generation as stored (key, model, prompt, params JSON, outputs JSON, n_tokens JSON), or only
        those of one model fingerprint: what a remote worker ships back to the driver, which alone writes the
        study's store, and what studies share through $COMPTRUST_HOME (comptrust.study.reuse)."""
        q = "SELECT key, model, prompt, params, outputs, n_tokens FROM generations"
        if model is None:
            return list(self.db.execute(q))
        return list(self.db.execute(q + " WHERE model = ?", (model,)))

    @_guard_writes
    def put_generation_rows(self, rows: Sequence[tuple[str, str, str, str, str, str]]) -> None:
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO generations(key, model, prompt, params, outputs, n_tokens, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*r, now) for r in rows],
            )

    def count_generations(self, model: str | None = None) -> int:
        if model is None:
            return self.db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM generations WHERE model = ?", (model,)).fetchone()[0]

    # -- scores ----------------------------------------------------------------------------------------------
    @_guard_writes
    def put_score(self, model: str, perspective: str, options: dict[str, Any], score: dict[str, Any]) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO scores(model, perspective, options, score, created) VALUES (?, ?, ?, ?, ?)",
                (model, perspective, json.dumps(options, sort_keys=True), json.dumps(score), time.time()),
            )

    def latest_scores(self, model: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT model, perspective, options, score FROM scores"
        args: tuple = ()
        if model:
            q += " WHERE model = ?"
            args = (model,)
        q += " ORDER BY id"
        latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        for m, p, o, s in self.db.execute(q, args):
            latest[(m, p, o)] = {"model": m, "perspective": p, "options": json.loads(o), "score": json.loads(s)}
        return list(latest.values())

    # -- study units: one row per finished (done or failed) unit of work, written in one transaction -------------
    @_guard_writes
    def put_unit(
        self, unit_id: str, kind: str, status: str, result: dict[str, Any], seconds: float, error: str | None = None
    ) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO units(id, kind, status, result, error, seconds, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (unit_id, kind, status, json.dumps(result, ensure_ascii=False, default=str),
                 redact(error) if error else error, seconds, time.time()),
            )
            failpoint("store.put_unit")

    def units(self, with_results: bool = True) -> dict[str, dict[str, Any]]:
        """unit id -> {kind, status, error, seconds, result?}."""
        cols = "id, kind, status, error, seconds" + (", result" if with_results else "")
        out: dict[str, dict[str, Any]] = {}
        for row in self.db.execute(f"SELECT {cols} FROM units ORDER BY created"):
            # redacted on the way out too: a store written before errors were redacted may hold a secret
            d = {"kind": row[1], "status": row[2], "error": redact(row[3]) if row[3] else row[3], "seconds": row[4]}
            if with_results:
                d["result"] = self._unit_result(row[0], d, row[5])
            out[row[0]] = d
        return out

    _REQUIRED = {"eval": ("fingerprint", "score"), "compress": ("fingerprint",)}

    def _unit_result(self, uid: str, d: dict[str, Any], text: str) -> dict[str, Any]:
        """A unit's stored result; one that is truncated, not an object or lacks what a done unit holds (an edited
        or damaged row) is presented as a failed unit with a one-line error, so that a rerun redoes it and the
        report shows it instead of failing on it."""
        try:
            res = json.loads(text)
        except ValueError:
            res, why = {}, "its stored result is damaged (truncated JSON)"
        else:
            need = self._REQUIRED.get(d["kind"], ()) if d["status"] == "done" else ()
            if not isinstance(res, dict):
                res, why = {}, f"its stored result is not an object ({type(res).__name__})"
            else:
                lacking = [k for k in need if k not in res]
                why = f"its stored result lacks {', '.join(lacking)}" if lacking else ""
        if why:
            d["status"], d["error"] = "failed", f"unit {uid}: {why}; rerun the study to redo it"
        return res

    # -- small caches (e.g. toxicity score per (scorer, text)) -------------------------------------------------
    def kv_get_many(self, ns: str, keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i in range(0, len(keys), 500):
            chunk = list(keys[i : i + 500])
            q = f"SELECT key, value FROM kv WHERE ns = ? AND key IN ({','.join('?' * len(chunk))})"
            for k, v in self.db.execute(q, [ns, *chunk]):
                out[k] = json.loads(v)
        return out

    @_guard_writes
    def kv_put_many(self, ns: str, items: dict[str, Any]) -> None:
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO kv(ns, key, value, created) VALUES (?, ?, ?, ?)",
                [(ns, k, json.dumps(v), now) for k, v in items.items()],
            )


# --- files beside the store: results written whole or not at all ---

STORE_NAME = "comptrust.sqlite"  # the store's file name in every --out folder


def _write_temp(path: Path, text: str) -> Path:
    """`text` in a new temp file beside `path`, fsynced. The name is unique (two processes writing the same
    file never share a temp: they did, and one's rename found the other's temp gone). A failed write removes
    its partial temp and raises OSError naming `path`."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(e, path) from None
        raise
    return tmp


def _write_error(e: OSError, path: Path) -> OSError:
    """The OSError of a failed write, naming the file (not the temp) and marked as a write for cli.main."""
    err = OSError(e.errno, e.strerror, str(path))
    err.comptrust_write = True  # type: ignore[attr-defined]
    return err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    write_atomic_many([(path, text)])


def write_atomic_many(files: Sequence[tuple[Path, str]]) -> None:
    """Replace several files as one step as far as a failure goes: every temp is written first, and only when
    all are complete are they renamed into place. A disk that fills up mid-way leaves the old files, all of
    them, and no temp; the OSError names the file that could not be written."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, text in files:
            temps.append((_write_temp(Path(path), text), Path(path)))
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in temps:
        try:
            tmp.replace(path)
        except OSError as e:
            for t, _ in temps:
                t.unlink(missing_ok=True)
            raise _write_error(e, path) from None
