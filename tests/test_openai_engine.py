"""OpenAIEngine against real HTTP servers on 127.0.0.1: a scripted stdlib fake for the error paths, and
llama-cpp-python's server running the embedded SmolLM2 GGUF (skipped where llama-cpp-python is not installed)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from comptrust.engine.cached import CachedEngine
from comptrust.engine.openai_engine import (
    GenerationFailed,
    OpenAIEngine,
    parse_openai_spec,
)
from comptrust.errors import RuntimeFailure, UsageError
from comptrust.store import Store
from comptrust.types import GenParams, Prompt

GREEDY = GenParams(max_new_tokens=8)
SECRET = "sk-test-DO-NOT-STORE-7f3a9c"


# -- a scripted fake server ------------------------------------------------------------------------------------
class Fake:
    """POST replies follow `script` (one action per request, then "ok"): an int status, "malformed", "truncated",
    "nochoices". "ok" answers with min(n, choices) choices whose text names the prompt, the seed and the index."""

    def __init__(self, models=("smol",), choices=99, usage=True):
        self.models = list(models)
        self.choices = choices
        self.usage = usage
        self.script: list = []
        self.requests: list[tuple[str, str, dict, dict]] = []  # (method, path, headers, body)
        self.lock = threading.Lock()
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, payload: bytes, extra=None, length=None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload) if length is None else length))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                with fake.lock:
                    fake.requests.append(("GET", self.path, dict(self.headers), {}))
                if self.path == "/v1/models":
                    data = [{"id": m, "object": "model"} for m in fake.models]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._send(404, b'{"detail": "Not Found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(("POST", self.path, dict(self.headers), body))
                    action = fake.script.pop(0) if fake.script else "ok"
                if isinstance(action, int):
                    extra = {"Retry-After": "0"} if action == 429 else None
                    msg = "model not found" if action == 404 else f"scripted {action}"
                    return self._send(action, json.dumps({"error": {"message": msg}}).encode(), extra)
                if action == "malformed":
                    return self._send(200, b'{"choices": [ {"text": "oops"')
                if action == "truncated":
                    self._send(200, b'{"choices": []', length=500)
                    self.close_connection = True
                    return
                if action == "nochoices":
                    return self._send(200, b'{"object": "text_completion"}')
                if self.path not in ("/v1/chat/completions", "/v1/completions"):
                    return self._send(404, b'{"detail": "Not Found"}')
                k = min(body.get("n", 1), fake.choices)
                chat = self.path.endswith("chat/completions")
                what = body["messages"][-1]["content"] if chat else body["prompt"]
                choices = []
                for i in range(k):
                    text = f"{what}|seed={body.get('seed')}|i={i}|t={body.get('temperature')}"
                    c = {"index": i, "finish_reason": "length"}
                    c.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                    choices.append(c)
                reply = {"object": "chat.completion" if chat else "text_completion", "choices": choices}
                if fake.usage:
                    reply["usage"] = {"completion_tokens": 5 * k, "prompt_tokens": 3}
                self._send(200, json.dumps(reply).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def posts(self):
        return [r for r in self.requests if r[0] == "POST"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = Fake()
    yield f
    f.close()


def engine_for(fake: Fake, name="smol", **kw) -> OpenAIEngine:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_retries", 3)
    kw.setdefault("timeout", 10)
    return OpenAIEngine(fake.url, name, **kw)


def chat(text: str, params: GenParams = GREEDY) -> Prompt:
    return Prompt.chat(("user", text), params=params)


def one_line(e: BaseException) -> str:
    s = str(e)
    assert "\n" not in s, s
    return s


# -- spec -----------------------------------------------------------------------------------------------------
def test_parse_openai_spec():
    assert parse_openai_spec("openai:http://127.0.0.1:8080/v1#smollm2") == ("http://127.0.0.1:8080/v1", "smollm2")
    assert parse_openai_spec("openai:https://h.example/v1/#org/model:tag") == ("https://h.example/v1", "org/model:tag")
    for bad in ("http://x/v1#m", "openai:http://x/v1", "openai:http://x/v1#", "openai:ftp://x#m", "openai:#m",
                "openai:http://x:99999/v1#m", "openai:localhost:8080#m"):
        with pytest.raises(UsageError) as e:
            parse_openai_spec(bad)
        one_line(e.value)


# -- requests ---------------------------------------------------------------------------------------------------
def test_chat_and_raw_requests(fake):
    eng = engine_for(fake)
    sampled = GenParams(max_new_tokens=7, temperature=0.7, top_p=0.9, n=1, seed=11)
    gens = eng.generate([chat("hello"), Prompt(raw="Q: 2+2=", params=sampled)])
    posts = {r[1]: r[3] for r in fake.posts()}
    c = posts["/v1/chat/completions"]
    assert c["messages"] == [{"role": "user", "content": "hello"}]
    assert (c["model"], c["max_tokens"], c["temperature"], c["top_p"], c["n"], c["seed"]) == ("smol", 8, 0.0, 1.0, 1, 0)
    r = posts["/v1/completions"]
    assert (r["prompt"], r["max_tokens"], r["temperature"], r["top_p"], r["seed"]) == ("Q: 2+2=", 7, 0.7, 0.9, 11)
    assert gens[0].texts == ("hello|seed=0|i=0|t=0.0",) and gens[0].n_tokens == (5,)
    assert gens[1].texts == ("Q: 2+2=|seed=11|i=0|t=0.7",)
    # render: canonical JSON of the request, distinct for chat and raw
    assert json.loads(eng.render(chat("hello"))) == {"endpoint": "/chat/completions", "messages": [{"role": "user", "content": "hello"}]}
    assert eng.render(Prompt(raw="x")) != eng.render(chat("x"))
    assert eng.fingerprint == f"openai:{fake.url}#smol:smol"


def test_retries_after_429_500_malformed_truncated(fake):
    fake.script = [429, 500, "malformed", "truncated", "nochoices"]
    eng = engine_for(fake, max_retries=5)
    progress = []
    gens = eng.generate([chat("a")], progress=lambda n, t: progress.append((n, t)))
    assert gens[0].texts == ("a|seed=0|i=0|t=0.0",)
    assert len(fake.posts()) == 6 and eng.counters["retries"] == 5
    assert progress == [(1, 5)]


def test_persistent_errors_fail_with_a_counted_one_line_error(fake):
    fake.script = [503] * 50
    eng = engine_for(fake, max_retries=2, concurrency=1)
    with pytest.raises(GenerationFailed) as e:
        eng.generate([chat("a"), chat("b"), chat("c")])
    msg = one_line(e.value)
    assert isinstance(e.value, RuntimeFailure)
    assert msg.startswith("1 of 3 requests to " + fake.url + " failed") and "HTTP 503" in msg and "after 2 retries" in msg
    assert "2 more not sent" in msg and e.value.partial == [None, None, None]
    assert len(fake.posts()) == 3  # 1 try + 2 retries, then nothing else is sent


def test_client_error_is_not_retried(fake):
    fake.script = [400]
    eng = engine_for(fake, concurrency=1)
    with pytest.raises(GenerationFailed, match="HTTP 400 scripted 400") as e:
        eng.generate([chat("a"), chat("b")])
    one_line(e.value)
    assert len(fake.posts()) == 1


def test_partial_results_are_kept_by_the_failure(fake):
    fake.script = ["ok", 500, 500]
    eng = engine_for(fake, max_retries=1, concurrency=1)
    with pytest.raises(GenerationFailed) as e:
        eng.generate([chat("a"), chat("b")])
    assert e.value.partial[0].texts == ("a|seed=0|i=0|t=0.0",) and e.value.partial[1] is None


def test_cached_engine_commits_the_partial_results_of_a_failed_chunk(fake, tmp_path):
    """A chunk that fails part-way keeps what finished: the rerun asks the server only for the rest."""
    fake.script = ["ok", 500, 500]
    eng = engine_for(fake, max_retries=1, concurrency=1)
    with Store(tmp_path / "c.sqlite") as st:
        cached = CachedEngine(eng, st, chunk_size=8)
        with pytest.raises(GenerationFailed):
            cached.generate([chat("a"), chat("b")])
        assert st.count_generations(eng.fingerprint) == 1
        before = len(fake.posts())
        gens = cached.generate([chat("a"), chat("b")])
        assert [g.cached for g in gens] == [True, False]
        assert len(fake.posts()) == before + 1


def test_cli_evaluates_a_served_model(fake, tmp_path):
    """comptrust evaluate -m openai:URL#NAME, end to end through the CLI (a real process, a real HTTP server)."""
    import subprocess
    import sys

    out = tmp_path / "served"
    p = subprocess.run(
        [sys.executable, "-m", "comptrust", "evaluate", "-m", f"openai:{fake.url}#smol", "-p", "ethics",
         "--limit", "1", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["model"]["engine"] == "openai" and scores["model"]["spec"] == f"openai:{fake.url}#smol"
    assert "ethics" in scores["perspectives"]
    assert fake.posts() and all(r[1] == "/v1/chat/completions" for r in fake.posts())
    bad = subprocess.run(
        [sys.executable, "-m", "comptrust", "evaluate", "-m", f"openai:{fake.url}#nosuch", "-p", "ethics",
         "--limit", "1", "--out", str(tmp_path / "bad"), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    # stage lines ("[comptrust] resolving model ...") may come first; the error is one line, and the last
    errors = [x for x in bad.stderr.splitlines() if not x.startswith("[comptrust] ")]
    assert bad.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: ") and "nosuch" in errors[0], \
        bad.stderr
    assert bad.stderr.splitlines()[-1] == errors[0]


def test_unreachable_endpoint():
    from comptrust.engine.llamacpp import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    eng = OpenAIEngine(url, "m", max_retries=1, backoff=0.01, timeout=5)
    t0 = time.time()
    with pytest.raises(RuntimeFailure) as e:
        eng.generate([chat("a")])
    msg = one_line(e.value)
    assert url in msg and "refused" in msg.lower() and time.time() - t0 < 5


def test_wrong_model_name_lists_served_ids():
    f = Fake(models=("alpha", "beta"))
    try:
        with pytest.raises(UsageError) as e:
            engine_for(f, "gamma").fingerprint  # noqa: B018
        msg = one_line(e.value)
        assert "'gamma'" in msg and "alpha, beta" in msg and f.url in msg
        assert not f.posts()
    finally:
        f.close()


def test_models_endpoint_failure_is_named(fake):
    with pytest.raises(RuntimeFailure) as e:
        OpenAIEngine(fake.url.removesuffix("/v1"), "smol", max_retries=0).generate([chat("a")])
    msg = one_line(e.value)
    assert "cannot list the served models" in msg and "/models: HTTP 404" in msg


def test_model_not_found_reply_when_models_are_unlisted():
    f = Fake(models=())
    try:
        f.script = [404]
        eng = engine_for(f, "gamma")
        assert eng.fingerprint.endswith(":unlisted")
        with pytest.raises(UsageError, match="HTTP 404") as e:
            eng.generate([chat("a")])
        one_line(e.value)
    finally:
        f.close()


def test_bad_api_key_is_a_usage_error(fake, monkeypatch):
    monkeypatch.setenv("COMPTRUST_TEST_KEY", SECRET)
    fake.script = [401]
    with pytest.raises(UsageError) as e:
        engine_for(fake, api_key_env="COMPTRUST_TEST_KEY").generate([chat("a")])
    msg = one_line(e.value)
    assert "$COMPTRUST_TEST_KEY" in msg and SECRET not in msg


def test_fewer_choices_than_n_are_completed_with_seed_plus_i():
    f = Fake(choices=2)
    try:
        eng = engine_for(f)
        p = GenParams(max_new_tokens=4, temperature=0.8, n=5, seed=100)
        g = eng.generate([chat("q", p)])[0]
        seeds = [(r[3]["seed"], r[3]["n"]) for r in f.posts()]
        assert seeds == [(100, 5), (102, 3), (104, 1)]
        assert [t.split("|")[1] for t in g.texts] == ["seed=100", "seed=100", "seed=102", "seed=102", "seed=104"]
        assert len(set(g.texts)) == 5 and g.n_tokens == (5, 5, 5, 5, 5)
        assert eng.counters["extra_sample_requests"] == 2
        # greedy: one request, the missing samples are copies (greedy decoding is deterministic)
        f.requests.clear()
        g = eng.generate([chat("q", GenParams(max_new_tokens=4, n=3))])[0]
        assert len(f.posts()) == 1 and len(g.texts) == 3 and g.texts[2] == g.texts[0]
    finally:
        f.close()


def test_token_counts_without_usage_are_approximated():
    f = Fake(usage=False)
    try:
        g = engine_for(f).generate([chat("abcd")])[0]
        assert g.n_tokens == ((len(g.texts[0]) + 3) // 4,)
    finally:
        f.close()


def test_api_key_sent_but_never_stored(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPTRUST_TEST_KEY", SECRET)
    eng = engine_for(fake, api_key_env="COMPTRUST_TEST_KEY", concurrency=2)
    prompts = [chat("a"), chat("b"), Prompt(raw="c", params=GREEDY)]
    with Store(tmp_path / "s.sqlite") as store:
        cached = CachedEngine(eng, store)
        first = cached.generate(prompts)
        n_posts = len(fake.posts())
        again = CachedEngine(eng, store)
        second = again.generate(prompts)
    assert n_posts == 3 and len(fake.posts()) == 3, "the rerun must come from the cache"
    assert again.stats.generated == 0 and again.stats.cache_hits == 3
    assert [g.texts for g in first] == [g.texts for g in second] and all(g.cached for g in second)
    assert all(r[2].get("Authorization") == f"Bearer {SECRET}" for r in fake.requests)
    assert SECRET not in eng.fingerprint and SECRET not in repr(eng) and SECRET not in json.dumps(eng.describe())
    for f in tmp_path.iterdir():  # the database, its WAL and shared-memory files
        assert SECRET.encode() not in f.read_bytes(), f
    db = sqlite3.connect(tmp_path / "s.sqlite")
    assert db.execute("SELECT count(*) FROM generations WHERE model = ?", (eng.fingerprint,)).fetchone()[0] == 3


# -- llama-cpp-python's server with the embedded GGUF -----------------------------------------------------------
@pytest.fixture(scope="module")
def llama_server():
    from comptrust.engine.llamacpp import (
        LLAMACPP_NEUTRAL_SAMPLING,
        LlamaCppServer,
        llama_cpp_available,
    )

    why = llama_cpp_available()
    if why:
        pytest.skip(f"llama-cpp-python server not available ({why})")
    from comptrust.models.resolve import embedded_gguf

    try:
        gguf = embedded_gguf()
    except UsageError as e:
        pytest.skip(str(e))
    srv = LlamaCppServer(gguf, n_ctx=2048, alias="smollm2")
    with srv as url:
        yield srv, url, LLAMACPP_NEUTRAL_SAMPLING


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.model
def test_llamacpp_outputs_equal_the_servers_own(llama_server):
    _, url, neutral = llama_server
    eng = OpenAIEngine(url, "smollm2", extra_body=neutral, concurrency=2)
    p = GenParams(max_new_tokens=12)
    prompts = [chat("Name a color.", p), Prompt(raw="The capital of France is", params=p)]
    common = dict(neutral, model="smollm2", max_tokens=12, temperature=0.0, top_p=1.0, n=1, seed=0)

    def fresh() -> None:
        # llama.cpp reuses the KV cache of the previous request's common prefix, and a prompt prefilled in other
        # pieces gives slightly different logits (a greedy near-tie can flip): start each compared request from a
        # cache that shares nothing with it
        post(f"{url}/completions", dict(common, prompt="0", max_tokens=1))

    fresh()
    gens = [eng.generate([prompts[0]])[0]]
    fresh()
    direct_chat = post(f"{url}/chat/completions", dict(common, messages=[{"role": "user", "content": "Name a color."}]))
    fresh()
    gens.append(eng.generate([prompts[1]])[0])
    fresh()
    direct_raw = post(f"{url}/completions", dict(common, prompt="The capital of France is"))
    assert gens[0].texts == (direct_chat["choices"][0]["message"]["content"],)
    assert gens[1].texts == (direct_raw["choices"][0]["text"],)
    assert gens[0].texts[0].strip() and gens[1].texts[0].strip()
    assert gens[0].n_tokens == (direct_chat["usage"]["completion_tokens"],)
    assert eng.fingerprint == f"openai:{url}#smollm2:smollm2:" + json.dumps(neutral, sort_keys=True, separators=(",", ":"))


@pytest.mark.model
def test_llamacpp_n_samples(llama_server):
    _, url, neutral = llama_server
    eng = OpenAIEngine(url, "smollm2", extra_body=neutral)
    p = GenParams(max_new_tokens=6, temperature=1.0, n=3, seed=7)
    g = eng.generate([chat("Tell me a word.", p)])[0]
    assert len(g.texts) == 3 and len(g.n_tokens) == 3 and all(0 < k <= 6 for k in g.n_tokens)
    assert eng.counters["extra_sample_requests"] == 2  # llama-cpp-python answers one choice per request
    assert eng.generate([chat("Tell me a word.", p)])[0].texts == g.texts  # seeded: reproducible


@pytest.mark.model
def test_llamacpp_restart_mid_run_and_cache(llama_server, tmp_path):
    srv, url, neutral = llama_server
    eng = OpenAIEngine(url, "smollm2", extra_body=neutral, max_retries=7, backoff=0.5, concurrency=2)
    p = GenParams(max_new_tokens=5)
    with Store(tmp_path / "s.sqlite") as store:
        first = CachedEngine(eng, store).generate([chat("Say hi.", p)])
        srv.stop()
        restarter = threading.Thread(target=lambda: (time.sleep(1.0), srv.start()))
        restarter.start()
        try:
            second = CachedEngine(eng, store).generate([chat("Say bye.", p), chat("Say hi.", p)])
        finally:
            restarter.join()
        assert srv.running and srv.base_url == url and eng.counters["retries"] >= 1
        assert second[1].cached and second[1].texts == first[0].texts and not second[0].cached
        sent = eng.counters["requests"]
        rerun = CachedEngine(eng, store)
        third = rerun.generate([chat("Say bye.", p), chat("Say hi.", p)])
    assert rerun.stats.generated == 0 and rerun.stats.cache_hits == 2 and eng.counters["requests"] == sent
    assert [g.texts for g in third] == [g.texts for g in second]


@pytest.mark.model
def test_llamacpp_server_stops_on_interrupt_and_reports_a_bad_gguf(llama_server, tmp_path):
    from comptrust.engine.llamacpp import LlamaCppServer

    srv = LlamaCppServer(llama_server[0].gguf_path, n_ctx=256)
    with pytest.raises(KeyboardInterrupt), srv as url:
        proc = srv.proc
        assert url.startswith("http://127.0.0.1:")
        raise KeyboardInterrupt
    assert proc.poll() is not None and not srv.running
    with pytest.raises(RuntimeFailure) as e:
        OpenAIEngine(url, srv.alias, max_retries=0, timeout=5).fingerprint  # noqa: B018
    assert url in one_line(e.value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeFailure, match="exited with code") as e:
        LlamaCppServer(bad).start()
    one_line(e.value)
    with pytest.raises(UsageError, match="not a GGUF"):
        LlamaCppServer(Path(__file__))
