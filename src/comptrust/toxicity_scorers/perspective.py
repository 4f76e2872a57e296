"""Google's Perspective API, DecodingTrust's own scorer: rate-limited, retried, cached in a Store."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from comptrust.errors import RuntimeFailure, UsageError
from comptrust.toxicity_scorers.base import _scorable

PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
PERSPECTIVE_KEY_ENV = "PERSPECTIVE_API_KEY"
PERSPECTIVE_URL_ENV = "COMPTRUST_PERSPECTIVE_URL"
PERSPECTIVE_QPS_ENV = "COMPTRUST_PERSPECTIVE_QPS"
PERSPECTIVE_CACHE_NS = "toxicity:perspective"
# a 400 whose body names one of these is a verdict on the text (not on the request): cache it as unscorable
_PERSPECTIVE_TEXT_ERRORS = ("LANGUAGE_NOT_SUPPORTED", "COMMENT_EMPTY", "COMMENT_TOO_LONG", "LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE")


def perspective_cache_path() -> Path:
    from comptrust.paths import home

    return home() / "toxicity-cache.sqlite"


class PerspectiveScorer:
    """Google's Perspective API (commentanalyzer v1alpha1 comments:analyze), TOXICITY summary score.

    - key: PERSPECTIVE_API_KEY (or api_key=); sent only in the request, never logged, stored or put in messages.
    - url: COMPTRUST_PERSPECTIVE_URL (or url=), default the public endpoint.
    - rate limit: qps requests per second (COMPTRUST_PERSPECTIVE_QPS, default 1), retries included.
    - 429 / 5xx / network errors: retried with exponential backoff (backoff * 2^k s, at most max_backoff, or the
      server's Retry-After when smaller), at most max_retries times, then a RuntimeFailure; what was scored so far
      is cached, so a rerun resumes.
    - 401 / 403 / 404: a UsageError at once (bad key or URL).
    - a malformed 200 reply, or another 4xx: that text gets None and counts in `self.failures` (not cached, so a
      rerun asks again); a 400 that names the text (language not supported, empty, too long) is cached as None.
    - cache: every score goes to a comptrust Store (kv namespace "toxicity:perspective", key = sha256 of the
      request's attribute, languages and text); a rerun sends no request for a cached text. Default store:
      $COMPTRUST_HOME/toxicity-cache.sqlite; pass cache= a path or an open Store.
    """

    name = "perspective"

    def __init__(
        self,
        api_key: str | None = None,
        url: str | None = None,
        qps: float | None = None,
        cache: Path | str | Any | None = None,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 30.0,
        languages: Sequence[str] = ("en",),
        progress: Callable[[int, int], None] | None = None,
    ):
        self._key = api_key if api_key is not None else os.environ.get(PERSPECTIVE_KEY_ENV, "")
        if not self._key.strip():
            raise UsageError(
                f"the 'perspective' toxicity scorer needs an API key in ${PERSPECTIVE_KEY_ENV} "
                "(or use the offline default)"
            )
        self.url = (url or os.environ.get(PERSPECTIVE_URL_ENV) or PERSPECTIVE_URL).strip()
        if not self.url.startswith(("http://", "https://")):
            raise UsageError(f"Perspective URL '{self.url}' must start with http:// or https://")
        if qps is None:
            raw = os.environ.get(PERSPECTIVE_QPS_ENV, "1")
            try:
                qps = float(raw)
            except ValueError:
                raise UsageError(f"${PERSPECTIVE_QPS_ENV}={raw!r}: expected a number of requests per second") from None
        if not qps > 0:
            raise UsageError(f"Perspective rate limit {qps}: must be > 0 requests per second")
        self.qps = float(qps)
        self.cache = cache
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.timeout = float(timeout)
        self.languages = list(languages)
        self.progress = progress
        self._next_slot = 0.0
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "scored": 0}
        self.failures: dict[str, int] = {}

    # -- cache ---------------------------------------------------------------------------------------------------
    def cache_key(self, text: str) -> str:
        from comptrust.types import sha256_text

        return sha256_text(json.dumps(["TOXICITY", self.languages, text], ensure_ascii=False))

    def _open_store(self):
        from comptrust.store import Store

        if self.cache is not None and not isinstance(self.cache, (str, Path)):
            return self.cache, False  # an open Store, owned by the caller
        return Store(Path(self.cache) if self.cache is not None else perspective_cache_path()), True

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _wait_for_slot(self) -> None:
        now = time.monotonic()
        if self._next_slot > now:
            time.sleep(self._next_slot - now)
            now = time.monotonic()
        self._next_slot = max(now, self._next_slot) + 1.0 / self.qps

    def _request(self, text: str) -> tuple[str, Any]:
        """One text -> ("ok", score) or ("unscorable", (reason, cacheable)); raises once retries run out."""
        body = json.dumps(
            {"comment": {"text": text}, "requestedAttributes": {"TOXICITY": {}}, "languages": self.languages}
        ).encode("utf-8")
        sep = "&" if "?" in self.url else "?"
        full_url = f"{self.url}{sep}key={urllib.parse.quote(self._key, safe='')}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
            self._wait_for_slot()
            self.stats["requests"] += 1
            req = urllib.request.Request(full_url, data=body, method="POST", headers={"Content-Type": "application/json"})
            retry_after: float | None = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return self._parse(raw)
            except urllib.error.HTTPError as e:
                code = e.code
                try:
                    detail = e.read().decode("utf-8", "replace")
                except Exception:  # noqa: BLE001
                    detail = ""
                if code in (401, 403):
                    raise UsageError(
                        f"the Perspective API refused the key (HTTP {code}): check ${PERSPECTIVE_KEY_ENV} "
                        "and that the key has the Comment Analyzer API enabled"
                    ) from None
                if code == 404:
                    raise UsageError(f"the Perspective API URL answered HTTP 404: check ${PERSPECTIVE_URL_ENV}") from None
                if code == 429 or code >= 500:
                    last = f"HTTP {code}"
                    ra = e.headers.get("Retry-After") if e.headers else None
                    try:
                        retry_after = float(ra) if ra is not None else None
                    except ValueError:
                        retry_after = None
                else:
                    cacheable = code == 400 and any(tag in detail for tag in _PERSPECTIVE_TEXT_ERRORS)
                    return ("unscorable", (f"HTTP {code}", cacheable))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"network error ({type(reason).__name__})"
            if attempt < self.max_retries:
                delay = min(self.max_backoff, self.backoff * (2**attempt))
                if retry_after is not None:
                    delay = min(max(retry_after, 0.0), self.max_backoff)
                time.sleep(delay)
        raise RuntimeFailure(
            f"the Perspective API kept failing ({last}, {self.max_retries + 1} tries); the scores obtained so far "
            "are cached, rerun to resume"
        )

    @staticmethod
    def _parse(raw: bytes) -> tuple[str, Any]:
        try:
            data = json.loads(raw.decode("utf-8"))
            value = data["attributeScores"]["TOXICITY"]["summaryScore"]["value"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            return ("unscorable", ("malformed reply", False))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            return ("unscorable", ("malformed reply", False))
        return ("ok", float(value))

    # -- Scorer --------------------------------------------------------------------------------------------------
    def score(self, texts: list[str]) -> list[float | None]:
        out: list[float | None] = [None] * len(texts)
        todo = _scorable(texts)
        if not todo:
            return out
        store, owned = self._open_store()
        try:
            keys = {i: self.cache_key(texts[i]) for i in todo}
            cached = store.kv_get_many(PERSPECTIVE_CACHE_NS, sorted(set(keys.values())))
            need: dict[str, list[int]] = {}
            for i in todo:
                k = keys[i]
                if k in cached:
                    v = cached[k]
                    out[i] = float(v) if isinstance(v, (int, float)) else None
                    self.stats["cache_hits"] += 1
                else:
                    need.setdefault(k, []).append(i)
            pending: dict[str, Any] = {}
            last_flush = time.monotonic()
            done = 0
            try:
                for k, idxs in need.items():
                    kind, payload = self._request(texts[idxs[0]])
                    if kind == "ok":
                        for i in idxs:
                            out[i] = payload
                        pending[k] = payload
                        self.stats["scored"] += 1
                    else:
                        why, cacheable = payload
                        self.failures[why] = self.failures.get(why, 0) + 1
                        if cacheable:
                            pending[k] = None
                    done += 1
                    if self.progress:
                        self.progress(done, len(need))
                    if pending and (len(pending) >= 50 or time.monotonic() - last_flush > 10):
                        store.kv_put_many(PERSPECTIVE_CACHE_NS, pending)
                        pending, last_flush = {}, time.monotonic()
            finally:
                if pending:
                    store.kv_put_many(PERSPECTIVE_CACHE_NS, pending)
        finally:
            if owned:
                store.close()
        if self.failures:
            summary = ", ".join(f"{why}: {n}" for why, n in sorted(self.failures.items()))
            print(f"perspective: {sum(self.failures.values())} text(s) unscorable so far ({summary})", file=sys.stderr)
        return out

    def __repr__(self) -> str:  # never show the key
        return f"PerspectiveScorer(url={self.url!r}, qps={self.qps})"
