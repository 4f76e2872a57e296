"""Generation through any OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp, llama-cpp-python, Ollama, ...).

Model spec: ``openai:<base-url>#<model-name>``, e.g. ``openai:http://127.0.0.1:8080/v1#smollm2``.

Requests
  * chat prompts (Prompt.messages) -> POST {base}/chat/completions with the messages: the *server* applies the
    chat template, which we cannot see; raw prompts (Prompt.raw, e.g. MMLU) -> POST {base}/completions.
    With chat=False (base models) messages are joined by blank lines, as HFEngine's raw mode does, and sent to
    /completions.
  * decoding: max_tokens, temperature, top_p, n and seed from GenParams. Greedy prompts (temperature 0) are sent
    with temperature 0, top_p 1, seed 0: the values their cache key is made of. extra_body adds server-specific
    knobs (llama.cpp: repeat_penalty, min_p, top_k, whose defaults differ from transformers').
  * n samples: the server is asked for n. Servers that ignore n (llama.cpp, llama-cpp-python and Ollama return one
    choice) are asked again for the missing samples, the request for sample i carrying seed + i, until n are
    collected. A greedy prompt's missing samples are copies of the first: greedy decoding is deterministic.
  * transport: the standard library's http.client, keep-alive connections pooled across requests, no
    HTTP(S)_PROXY support (servers are reached directly).
  * n_tokens: usage.completion_tokens of the reply, split evenly over the reply's choices; where a reply has no
    usage, ceil(len(text) / 4) (the usual ~4 characters a token). Only throughput statistics use it.

Cache identity
  render(prompt) is a canonical JSON of the request body that defines the output (endpoint + messages, or
  endpoint + prompt text): the template is applied on the server, so the rendered chat text is not available.
  fingerprint = "openai:<base-url>#<model-name>:<id the server reports in GET {base}/models>" (fetched lazily,
  once). The endpoint, the name and the reported id stand in for the weight fingerprint: a different model
  served under the same URL and name shares cached answers, so give each served variant its own name (or pass
  identity=, as engine.llamacpp.gguf_engine does with the GGUF's content hash). chat=False and extra_body, which
  change outputs, are appended. The API key is never part of it.

Failures
  * the server cannot be reached (connection refused, DNS, timeout) on GET /models: RuntimeFailure naming the
    URL, after the retries;
  * the model name is not among the ids GET /models lists (or a request says 404 / model not found):
    UsageError listing the served ids; 401/403: UsageError naming the API-key variable (never its value);
  * connection errors, timeouts, 408/409/425/429 and 5xx, malformed JSON and truncated replies are retried
    max_retries times with exponential backoff (backoff * 2**attempt seconds, at most 30 s; Retry-After is
    honoured up to 30 s). Other 4xx replies (e.g. 400 prompt too long) fail the item at once.
  * contract: generate() returns all its generations or raises. When an item still fails after its retries,
    no further requests are started, the ones in flight stop retrying, and GenerationFailed (a RuntimeFailure)
    is raised naming how many items failed and how many were never sent; its .partial holds the generations
    that did finish (None elsewhere). CachedEngine calls generate() per chunk and commits every chunk that
    returned, so only the failing chunk is lost; a rerun regenerates nothing that was committed.

The API key is read from the environment variable api_key_env at each request (sent as "Authorization: Bearer
<key>" when set); it is never logged, stored, put in an error message or in the fingerprint.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from comptrust.engine.base import Generation
from comptrust.errors import RuntimeFailure, UsageError, redact
from comptrust.types import Prompt

log = logging.getLogger(__name__)

SPEC_PREFIX = "openai:"
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))
MAX_DELAY = 30.0
# bounds on one reply: a server that drips bytes or sends a gigabyte must not hold the run (or its memory)
MAX_REPLY_BYTES = 64 << 20  # a completion reply (n long samples fit many times over)
MAX_MODELS_REPLY_BYTES = 8 << 20  # GET /models: a list of ids


def parse_openai_spec(spec: str) -> tuple[str, str]:
    """``openai:<base-url>#<model-name>`` -> (base_url without a trailing slash, model_name)."""
    if not isinstance(spec, str) or not spec.startswith(SPEC_PREFIX):
        raise UsageError(f"--model {spec!r}: a served model is openai:<base-url>#<model-name>")
    rest = spec[len(SPEC_PREFIX):]
    url, sep, name = rest.rpartition("#")
    if not sep:
        raise UsageError(
            f"--model {spec}: no model name; write openai:<base-url>#<model-name>, e.g. openai:http://127.0.0.1:8080/v1#smollm2"
        )
    url, name = url.strip().rstrip("/"), name.strip()
    if not name:
        raise UsageError(f"--model {spec}: empty model name after '#'")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as e:
        raise UsageError(f"--model {spec}: malformed base URL {url!r} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--model {spec}: the base URL must be http(s)://host[:port][/path], got {url!r}")
    if parts.query or parts.fragment:
        raise UsageError(f"--model {spec}: the base URL must not have a query string")
    return url, name


class GenerationFailed(RuntimeFailure):
    """Some items failed after their retries. partial[i] is the Generation of prompt i, or None."""

    def __init__(self, msg: str, partial: list[Generation | None]):
        super().__init__(msg)
        self.partial = partial


class _Retryable(Exception):
    """A failure worth retrying (connection, timeout, 429/5xx, malformed reply). retry_after: server's hint."""

    def __init__(self, msg: str, retry_after: float | None = None):
        super().__init__(msg)
        self.retry_after = retry_after


class _ItemError(Exception):
    """A failure of this item that retrying will not fix (e.g. 400 prompt too long)."""


class _Aborted(Exception):
    """Another item failed: this one stops (it counts as not sent/finished)."""


def _first_line(s: str, n: int = 200) -> str:
    s = (s or "").strip().splitlines()[0] if (s or "").strip() else ""
    return s if len(s) <= n else s[: n - 3] + "..."


def _error_detail(body: bytes) -> str:
    """The server's error message from an error body (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}),
    secrets redacted: a server (or a proxy in front of it) may echo the request, Authorization header included,
    and this text is printed, stored with failed study units and shown in the report."""
    return redact(_error_text(body[:65536]))


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        d = json.loads(text)
    except ValueError:
        return _first_line(text)
    if isinstance(d, dict):
        e = d.get("error", d.get("detail", d.get("message")))
        if isinstance(e, dict):
            e = e.get("message") or e
        if e is not None:
            return _first_line(e if isinstance(e, str) else json.dumps(e))
    return _first_line(text)


def approx_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def split_count(total: int, k: int) -> list[int]:
    """total tokens over k choices, as evenly as integers allow (the first ones get the remainder)."""
    q, r = divmod(max(int(total), 0), k)
    return [q + (1 if i < r else 0) for i in range(k)]


class OpenAIEngine:
    """An Engine over an OpenAI-compatible server. Thread-safe; one instance per (server, model)."""

    # engine.base.Engine attributes: the weights live on the server, whose device and dtype are not reported
    device = "remote"
    dtype = "unknown"
    chunk_size = 128  # prompts per call: enough to keep `concurrency` requests in flight, small commits

    def __init__(
        self,
        base_url: str,
        model_name: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 120,
        max_retries: int = 5,
        *,
        backoff: float = 0.5,
        chat: bool = True,
        extra_body: dict[str, Any] | None = None,
        identity: str | None = None,
        total_timeout: float | None = None,
    ):
        if concurrency <= 0:
            raise UsageError(f"concurrency {concurrency}: must be positive")
        if timeout <= 0:
            raise UsageError(f"timeout {timeout}: must be positive")
        if max_retries < 0:
            raise UsageError(f"max_retries {max_retries}: must be 0 or more")
        self.base_url, self.model_name = parse_openai_spec(f"{SPEC_PREFIX}{base_url}#{model_name}")
        parts = urlsplit(self.base_url)
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = float(timeout)
        # timeout bounds each read; total_timeout the whole exchange (a reply dripping a byte a minute never
        # trips the first). GET /models gets `timeout` in all: it is a small list the server has at hand.
        self.total_timeout = float(total_timeout) if total_timeout else 3 * self.timeout
        self._warned_model: set[str] = set()
        self.max_retries = max_retries
        self.backoff = backoff
        self.chat = chat
        self.extra_body = dict(extra_body or {})
        self.identity = identity  # stands in for base_url#model_name in the fingerprint (local servers on random ports)
        self.load_seconds = 0.0
        self.meta: dict[str, Any] = {}  # merged into describe() (gguf_engine puts the GGUF's identity here)
        self.counters = {"requests": 0, "retries": 0, "extra_sample_requests": 0}
        self._fingerprint: str | None = None
        self._served: list[dict[str, Any]] | None = None
        self._lock = threading.RLock()
        self._pool: queue.LifoQueue = queue.LifoQueue()

    @classmethod
    def from_spec(cls, spec: str, **kw: Any) -> OpenAIEngine:
        url, name = parse_openai_spec(spec)
        return cls(url, name, **kw)

    # -- identity --------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        with self._lock:
            if self._fingerprint is None:
                reported = self._check_model()
                base = self.identity or f"openai:{self.base_url}#{self.model_name}"
                fp = f"{base}:{reported}"
                if not self.chat:
                    fp += ":raw"
                if self.extra_body:
                    fp += ":" + json.dumps(self.extra_body, sort_keys=True, separators=(",", ":"))
                self._fingerprint = fp
            return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """The info dict evaluate() stores with the scores (no API key, of course)."""
        return {
            "name": self.model_name,
            "kind": "served",
            "spec": f"{SPEC_PREFIX}{self.base_url}#{self.model_name}",
            "engine": "openai",
            "base_url": self.base_url,
            "extra_body": self.extra_body or None,
            **self.meta,
            "fingerprint": self.fingerprint,
        }

    def served_models(self) -> list[dict[str, Any]]:
        """GET {base}/models (cached): the entries of its "data" list."""
        if self._served is None:
            try:
                d = self._with_retries("GET", "/models", None, None)
            except _Retryable as e:
                raise RuntimeFailure(f"cannot reach the server: {e} (after {self.max_retries} retries)") from None
            except _ItemError as e:  # e.g. a server without the models endpoint, or a wrong base URL
                raise RuntimeFailure(
                    f"cannot list the served models: {e}; the model check and the fingerprint need GET /models "
                    "(is the base URL right? it usually ends in /v1)"
                ) from None
            data = d.get("data") if isinstance(d, dict) else None
            if not isinstance(data, list):
                raise RuntimeFailure(f"GET {self.base_url}/models: reply has no model list (\"data\")")
            self._served = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        return self._served

    def _check_model(self) -> str:
        """The id the server reports for model_name; UsageError if the server lists models but not this one."""
        served = self.served_models()
        if not served:
            return "unlisted"
        for m in served:
            if m["id"] == self.model_name:
                root = m.get("root")
                return m["id"] + (f"@{root}" if isinstance(root, str) and root and root != m["id"] else "")
        raise UsageError(self._not_served_message())

    def _not_served_message(self) -> str:
        ids = [m["id"] for m in (self._served or [])]
        listed = ", ".join(ids[:20]) + (f" (+{len(ids) - 20} more)" if len(ids) > 20 else "")
        return f"model {self.model_name!r} is not served by {self.base_url}; served: {listed or 'none listed'}"

    # -- rendering -------------------------------------------------------------------------------------------
    def _endpoint_body(self, prompt: Prompt) -> tuple[str, dict[str, Any]]:
        if prompt.raw is not None:
            return "/completions", {"prompt": prompt.raw}
        if not self.chat:
            return "/completions", {"prompt": "\n\n".join(m.content for m in prompt.messages) + "\n"}
        return "/chat/completions", {"messages": [{"role": m.role, "content": m.content} for m in prompt.messages]}

    def render(self, prompt: Prompt) -> str:
        """Canonical JSON of what defines the request (endpoint + messages or prompt); the server applies its own
        chat template, which is not visible here, so the rendered chat text cannot be returned."""
        path, body = self._endpoint_body(prompt)
        return json.dumps({"endpoint": path, **body}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    # -- HTTP --------------------------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        """For messages: a password in the base URL (user:pw@host) is redacted."""
        return redact(f"{self.base_url}{path}")

    def _new_conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _once(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        """One HTTP exchange. Returns the parsed JSON; raises _Retryable, _ItemError or UsageError."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") if body is not None else None
        url = self._url(path)
        for fresh in (False, True):
            try:
                conn = self._pool.get_nowait() if not fresh else None
            except queue.Empty:
                conn = None
            reused = conn is not None
            if conn is None:
                conn = self._new_conn()
            limit = MAX_MODELS_REPLY_BYTES if path == "/models" else MAX_REPLY_BYTES
            deadline = time.monotonic() + (self.timeout if path == "/models" else self.total_timeout)
            try:
                conn.request(method, self._prefix + path, body=data, headers=self._headers())
                self._bound_next_read(conn, deadline)
                resp = conn.getresponse()
                raw = self._read_bounded(conn, resp, deadline, limit, url)  # IncompleteRead on a truncated body
                status = resp.status
                retry_after = resp.getheader("Retry-After")
                if resp.will_close:
                    conn.close()
                else:
                    self._pool.put(conn)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if reused and not fresh:  # a kept-alive connection the server had closed: once more, fresh
                    continue
                raise _Retryable(f"{url}: connection lost ({type(e).__name__})") from None
            except TimeoutError:
                conn.close()
                late = time.monotonic() >= deadline - 0.01
                whole = self.timeout if path == "/models" else self.total_timeout
                raise _Retryable(f"{url}: no complete reply within {whole:g} s" if late
                                 else f"{url}: no reply within {self.timeout:g} s") from None
            except _ItemError:
                conn.close()
                raise
            except http.client.IncompleteRead as e:
                conn.close()
                raise _Retryable(f"{url}: truncated reply ({len(e.partial)} bytes read)") from None
            except (OSError, http.client.HTTPException) as e:  # refused, unreachable, DNS, bad status line
                conn.close()
                why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
                raise _Retryable(f"{url}: {why}") from None
            break
        with self._lock:
            self.counters["requests"] += 1
        if status == 200:
            try:
                return json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise _Retryable(f"{url}: malformed JSON in the reply ({type(e).__name__}: {_first_line(str(e), 80)})") from None
        detail = _error_detail(raw)
        if status in RETRY_STATUSES:
            try:
                hint = float(retry_after) if retry_after else None
            except ValueError:
                hint = None
            raise _Retryable(f"{url}: HTTP {status} {detail}".rstrip(), hint)
        if status in (401, 403):
            state = "is set" if os.environ.get(self.api_key_env or "") else "is not set"
            raise UsageError(
                f"{url}: HTTP {status}, the server refused the request ({detail}); the API key is read from "
                f"${self.api_key_env}, which {state}"
            )
        if path != "/models" and (
            status == 404 or (status in (400, 422) and "model" in detail.lower() and "not" in detail.lower())
        ):
            self._raise_if_model_unknown()
            if status == 404:
                raise UsageError(
                    f"{url}: HTTP 404 ({detail}); is the base URL right? OpenAI-compatible servers usually serve under /v1"
                )
        raise _ItemError(f"{url}: HTTP {status} {detail}".rstrip())

    def _bound_next_read(self, conn: http.client.HTTPConnection, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if conn.sock is not None:
            conn.sock.settimeout(min(self.timeout, left))

    def _read_bounded(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, deadline: float,
                      limit: int, url: str) -> bytes:
        """The reply body, read piece by piece under the request's deadline and size limit."""
        declared = resp.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > limit:
            raise _ItemError(f"{url}: reply of {int(declared)} bytes is larger than the {limit} bytes accepted")
        parts: list[bytes] = []
        size = 0
        while True:
            self._bound_next_read(conn, deadline)
            piece = resp.read1(1 << 16)
            if not piece:
                break
            size += len(piece)
            if size > limit:
                raise _ItemError(f"{url}: reply larger than the {limit} bytes accepted (stopped reading)")
            parts.append(piece)
        if resp.length:  # the server closed before Content-Length bytes came
            raise http.client.IncompleteRead(b"".join(parts), resp.length)
        resp.read()  # nothing is left: marks the response finished, so the connection can be reused
        return b"".join(parts)

    def _raise_if_model_unknown(self) -> None:
        try:
            served = self.served_models()
        except RuntimeFailure:
            return
        if served and self.model_name not in {m["id"] for m in served}:
            raise UsageError(self._not_served_message())

    def _with_retries(self, method: str, path: str, body: dict[str, Any] | None, abort: threading.Event | None,
                      check: Callable[[Any], None] | None = None) -> Any:
        attempt = 0
        while True:
            if abort is not None and abort.is_set():
                raise _Aborted()
            try:
                reply = self._once(method, path, body)
                if check is not None:
                    check(reply)
                return reply
            except _Retryable as e:
                if abort is not None and abort.is_set():  # the run stops (another item failed, Ctrl-C, SIGTERM)
                    raise _Aborted() from None
                if attempt >= self.max_retries:
                    raise
                delay = min(self.backoff * (2**attempt), MAX_DELAY)
                if e.retry_after is not None:
                    delay = min(max(delay, e.retry_after), MAX_DELAY)
                attempt += 1
                with self._lock:
                    self.counters["retries"] += 1
                log.warning("%s; retry %d/%d in %.1f s", e, attempt, self.max_retries, delay)
                if abort is not None:
                    if abort.wait(delay):
                        raise _Aborted() from None
                else:
                    time.sleep(delay)

    # -- generation ------------------------------------------------------------------------------------------
    def _check_reply(self, path: str) -> Callable[[Any], None]:
        field = "message" if path == "/chat/completions" else "text"

        def check(reply: Any) -> None:
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if not isinstance(choices, list) or not choices:
                raise _Retryable(f"{self._url(path)}: reply without choices")
            for c in choices:
                v = c.get(field) if isinstance(c, dict) else None
                ok = isinstance(v, str) if field == "text" else (
                    isinstance(v, dict) and (v.get("content") is None or isinstance(v.get("content"), str))
                )
                if not ok:
                    raise _Retryable(f"{self._url(path)}: malformed choice in the reply")

        return check

    def _one(self, prompt: Prompt, abort: threading.Event) -> Generation:
        path, body = self._endpoint_body(prompt)
        p = prompt.params
        k = p.key()  # greedy: temperature 0, top_p 1, seed 0 (what the cache key holds)
        body.update(self.extra_body)
        body.update(model=self.model_name, max_tokens=p.max_new_tokens, temperature=k["temperature"], top_p=k["top_p"])
        check = self._check_reply(path)
        texts: list[str] = []
        counts: list[int] = []
        while len(texts) < p.n:
            want = p.n - len(texts)
            req = dict(body, n=want, seed=k["seed"] + len(texts))
            if texts:
                with self._lock:
                    self.counters["extra_sample_requests"] += 1
            reply = self._with_retries("POST", path, req, abort, check)
            self._check_reply_model(reply)
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)
            choices = choices[:want]
            got = [
                (c["message"].get("content") or "") if path == "/chat/completions" else c["text"] for c in choices
            ]
            usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
            total = usage.get("completion_tokens")
            if isinstance(total, int) and not isinstance(total, bool):
                toks = split_count(total, len(got))
            else:
                toks = [approx_tokens(t) for t in got]
            texts += got
            counts += toks
            if p.greedy and len(texts) < p.n:  # deterministic: the missing samples are the same text
                texts += [texts[0]] * (p.n - len(texts))
                counts += [counts[0]] * (p.n - len(counts))
        return Generation(tuple(texts), tuple(counts))

    def _check_reply_model(self, reply: Any) -> None:
        """A reply that names another model than the one asked for (a proxy routing elsewhere, a server that
        swapped models) is warned about once per id: its answers are cached under the model asked for."""
        got = reply.get("model") if isinstance(reply, dict) else None
        if not isinstance(got, str) or not got or got == self.model_name:
            return
        known = {self.model_name} | {str(m.get("root")) for m in (self._served or []) if m.get("id") == self.model_name}
        if got in known or Path(got).name == self.model_name:  # llama.cpp servers may name the file they serve
            return
        with self._lock:
            if got in self._warned_model:
                return
            self._warned_model.add(got)
        print(f"warning: {self._url('')} answered as model {got!r}, not {self.model_name!r} as asked; its answers "
              f"are stored as {self.model_name!r}'s (check what the server runs)", file=sys.stderr, flush=True)

    def _run(self, prompt: Prompt, abort: threading.Event) -> Generation:
        try:
            return self._one(prompt, abort)
        except (_Retryable, _ItemError, UsageError):
            abort.set()  # at once, so that this worker's next item is not sent
            raise

    def generate(
        self, prompts: Sequence[Prompt], progress: Callable[[int, int], None] | None = None
    ) -> list[Generation]:
        if not prompts:
            return []
        self.fingerprint  # noqa: B018 -- checks the server and the model name before any generation
        out: list[Generation | None] = [None] * len(prompts)
        abort = threading.Event()
        failures: list[str] = []
        usage_error: list[UsageError] = []
        not_sent = 0
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)), thread_name_prefix="openai")
        try:
            futures = {pool.submit(self._run, pr, abort): i for i, pr in enumerate(prompts)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    i = futures[f]
                    try:
                        out[i] = g = f.result()
                    except _Aborted:
                        not_sent += 1
                        continue
                    except UsageError as e:
                        usage_error.append(e)
                        abort.set()
                        continue
                    except _Retryable as e:
                        failures.append(f"{e}, after {self.max_retries} retries")
                        abort.set()
                        continue
                    except _ItemError as e:
                        failures.append(str(e))
                        abort.set()
                        continue
                    if progress:
                        progress(1, sum(g.n_tokens))
        except BaseException:  # KeyboardInterrupt: stop at once, no new requests
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        if usage_error:
            raise usage_error[0]
        if failures:
            raise GenerationFailed(
                f"{len(failures)} of {len(prompts)} requests to {self.base_url} failed (first: {failures[0]})"
                f"{f'; {not_sent} more not sent' if not_sent else ''}; generations committed before are kept, "
                "a rerun resumes",
                out,
            )
        return out  # type: ignore[return-value]

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIEngine({self.base_url!r}, {self.model_name!r}, api_key_env={self.api_key_env!r})"

