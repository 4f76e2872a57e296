"""Hostile and unlucky inputs (issue 21): each case ends in one line, a bounded amount of memory and time, and
nothing stored is lost. The cases and their messages are catalogued in docs/errors.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comptrust.errors import UsageError
from comptrust.study.spec import load_spec


def _spec_error(tmp_path: Path, text: str) -> str:
    f = tmp_path / "study.yaml"
    f.write_text(text)
    with pytest.raises(UsageError) as e:
        load_spec(f)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- study files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, why", [
    ("../../escaped", "contains '/'"),
    ("/abs", "contains '/'"),
    ("a\\\\b", "contains '\\\\'"),
    (".", "is a relative folder reference"),
    ("..", "is a relative folder reference"),
    ("''", "is empty"),
    ("' '", "is empty"),
    (".hidden", "starts with '.'"),
    ("'a:b'", "contains ':'"),
])
def test_variant_names_must_be_one_safe_folder_name(tmp_path, name, why):
    msg = _spec_error(tmp_path, f"variants:\n  - dense\n  - {{method: gptq, bits: 4, name: {name}}}\n")
    assert msg.startswith(f"{tmp_path / 'study.yaml'}:3: variants[1]: the name "), msg
    assert why in msg, msg


def test_checkpoint_dir_refuses_an_instance_outside_the_models_folder(tmp_path):
    from comptrust.study.units import checkpoint_dir

    assert checkpoint_dir(tmp_path, "gptq-w4@s0") == tmp_path / "models" / "gptq-w4@s0"
    for bad in ("../../escaped@s0", "..", "/etc@s0", ""):
        with pytest.raises(UsageError, match="refusing to write its checkpoint outside"):
            checkpoint_dir(tmp_path, bad)


def test_a_compressed_variant_named_dense_is_refused(tmp_path):
    msg = _spec_error(tmp_path, "variants:\n  - {method: gptq, bits: 4, name: dense}\n")
    assert msg == (f"{tmp_path / 'study.yaml'}:2: variants[0]: the name 'dense' is reserved for the dense "
                   "baseline; give this gptq variant another name")


@pytest.mark.parametrize("value, got", [("[[mmlu]]", "['mmlu']"), ("[{a: 1}]", "{'a': 1}")])
def test_perspective_entries_that_are_not_names(tmp_path, value, got):
    msg = _spec_error(tmp_path, f"perspectives: {value}\n")
    assert msg.startswith(f"{tmp_path / 'study.yaml'}:1: perspectives[0]: expected a perspective name, got {got}")


def test_duplicate_keys_are_refused(tmp_path):
    msg = _spec_error(tmp_path, "variants: [dense]\nlimit: 2\nvariants: [{method: gptq, bits: 4}]\n")
    assert msg == (f"{tmp_path / 'study.yaml'}:3: duplicate key 'variants' (first on line 1); a key may appear once "
                   "in a mapping")
    msg = _spec_error(tmp_path, "variants:\n  - {method: gptq, bits: 4, bits: 8}\n")
    assert "duplicate key 'bits'" in msg and msg.startswith(f"{tmp_path / 'study.yaml'}:2:")


def test_merge_keys_still_work_and_may_be_overridden(tmp_path):
    f = tmp_path / "study.yaml"
    f.write_text("variants:\n  - &b {method: gptq, bits: 4, group_size: 64}\n  - {<<: *b, bits: 3, name: g3}\n")
    spec = load_spec(f)
    assert [(v.name, v.settings) for v in spec.variants if not v.is_dense] == [
        ("gptq-w4-g64", {"bits": 4, "group_size": 64}), ("g3", {"bits": 3, "group_size": 64})]


def _bomb(levels: int = 9) -> str:
    """A "billion laughs" study: 9 levels of 9 aliases, 9^9 leaves when expanded."""
    names = "abcdefghijklmnop"
    rows = ["      - &a [" + ", ".join(["lol"] * 9) + "]"]
    for i in range(1, levels):
        rows.append(f"      - &{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]")
    return "perspectives: [ethics]\nvariants:\n  - method: gptq\n    bits: 4\n    calibration:\n" + "\n".join(rows) + "\n"


@pytest.mark.parametrize("tail", ["", "model: *i\n", "perspectives2: *i\n"])
def test_yaml_alias_bomb_is_refused_quickly(tmp_path, tail):
    """Before the fix the line map followed every alias (4.4 GB, no end in sight); a subprocess with a time and
    memory limit, so that a regression fails instead of hanging the suite."""
    text = _bomb()
    if tail:
        text = text.replace("perspectives: [ethics]\n", "") + tail.replace("perspectives2", "perspectives")
    f = tmp_path / "study.yaml"
    f.write_text(text)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30));"
            "from comptrust.study.spec import load_spec\n"
            "try:\n load_spec(sys.argv[1])\nexcept Exception as e:\n print(type(e).__name__, e)")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the alias bomb did not finish within 60 s")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("UsageError"), p.stdout[:500]
    assert len(p.stdout) < 600 and time.time() - t0 < 30


# -- served models ---------------------------------------------------------------------------------------------
import socket  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from comptrust.errors import RuntimeFailure, redact  # noqa: E402
from comptrust.types import GenParams, Prompt  # noqa: E402

SECRET = "sk-hostile-0123456789abcdef-SECRET"


class _Server:
    """A served model that misbehaves as told: mode 'echo' (500 whose body echoes the request headers),
    'other-id' (answers naming another model), 'big-models' (a 100 MB /models reply, sent lazily)."""

    def __init__(self, mode: str):
        srv = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status: int, payload: bytes, length: int | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload) if length is None else length))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                if mode == "big-models":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()  # no length: close-delimited, 100 MB if read whole
                    try:
                        self.wfile.write(b'{"data": [' + b'{"id": "x"},' * 10)
                        for _ in range(100):
                            self.wfile.write(b" " * (1 << 20))
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                self._send(200, json.dumps({"data": [{"id": "smol"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if mode == "echo":
                    echo = {"error": {"message": f"bad request, headers were {dict(self.headers)}"}}
                    return self._send(500, json.dumps(echo).encode())
                reply = {"model": "someone-else", "choices": [{"index": 0, "message": {"content": "hi"}}],
                         "usage": {"completion_tokens": 1}}
                self._send(200, json.dumps(reply).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _prompt() -> Prompt:
    from comptrust.types import Message

    return Prompt(messages=(Message("user", "hello"),), params=GenParams(max_new_tokens=4))


def test_redact_covers_keys_headers_and_urls(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    text = (f"HTTP 500 {{'Authorization': 'Bearer {SECRET}', 'x-api-key': 'abc123456789'}} "
            "http://me:hunter2pass@host/v1?api_key=zz9 hf_abcdefghijklmnopqrstuvwx")
    out = redact(text)
    for secret in (SECRET, "abc123456789", "hunter2pass", "zz9", "hf_abcdefghijklmnopqrstuvwx"):
        assert secret not in out, out
    assert out.startswith("HTTP 500 {'Authorization': '[redacted]'")


def test_a_server_echoing_the_api_key_never_gets_it_printed_or_stored(tmp_path, monkeypatch):
    from comptrust.engine.cached import CachedEngine
    from comptrust.engine.openai_engine import OpenAIEngine
    from comptrust.store import Store

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    srv = _Server("echo")
    try:
        eng = OpenAIEngine(srv.url, "smol", max_retries=0, backoff=0.01)
        with Store(tmp_path / "s.sqlite") as st, pytest.raises(RuntimeFailure) as e:
            CachedEngine(eng, st).generate([_prompt()])
    finally:
        srv.close()
    msg = str(e.value)
    assert "headers were" in msg and SECRET not in msg and "[redacted]" in msg, msg
    # the study records the error of a failed unit: redacted on the way in, and on the way out for old rows
    from comptrust.study.units import _one_line

    with Store(tmp_path / "s.sqlite") as st:
        st.put_unit("eval:dense:ethics", "eval", "failed", {"fingerprint": "x"}, 1.0, _one_line(e.value))
        st.db.execute("INSERT INTO units VALUES ('old', 'eval', 'failed', '{}', ?, 1, 0)", (f"Bearer {SECRET}",))
        st.db.commit()
        units = st.units()
    raw = (tmp_path / "s.sqlite").read_bytes()
    assert SECRET.encode() not in raw.replace(f"Bearer {SECRET}".encode(), b"")  # only the old row holds it
    assert all(SECRET not in (u["error"] or "") for u in units.values())


def test_cli_errors_are_one_line_and_redacted(monkeypatch, capsys):
    from comptrust import cli

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    def boom(*a, **k):
        raise RuntimeFailure(f"first line\nsecond line with Bearer {SECRET}\n\tthird")

    monkeypatch.setattr(cli, "_check_environment", boom)
    with pytest.raises(SystemExit) as e:
        cli.main(["perspectives"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: first line second line with Bearer [redacted] third"


def test_models_reply_that_drips_is_bounded_in_total():
    """One byte every 0.3 s: each read is within the 1 s timeout, the whole reply is not."""
    from comptrust.engine.openai_engine import OpenAIEngine

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            try:
                lsock.settimeout(0.2)
                c, _ = lsock.accept()
            except OSError:
                continue
            def one(c=c):
                try:
                    c.recv(65536)
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
                    while not stop.is_set():
                        c.sendall(b" ")
                        time.sleep(0.3)
                except OSError:
                    pass
                finally:
                    c.close()
            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=drip, daemon=True).start()
    try:
        eng = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "smol", timeout=1, max_retries=1, backoff=0.01)
        t0 = time.time()
        with pytest.raises(RuntimeFailure, match="no complete reply within 1 s"):
            eng.fingerprint  # noqa: B018
        assert time.time() - t0 < 10
    finally:
        stop.set()
        lsock.close()


def test_huge_models_reply_is_not_read_whole():
    import resource

    from comptrust.engine.openai_engine import MAX_MODELS_REPLY_BYTES, OpenAIEngine

    srv = _Server("big-models")
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        eng = OpenAIEngine(srv.url, "smol", timeout=20, max_retries=0)
        with pytest.raises(RuntimeFailure, match=f"larger than the {MAX_MODELS_REPLY_BYTES} bytes accepted"):
            eng.fingerprint  # noqa: B018
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 60, grown_mb
    finally:
        srv.close()


def test_reply_naming_another_model_is_warned_once(capsys):
    from comptrust.engine.openai_engine import OpenAIEngine

    srv = _Server("other-id")
    try:
        eng = OpenAIEngine(srv.url, "smol", max_retries=0)
        eng.generate([_prompt(), _prompt()])
    finally:
        srv.close()
    warnings = [l for l in capsys.readouterr().err.splitlines() if "answered as model" in l]
    assert warnings == [f"warning: {srv.url} answered as model 'someone-else', not 'smol' as asked; its answers "
                        "are stored as 'smol''s (check what the server runs)"]


# -- the store -------------------------------------------------------------------------------------------------
import sqlite3  # noqa: E402

from comptrust.store import SCHEMA_VERSION, Store  # noqa: E402


def test_locked_store_is_busy_after_a_bounded_wait_never_damaged(tmp_path, monkeypatch):
    path = tmp_path / "comptrust.sqlite"
    with Store(path) as st:
        st.put_unit("u", "eval", "done", {"fingerprint": "f", "score": {}}, 1.0)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-transaction (EXCLUSIVE also blocks WAL readers' writes)
    monkeypatch.setenv("COMPTRUST_STORE_WAIT", "0.5")
    try:
        t0 = time.time()
        with pytest.raises(RuntimeFailure) as e:
            Store(path)
        assert 0.4 < time.time() - t0 < 10
        msg = str(e.value)
        assert msg.startswith(f"the results database {path} is busy: another process holds a lock on it"), msg
        assert "damaged" not in msg and "move it away" not in msg and "nothing stored was lost" in msg
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with Store(path) as st:  # the lock is gone: everything is there
        assert st.units()["u"]["status"] == "done"


def test_busy_store_mid_run_is_reported_as_busy(tmp_path, monkeypatch):
    path = tmp_path / "comptrust.sqlite"
    monkeypatch.setenv("COMPTRUST_STORE_WAIT", "0.3")
    with Store(path) as st:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(RuntimeFailure, match="is busy: another process holds a lock"):
                st.kv_put_many("ns", {"a": 1})
        finally:
            holder.execute("ROLLBACK")
            holder.close()


def test_store_schema_is_checked_when_it_opens(tmp_path):
    newer = tmp_path / "newer.sqlite"
    with Store(newer) as st:
        st.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        st.db.commit()
    with pytest.raises(UsageError) as e:
        Store(newer)
    assert str(e.value) == (f"{newer} was written by a newer comptrust (store schema_version 99; this version reads "
                            f"{SCHEMA_VERSION}): upgrade comptrust to read it, or use another --out; the file is left "
                            "as it is")
    older = tmp_path / "older.sqlite"
    db = sqlite3.connect(older)
    db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                     "INSERT INTO meta VALUES ('schema_version', '0');"
                     "CREATE TABLE generations (key TEXT PRIMARY KEY, model TEXT, prompt TEXT, outputs TEXT);")
    db.close()
    with pytest.raises(UsageError) as e:
        Store(older)
    assert str(e.value).startswith(f"{older} was written by an older comptrust (store schema_version 0; generations "
                                   "lacks created, n_tokens, params) that this version cannot read: use another --out")


def test_another_programs_sqlite_is_not_a_results_database(tmp_path):
    path = tmp_path / "comptrust.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE generations (x)")
    db.commit()
    db.close()
    with pytest.raises(UsageError) as e:
        Store(path)
    assert str(e.value) == (f"{path} is not a comptrust results database (generations lacks created, key, model, "
                            "n_tokens, outputs, params, prompt)")


def test_readonly_open_never_writes(tmp_path):
    path = tmp_path / "comptrust.sqlite"
    with Store(path) as st:
        st.put_unit("u", "eval", "done", {"fingerprint": "f", "score": {}}, 1.0)
    for extra in ("-wal", "-shm"):
        assert not (tmp_path / f"comptrust.sqlite{extra}").exists()
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with Store(path, readonly=True) as st:
        assert set(st.units()) == {"u"}
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            st.db.execute("DELETE FROM units")
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    with pytest.raises(UsageError, match="does not exist"):
        Store(tmp_path / "nope.sqlite", readonly=True)
    assert not (tmp_path / "nope.sqlite").exists()


@pytest.mark.parametrize("stored, why", [('{"fingerprint": "f", "sco', "its stored result is damaged (truncated JSON)"),
                                         ("{}", "its stored result lacks fingerprint, score"),
                                         ("[1]", "its stored result is not an object (list)")])
def test_truncated_or_empty_unit_result_is_a_failed_unit(tmp_path, stored, why):
    path = tmp_path / "comptrust.sqlite"
    with Store(path) as st:
        st.db.execute("INSERT INTO units VALUES ('eval:dense:ethics', 'eval', 'done', ?, NULL, 1, 0)", (stored,))
        st.db.commit()
        u = st.units()["eval:dense:ethics"]
    assert u["status"] == "failed" and u["error"] == f"unit eval:dense:ethics: {why}; rerun the study to redo it"


def _study_dir(tmp_path: Path) -> Path:
    from comptrust.study.plan import SPEC_NAME
    from comptrust.study.spec import parse_spec

    d = tmp_path / "study"
    d.mkdir()
    spec = parse_spec({"perspectives": ["ethics"], "variants": ["dense"]}, "t")
    (d / SPEC_NAME).write_text(json.dumps(spec.to_dict()))
    return d


def test_report_without_a_store_refuses_and_keeps_the_old_report(tmp_path):
    from comptrust.study.runner import write_report

    d = _study_dir(tmp_path)
    for name in ("report.html", "results.csv", "results.json"):
        (d / name).write_text(f"the good {name}")
    with pytest.raises(UsageError) as e:
        write_report(d)
    assert str(e.value) == (f"{d} has no comptrust.sqlite: nothing to report from; report.html, results.csv and "
                            "results.json are left as they are")
    for name in ("report.html", "results.csv", "results.json"):
        assert (d / name).read_text() == f"the good {name}"
    assert not (d / "comptrust.sqlite").exists()


@pytest.mark.parametrize("stored", ['{"fingerprint": "f", "sco', "{}"])
def test_report_with_a_damaged_unit_shows_it_as_failed(tmp_path, stored):
    from comptrust.study.runner import write_report

    d = _study_dir(tmp_path)
    with Store(d / "comptrust.sqlite") as st:
        st.db.execute("INSERT INTO units VALUES ('eval:dense:ethics', 'eval', 'done', ?, NULL, 1, 0)", (stored,))
        st.db.commit()
    write_report(d)
    doc = json.loads((d / "results.json").read_text())
    row = next(u for u in doc["units"] if u["unit"] == "eval:dense:ethics")
    assert row["status"] == "failed" and "rerun the study to redo it" in row["error"]


# -- the output folder -------------------------------------------------------------------------------------------
_WRITER = """
import sys
from pathlib import Path
from comptrust.store import write_atomic
p = Path(sys.argv[1])
for i in range(300):
    write_atomic(p, sys.argv[2] * 2000 + str(i))
"""


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    """Every writer used <name>.tmp: one's rename found the other's temp gone (FileNotFoundError)."""
    target = tmp_path / "scores.json"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(target), c], stderr=subprocess.PIPE, text=True)
             for c in "ab"]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    text = target.read_text()
    assert text[:2000] in ("a" * 2000, "b" * 2000) and text[2000:].isdigit()  # one writer's whole file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]  # no temp left


_HOLDER = """
import sys, time
from pathlib import Path
from comptrust.evaluate import check_out_dir
check_out_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_on_one_out_folder_is_told_the_pid(tmp_path):
    from comptrust.evaluate import check_out_dir

    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeFailure) as e:
            check_out_dir(out)
        assert str(e.value) == (f"--out {out} is in use by pid {holder.pid} (another comptrust run writes there); "
                                "wait for it to finish or use another --out")
    finally:
        holder.kill()
        holder.wait()
    assert check_out_dir(out) == out  # the kernel dropped the dead holder's lock


_PAIR = """
import resource, signal, sys
from pathlib import Path
from comptrust.store import write_atomic_many
d = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    write_atomic_many([(d / "generations.jsonl", "new\\n" * 10), (d / "scores.json", "x" * 200_000)])
except OSError as e:
    print(e.filename, e.strerror)
"""


def test_disk_full_while_writing_the_pair_keeps_the_old_pair_and_no_temp(tmp_path):
    (tmp_path / "generations.jsonl").write_text("old\n")
    (tmp_path / "scores.json").write_text('{"old": true}')
    p = subprocess.run([sys.executable, "-c", _PAIR, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == f"{tmp_path / 'scores.json'} File too large", p.stdout + p.stderr
    assert (tmp_path / "generations.jsonl").read_text() == "old\n"  # not replaced: the pair stays consistent
    assert (tmp_path / "scores.json").read_text() == '{"old": true}'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["generations.jsonl", "scores.json"]


def test_stale_temps_of_killed_runs_are_removed(tmp_path):
    from comptrust.evaluate import check_out_dir

    old = [tmp_path / ".scores.json.abc123.tmp", tmp_path / "generations.jsonl.tmp"]
    for f in old:
        f.write_text("partial")
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    fresh = tmp_path / ".results.json.xyz.tmp"  # being written right now by someone (a report): kept
    fresh.write_text("partial")
    check_out_dir(tmp_path)
    assert not any(f.exists() for f in old) and fresh.exists()


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comptrust", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def _last(p: subprocess.CompletedProcess) -> str:
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def test_empty_out_is_refused(tmp_path):
    for args in (("--out", ""), ("-o", " "), ("--out=",)):
        p = _cli("evaluate", "-p", "ethics", *args, cwd=tmp_path)
        assert p.returncode == 2 and _last(p) == (
            "error: --out '': give a folder name (an empty one would write into the current folder)"), p.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5"])
def test_chunk_size_is_checked_up_front(value):
    p = _cli("perspectives", env={"COMPTRUST_CHUNK_SIZE": value})
    assert p.returncode == 2 and _last(p) == (
        f"error: COMPTRUST_CHUNK_SIZE={value!r}: expected a positive number of prompts per chunk"), p.stderr


def test_comptrust_home_that_is_a_file(tmp_path, monkeypatch):
    f = tmp_path / "home-file"
    f.write_text("x")
    p = _cli("model-info", env={"COMPTRUST_HOME": str(f)})
    assert p.returncode == 2 and _last(p) == (
        f"error: COMPTRUST_HOME={f}: not a folder (it is a file); point it at a folder for comptrust's caches")
    from comptrust.paths import home

    monkeypatch.setenv("COMPTRUST_HOME", str(f / "sub"))
    with pytest.raises(UsageError, match=f"COMPTRUST_HOME={f / 'sub'}: cannot create comptrust's cache folder there"):
        home()


# -- models comptrust loads besides --model: the toxicity scorer's hf:DIR ---------------------------------------
def test_hf_toxicity_scorer_dir_follows_the_model_rules(tmp_path, monkeypatch):
    """A pytorch_model.bin must never reach torch's unpickler; a folder that needs its own code is refused."""
    import builtins

    from tests.test_toxicity_scorers import tiny_classifier
    from comptrust.toxicity_scorers import get_scorer

    good = tiny_classifier(tmp_path / "good", {0: "non-toxic", 1: "toxic"})
    assert get_scorer(f"hf:{good}").score(["idiot"])[0] is not None  # the rules let a clean folder through
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in good.iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04payload that must not be opened")
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *a, **k):
        if str(file).endswith("pytorch_model.bin"):
            opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    with pytest.raises(UsageError) as e:
        get_scorer(f"hf:{pickled}")
    assert str(e.value) == (f"hf:{pickled}: {pickled} holds its weights only as PyTorch pickle files "
                            "(pytorch_model.bin), which comptrust does not load (unpickling can run code); convert "
                            "them to safetensors (model.safetensors) first")
    assert opened == []
    monkeypatch.setattr(builtins, "open", real_open)
    remote = tmp_path / "remote"
    remote.mkdir()
    for f in good.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.Cfg", "AutoModelForSequenceClassification": "evil.M"})
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UsageError, match=r"needs its own Python code \(auto_map in config.json\), which comptrust "
                                         r"never runs"):
        get_scorer(f"hf:{remote}")


# -- chat templates ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_tok():
    from transformers import AutoTokenizer

    from comptrust.models import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve(None).path))
    template, name = tok.chat_template, tok.name_or_path
    yield tok
    tok.chat_template, tok.name_or_path = template, name


@pytest.mark.model  # the embedded model's converted folder
def test_bounded_chat_template_renders_exactly_what_transformers_renders(embedded_tok):
    """Every mini-suite prompt: the sandboxed renderer's text is the text apply_chat_template gives (so no cache
    key changes)."""
    from comptrust import perspectives as registry
    from comptrust.data_sources import mini_dir, mmlu_dir
    from comptrust.engine.chat_template import render_chat
    from comptrust.evaluate import options_for
    from comptrust.perspectives.base import EvalOptions

    tok = embedded_tok
    opts = EvalOptions(data_dir=mini_dir(), limit=2, mmlu_dir=mmlu_dir(None, mini_dir()))
    n = 0
    for name in registry.REGISTRY:
        p = registry.get(name)
        for it in p.load(options_for(p, opts)).items:
            if it.prompt.raw is not None:
                continue
            msgs = [{"role": m.role, "content": m.content} for m in it.prompt.messages]
            assert render_chat(tok, msgs, "x") == tok.apply_chat_template(msgs, tokenize=False,
                                                                          add_generation_prompt=True)
            n += 1
    assert n > 20


@pytest.mark.model  # the embedded model's converted folder
@pytest.mark.parametrize("template, needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
     "was stopped: it needs more than 1,000,000 steps to render one prompt"),
    ("{% set s = 'ab' * 400000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}x",
     "was stopped: it needs more than"),
    ("{{ 'x' * 100000000 }}", "a repetition of more than 1,000,000 items"),
    ("{% set n = 100000 %}{{ 7 ** n }}", "an exponent above 64"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "tried something the sandbox forbids"),
    ("{{ messages.append(1) }}", "tried something the sandbox forbids"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "the chat template of m"),
    ("{{ raise_exception('no system role') }}", "failed: TemplateError: no system role"),
    ("{% for %}", "is malformed (line 1:"),
])
def test_hostile_chat_templates_end_in_one_line(template, needle, monkeypatch, embedded_tok):
    from comptrust.engine import chat_template
    from comptrust.engine.prompts import render_prompt
    from comptrust.types import Message

    monkeypatch.setattr(chat_template, "MAX_SECONDS", 3.0)
    tok = embedded_tok
    monkeypatch.setattr(tok, "chat_template", template)
    monkeypatch.setattr(tok, "name_or_path", "m")
    prompt = Prompt(messages=(Message("user", "hello"),), params=GenParams(max_new_tokens=4))
    t0 = time.time()
    with pytest.raises(UsageError) as e:
        render_prompt(tok, True, prompt)
    assert time.time() - t0 < 20
    msg = str(e.value)
    assert msg.startswith("the chat template of m ") and needle in msg and "\n" not in msg, msg


# -- model files ---------------------------------------------------------------------------------------------------
def crafted_gguf(path: Path, n: int = 4 << 20) -> Path:
    """A GGUF v3 whose one metadata entry is an n-element uint8 array (and no tensors)."""
    import struct

    key = b"general.crafted"
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1))
        f.write(struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, n))
        f.write(b"\x00" * n)
    return path


def test_crafted_gguf_with_a_huge_array_is_refused_before_it_is_read(tmp_path):
    """Before: 2 min and 2.9 GB until the one-line error; now the header walk refuses it in bounded memory."""
    f = crafted_gguf(tmp_path / "crafted.gguf")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "from pathlib import Path\nfrom comptrust.models.gguf_convert import inspect_gguf\n"
            "try:\n inspect_gguf(Path(sys.argv[1]))\nexcept Exception as e:\n print(type(e).__name__, e)\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")  # peak, kB
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    wall = time.time() - t0
    first, rss_kb = p.stdout.splitlines()[0], int(p.stdout.splitlines()[1])
    assert first == (f"UsageError GGUF file {f}: metadata array 'general.crafted' has 4,194,304 elements (at most "
                     "1,048,576); not a model file comptrust reads"), p.stdout + p.stderr
    assert rss_kb < 400_000 and wall < 60, (rss_kb, wall)


def test_embedded_gguf_passes_the_header_walk():
    from comptrust.models.gguf_convert import prescan_gguf
    from comptrust.models.resolve import embedded_gguf

    prescan_gguf(embedded_gguf())  # the bounds leave real models alone


@pytest.fixture
def model_dir(tmp_path):
    from comptrust.models import resolve

    src = Path(resolve(None).path)
    d = tmp_path / "m"
    d.mkdir()
    for f in src.iterdir():
        if f.name != "comptrust-model.json":
            (d / f.name).symlink_to(f)
    return d


@pytest.mark.model  # the embedded model's converted folder
@pytest.mark.parametrize("name", ["comptrust.json", "comptrust-model.json"])
@pytest.mark.parametrize("content, why", [(b"\xff\xfe{", "not UTF-8 text (byte 0); a comptrust record is JSON"),
                                          (b"[1, 2]", "expected a JSON object, got list")])
def test_bad_record_files_in_a_model_folder(model_dir, name, content, why):
    from comptrust.models import resolve

    (model_dir / name).write_bytes(content)
    with pytest.raises(UsageError) as e:
        resolve(str(model_dir))
    assert str(e.value) == f"{model_dir / name}: {why}"


# -- prompts longer than the model's context -----------------------------------------------------------------------
class _WordEngine:
    """A scripted engine whose 'tokens' are words, with a context of 64 positions (config.json beside it)."""

    def __init__(self, d: Path, context: int = 64):
        from types import SimpleNamespace

        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"max_position_embeddings": context}))
        self.resolved = SimpleNamespace(path=d)
        self.fingerprint = "words"

    def render(self, prompt):
        return prompt.raw if prompt.raw is not None else json.dumps([[m.role, m.content] for m in prompt.messages])

    def encode(self, prompt):
        return self.render(prompt).split()

    def generate(self, prompts, progress=None):
        from comptrust.engine.base import Generation

        out = [Generation(("yes",) * p.params.n, (1,) * p.params.n) for p in prompts]
        if progress:
            progress(len(prompts), len(prompts))
        return out


def test_prompts_beyond_the_context_are_said_in_a_warning_and_in_scores_json(tmp_path, capsys):
    from comptrust.data_sources import mini_dir, mmlu_dir
    from comptrust.evaluate import evaluate
    from comptrust.perspectives.base import EvalOptions

    opts = EvalOptions(data_dir=mini_dir(), limit=2, mmlu_dir=mmlu_dir(None, mini_dir()))
    eng = _WordEngine(tmp_path / "model", context=64)
    evaluate(eng, {"name": "words"}, ["mmlu"], opts, tmp_path / "o", progress=False)
    err = capsys.readouterr().err
    notes = json.loads((tmp_path / "o" / "scores.json").read_text())["perspectives"]["mmlu"]["notes"]
    note = next(n for n in notes if "do not fit the model's context of 64 tokens" in n)
    assert f"warning: mmlu: {note}" in err.splitlines()
    assert "evaluated untruncated as the protocol says" in note
    roomy = _WordEngine(tmp_path / "roomy", context=100_000)  # everything fits: no note
    evaluate(roomy, {"name": "words"}, ["mmlu"], opts, tmp_path / "o2", progress=False)
    notes = json.loads((tmp_path / "o2" / "scores.json").read_text())["perspectives"]["mmlu"]["notes"]
    assert not any("do not fit" in n for n in notes), notes


# -- data files ----------------------------------------------------------------------------------------------------
def test_a_one_line_jsonl_of_many_megabytes_is_one_line_error(tmp_path):
    from comptrust.perspectives.base import MAX_JSONL_LINE, read_jsonl

    f = tmp_path / "big.jsonl"
    with open(f, "w") as out:
        out.write('{"text": "')
        for _ in range(MAX_JSONL_LINE // (1 << 20) + 2):
            out.write("x" * (1 << 20))
    with pytest.raises(UsageError) as e:
        list(read_jsonl(f))
    assert str(e.value) == f"{f}:1: a line longer than {MAX_JSONL_LINE:,} characters; not one JSON record per line"


def test_utf8_bom_in_an_mmlu_csv_is_stripped(tmp_path):
    from comptrust.perspectives.mmlu import read_csv_rows

    f = tmp_path / "x_test.csv"
    f.write_bytes("\ufeffWhat is 1+1?,1,2,3,4,B\nAnd 2+2?,4,5,6,7,A\n".encode("utf-8"))
    rows = read_csv_rows(f)
    assert [r[1][0] for r in rows] == ["What is 1+1?", "And 2+2?"]


def test_a_data_file_that_is_a_folder_is_bad_input_not_a_write_failure(tmp_path, mmlu_data):
    mm = tmp_path / "mmlu"
    (mm / "dev").mkdir(parents=True)
    (mm / "test").mkdir()
    subject = sorted(p.name[: -len("_dev.csv")] for p in (mmlu_data / "dev").glob("*_dev.csv"))[0]
    (mm / "dev" / f"{subject}_dev.csv").write_bytes((mmlu_data / "dev" / f"{subject}_dev.csv").read_bytes())
    (mm / "test" / f"{subject}_test.csv").mkdir()  # a folder where the test CSV should be
    empty_dt = tmp_path / "dt"
    empty_dt.mkdir()
    p = _cli("evaluate", "-p", "mmlu", "--suite", "dt", "--data-dir", str(empty_dt), "--mmlu-dir", str(mm),
             "--limit", "1", "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 2, p.stderr[-2000:]
    assert _last(p) == f"error: {mm / 'test' / f'{subject}_test.csv'} is a folder where a file was expected"


# -- report charts -----------------------------------------------------------------------------------------------
def test_variant_names_with_matplotlib_math_are_drawn_as_text():
    from comptrust.report import charts

    name = "w4$\\frac{x$"
    svg = charts.radar(["ethics", "mmlu", "toxicity"], {"dense": [50.0, 40.0, 30.0], name: [45.0, 41.0, 20.0]},
                       "dense")
    assert "w4$\\frac{x$" in svg  # the name as written, not parsed as TeX (which raised)
    svg = charts.delta_heatmap([name], ["ethics", "mmlu"], [[-1.0, 2.0]], [["*", ""]])
    assert "w4$\\frac{x$" in svg


# -- signals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, ignored, code, line", [
    ("SIGTERM", False, 143, "terminated (SIGTERM): finished work is saved; rerun the same command to resume"),
    # started as a background job of a script: SIGINT ignored on entry, which Python keeps (it installs its
    # KeyboardInterrupt handler only over SIG_DFL); before cli.main installed its own handler, this run ignored
    # the Ctrl-C and ran on to exit 0 (issue 21's swallowed Ctrl-C)
    ("SIGINT", True, 130, "interrupted: finished work is saved; rerun the same command to resume"),
])
def test_sigterm_and_ctrl_c_end_the_run_in_one_line(tmp_path, sig, ignored, code, line):
    """A served model that takes its time: SIGTERM while the request is out ends the run like Ctrl-C; Ctrl-C does
    so even in a process that inherited SIGINT as ignored."""
    import signal

    def setup() -> None:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    got_post = threading.Event()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"data": [{"id": "smol"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            got_post.set()
            time.sleep(2)
            self.send_response(500)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        proc = subprocess.Popen([sys.executable, "-m", "comptrust", "evaluate", "-m", f"openai:{url}#smol", "-p",
                                 "ethics", "--limit", "1", "--out", str(tmp_path / "o"), "--no-progress"],
                                stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=setup)
        assert got_post.wait(120), "no request reached the server"
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == code, err[-2000:]
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines[-1] == line, err[-2000:]
    assert "Traceback" not in err


def test_a_swallowed_ctrl_c_during_compression_still_stops_the_study(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside a finalizer or a library's callback is printed as "Exception ignored"
    and lost: the study then recorded the checkpoint and ran on to exit 0. The CLI's handler also sets
    errors.INTERRUPTED, which the runner checks when the compression returns."""
    from comptrust.errors import INTERRUPTED
    from comptrust.study import runner
    from comptrust.study.spec import parse_spec

    spec = parse_spec({"perspectives": ["ethics"], "variants": ["dense", {"method": "magnitude", "structure": "2:4"}]},
                      "t")
    evaluated: list[str] = []

    def fake_eval(spec, model_ref, names, *a, **k):
        evaluated.append(str(model_ref))
        raise RuntimeFailure("not evaluated in this test")

    def swallowed(spec, v, seed, ckpt):
        try:  # what a finalizer does with the interrupt: the handler ran, the exception is lost
            INTERRUPTED.set()
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        return {"config": "made"}

    monkeypatch.setattr(runner, "evaluate_model", fake_eval)
    monkeypatch.setattr(runner, "compress_checkpoint", swallowed)
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_study(spec, tmp_path / "s", progress=False)
    finally:
        INTERRUPTED.clear()
    with Store(tmp_path / "s" / "comptrust.sqlite") as st:
        units = st.units()
    assert "compress:magnitude-2of4@s0" not in units  # not recorded as done: a rerun compresses again
    assert len(evaluated) == 1  # dense only: the compressed model was never evaluated


def _can_mount_readonly() -> bool:
    import shutil as _sh

    if not _sh.which("unshare"):
        return False
    p = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return p.returncode == 0


@pytest.mark.skipif(not _can_mount_readonly(), reason="needs unshare -m (a private read-only bind mount)")
def test_study_status_works_on_read_only_media(tmp_path):
    d = _study_dir(tmp_path)
    with Store(d / "comptrust.sqlite") as st:
        st.put_unit("eval:dense:ethics", "failed", "failed", {"fingerprint": "x"}, 2.0, "boom")
    script = (f"mount --bind {d} {d} && mount -o remount,bind,ro {d} && touch {d}/probe 2>/dev/null && exit 99; "
              f"exec {sys.executable} -m comptrust study --status {d}")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "eval:dense:ethics" in p.stdout and "failed" in p.stdout and "boom" in p.stdout


@pytest.mark.model
def test_a_truncated_cached_model_record_is_converted_again(tmp_path, monkeypatch):
    """$COMPTRUST_HOME/models/gguf-*/comptrust-model.json cut short (or without its fingerprint) used to be a
    JSONDecodeError / KeyError traceback on every run; the conversion is now redone."""
    from comptrust.models import gguf_convert
    from comptrust.models.fingerprint import file_sha256
    from comptrust.models.resolve import embedded_gguf

    monkeypatch.setenv("COMPTRUST_HOME", str(tmp_path / "home"))
    src = embedded_gguf()
    fp = file_sha256(src)
    for broken in ('{"fingerprint": "ab', '{"source": "x"}'):
        out = gguf_convert.models_cache() / f"gguf-{fp[:24]}"
        out.mkdir(parents=True, exist_ok=True)
        (out / gguf_convert.META_NAME).write_text(broken)
        hf_dir, got_fp, meta = gguf_convert.convert(src)
        assert got_fp == fp and meta["fingerprint"] == fp and (hf_dir / "model.safetensors").is_file()
        assert json.loads((hf_dir / gguf_convert.META_NAME).read_text())["fingerprint"] == fp


def test_store_wait_is_checked_up_front():
    p = _cli("perspectives", env={"COMPTRUST_STORE_WAIT": "soon"})
    assert p.returncode == 2 and _last(p) == "error: COMPTRUST_STORE_WAIT='soon': expected seconds between 0 and 86400"


def _reader_summary(path: Path) -> dict:
    """What inspect_gguf reported when it read headers with the gguf library's GGUFReader."""
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def field(name):
        fld = r.fields.get(name)
        return None if fld is None else fld.contents()

    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "tensor_types": dict(Counter(t.tensor_type.name for t in r.tensors)), "n_tensors": len(r.tensors),
            "tensor_bytes": sum(int(t.n_bytes) for t in r.tensors)}


def test_header_walk_reports_what_the_gguf_library_reads(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from comptrust.models.gguf_convert import inspect_gguf

    f = tmp_path / "w.gguf"
    w = GGUFWriter(str(f), "llama")
    w.add_name("tiny test")
    w.add_token_list(["<s>", "a", "bb", "ccc"])
    w.add_array("test.ints", [1, 2, 3])
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f", 0.5)
    w.add_tensor("a.weight", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("b.weight", np.ones((3,), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert inspect_gguf(f) == _reader_summary(f)
    from comptrust.models.resolve import embedded_gguf

    assert inspect_gguf(embedded_gguf()) == _reader_summary(embedded_gguf())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f.read_bytes()[:-40])  # into the last tensor (the writer pads the end to 32 bytes)
    with pytest.raises(UsageError, match=f"truncated GGUF file {cut}: tensors end at byte"):
        inspect_gguf(cut)


def test_the_python_api_gives_the_out_lock_back(tmp_path):
    """A notebook's kernel outlives an evaluation: after the call another process may write the folder."""
    from comptrust.evaluate import check_out_dir, release_out_dir

    out = tmp_path / "o"
    check_out_dir(out)
    release_out_dir(out)
    p = subprocess.run([sys.executable, "-c", _HOLDER.replace("time.sleep(60)", ""), str(out)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "locked", p.stderr[-2000:]
