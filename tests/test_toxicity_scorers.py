"""Toxicity scorer backends: the offline default and its lexicon, a Hugging Face classifier (a tiny random model
built here), the Perspective API against a real local HTTP server, and `comptrust toxicity-score` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from comptrust.errors import RuntimeFailure, UsageError
from comptrust.store import Store
from comptrust.toxicity_scorers import (
    DEFAULT_SCORER,
    PERSPECTIVE_CACHE_NS,
    HFClassifierScorer,
    LexiconScorer,
    OfflineScorer,
    PerspectiveScorer,
    ProfanityCheckScorer,
    Scorer,
    get_scorer,
    load_lexicon,
    normalize_text,
)
from tests.conftest import ROOT

HAND = ROOT / "bench" / "data" / "nonprofane_toxic.jsonl"
KEY = "SECRET-test-key-8f3a9"


# ---------------------------------------------------------------------------------------------- offline scorers
def hand_set(split: str) -> list[dict]:
    rows = [json.loads(line) for line in HAND.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split or (split == "dev" and r["split"].startswith("dev"))]


def hit_and_fp(scorer: Scorer, rows: list[dict]) -> tuple[float, float]:
    vals = scorer.score([r["text"] for r in rows])
    tox = [v for v, r in zip(vals, rows) if r["toxic"]]
    ben = [v for v, r in zip(vals, rows) if not r["toxic"]]
    return sum(v > 0.5 for v in tox) / len(tox), sum(v > 0.5 for v in ben) / len(ben)


def test_registry_and_default():
    assert DEFAULT_SCORER == "offline"
    assert isinstance(get_scorer(), OfflineScorer)
    for name, cls in [("offline", OfflineScorer), ("lexicon", LexiconScorer), ("profanity-check", ProfanityCheckScorer)]:
        s = get_scorer(name)
        assert isinstance(s, cls) and isinstance(s, Scorer) and s.name == name
    with pytest.raises(UsageError, match=r"known: profanity-check, offline, lexicon, perspective, hf:"):
        get_scorer("nope")


def test_offline_default_catches_non_profane_toxicity():
    """Measured (bench/results/toxicity_agreement.md): dev 57/60 caught, 4/60 benign flagged; held-out 8/20 caught,
    1/20 flagged, where profanity-check alone catches 17/60 and 5/20."""
    offline, baseline = get_scorer("offline"), get_scorer("profanity-check")
    hit, fp = hit_and_fp(offline, hand_set("dev"))
    base_hit, _ = hit_and_fp(baseline, hand_set("dev"))
    assert hit >= 0.9 and fp <= 0.12, (hit, fp)
    assert base_hit <= 0.4  # the gap this scorer exists for
    hit, fp = hit_and_fp(offline, hand_set("heldout"))
    base_hit, _ = hit_and_fp(baseline, hand_set("heldout"))
    assert hit >= 0.35 and hit >= base_hit and fp <= 0.1, (hit, fp, base_hit)
    # the example
    assert offline.score(["Those people are subhuman vermin"])[0] > 0.5
    assert baseline.score(["Those people are subhuman vermin"])[0] < 0.5


def test_offline_scores_are_probabilities_and_none_for_empty():
    vals = get_scorer("offline").score(["", "   \n", "what a nice sunny morning", "shut up you stupid idiot", "f**k you"])
    assert vals[0] is None and vals[1] is None
    assert all(0.0 <= v <= 1.0 for v in vals[2:])
    assert vals[2] < 0.5 < vals[3] and vals[4] > 0.5


def test_lexicon_censored_compound_and_scunthorpe():
    lex = load_lexicon()
    hits = lambda t: lex.analyze(t).categories  # noqa: E731
    assert hits("f**k this")["severe_profanity"] > 0
    assert hits("you piece of sh*t")["profanity"] > 0
    assert hits("nineteen-motherfuckin\u2019-sixty-eight")["severe_profanity"] > 0
    assert hits("he is a total dickhole")["profanity"] > 0
    for clean in ("Fukutake awarded the prize", "Scunthorpe United", "an assassin in the class", "a cocktail party",
                  "the document was analysed", "well-known passage", "Dickens wrote novels"):
        h = hits(clean)
        assert not any(h[c] for c in ("severe_profanity", "profanity", "slur")), (clean, h)
    assert normalize_text("It\u2019s  \u201cOK\u201d \u2014 FINE") == "it's \"ok\" - fine"
    # patterns need a target: violent words in neutral text do not fire them
    assert not any(lex.analyze("The exterminator removed the cockroaches from the kitchen.").patterns.values())
    assert lex.analyze("Refugees are cockroaches crawling over the border.").patterns["identity_attack"]


def test_offline_agrees_with_perspective_on_dt_prompts(dt_data):
    """All 3,596 prompts (about 2 s): AUROC measured 0.989 (profanity-check 0.976), MAE 0.099 (0.124)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import toxicity_agreement as ta
    finally:
        sys.path.remove(str(ROOT / "bench"))
    texts, y, _ = ta.load_prompts(dt_data / "toxicity" / "user_prompts")
    assert len(texts) == 3596
    m = ta.agreement(get_scorer("offline").score(texts), y)
    assert m["auroc"] >= 0.985 and m["mae"] <= 0.11 and m["spearman"] >= 0.83, m
    assert m["unscored"] == 0
    assert ta.auroc(np.array([0.1, 0.9, 0.2]), np.array([False, True, False])) == 1.0


# ------------------------------------------------------------------------------------------------- Hugging Face
def tiny_classifier(path: Path, id2label: dict[int, str], problem_type: str | None = None) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"you are a the nice idiot day have lovely stupid".split(),
             *"abcdefghijklmnopqrstuvwxyz"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, id2label=id2label, label2id={v: k for k, v in id2label.items()},
        problem_type=problem_type,
    )
    BertForSequenceClassification(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def reference_probs(path: Path, texts: list[str], idx: int, sigmoid: bool) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for t in texts:  # one at a time: no padding involved
        with torch.no_grad():
            logits = model(**tok(t, return_tensors="pt", truncation=True, max_length=62)).logits[0]
        out.append(float((torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1))[idx]))
    return out


def test_hf_scorer_batches_and_picks_the_toxic_label(tmp_path):
    path = tiny_classifier(tmp_path / "tiny", {0: "non-toxic", 1: "toxic"})
    texts = ["you are a nice day", "", "idiot", "have a lovely day " * 40, "stupid idiot you are", "  "]
    s = get_scorer(f"hf:{path}")
    assert isinstance(s, HFClassifierScorer) and s.name == f"hf:{path}"
    s.batch_size = 2
    vals = s.score(texts)
    assert vals[1] is None and vals[5] is None
    scored = [0, 2, 3, 4]
    assert all(0.0 <= vals[i] <= 1.0 for i in scored)
    ref = reference_probs(path, [texts[i] for i in scored], idx=1, sigmoid=False)
    assert [vals[i] for i in scored] == pytest.approx(ref, abs=1e-5)  # batching/padding changes nothing
    # label override by name and by index
    assert get_scorer(f"hf:{path}#non-toxic").score(["idiot"])[0] == pytest.approx(1 - vals[2], abs=1e-5)
    assert get_scorer(f"hf:{path}#1").score(["idiot"])[0] == pytest.approx(vals[2], abs=1e-5)


def test_hf_scorer_multilabel_sigmoid_and_label_errors(tmp_path):
    multi = tiny_classifier(tmp_path / "multi", {0: "insult", 1: "toxic", 2: "threat"}, "multi_label_classification")
    vals = get_scorer(f"hf:{multi}").score(["idiot", "nice day"])
    assert vals == pytest.approx(reference_probs(multi, ["idiot", "nice day"], idx=1, sigmoid=True), abs=1e-5)
    generic = tiny_classifier(tmp_path / "generic", {0: "LABEL_0", 1: "LABEL_1"})
    assert get_scorer(f"hf:{generic}").score(["idiot"])[0] == pytest.approx(
        reference_probs(generic, ["idiot"], idx=1, sigmoid=False)[0], abs=1e-5
    )
    odd = tiny_classifier(tmp_path / "odd", {0: "ham", 1: "spam", 2: "eggs"})
    with pytest.raises(UsageError, match=r"cannot tell which label is 'toxic' \(labels: 0=ham, 1=spam, 2=eggs\)"):
        get_scorer(f"hf:{odd}")
    with pytest.raises(UsageError, match="no label 'bacon'"):
        get_scorer(f"hf:{odd}#bacon")


def test_hf_scorer_offline_hub_id_is_a_one_line_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UsageError) as e:
        get_scorer("hf:someorg/not-downloaded-toxicity-model")
    msg = str(e.value)
    assert "\n" not in msg and "hf:someorg/not-downloaded-toxicity-model" in msg and "download it first" in msg
    with pytest.raises(UsageError, match="neither a model directory nor a Hub id"):
        get_scorer(f"hf:{tmp_path / 'missing' / 'dir'}")
    with pytest.raises(UsageError, match="needs a model"):
        get_scorer("hf:")


# --------------------------------------------------------------------------------------------------- Perspective
class FakePerspective:
    """A local HTTP server speaking the Perspective comments:analyze format.

    text "tox=0.7 ..." -> 0.7; "MALFORMED" -> 200 with broken JSON; "NOSCORE" -> 200 without the score;
    "LANG" -> 400 LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE; "FLAKY429" / "FLAKY500" -> 429 / 500 twice, then a score;
    "DOWN" -> always 503; "DENIED" -> 403. Anything else -> 0.1. Records every request.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                q = parse_qs(urlparse(self.path).query)
                try:
                    req = json.loads(body)
                except json.JSONDecodeError:
                    req = None
                with outer.lock:
                    outer.requests.append({"t": time.monotonic(), "path": urlparse(self.path).path, "query": q,
                                           "body": req, "ctype": self.headers.get("Content-Type")})
                    text = (req or {}).get("comment", {}).get("text", "")
                    n = outer.seen[text] = outer.seen.get(text, 0) + 1
                status, payload = outer.answer(text, n)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1alpha1/comments:analyze"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @staticmethod
    def ok(v: float) -> dict:
        return {"attributeScores": {"TOXICITY": {"spanScores": [], "summaryScore": {"value": v, "type": "PROBABILITY"}}},
                "languages": ["en"]}

    def answer(self, text: str, n: int) -> tuple[int, object]:
        if text.startswith("tox="):
            return 200, self.ok(float(text[4:].split()[0]))
        if text == "MALFORMED":
            return 200, b'{"attributeScores": {"TOXICITY": '
        if text == "NOSCORE":
            return 200, {"attributeScores": {}}
        if text == "LANG":
            return 400, {"error": {"code": 400, "message": "Attribute TOXICITY does not support request languages: xx",
                                   "details": [{"errorType": "LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE"}]}}
        if text.startswith("FLAKY"):
            return (int(text[5:8]), {"error": {"code": int(text[5:8])}}) if n <= 2 else (200, self.ok(0.55))
        if text == "DOWN":
            return 503, {"error": {"code": 503}}
        if text == "DENIED":
            return 403, {"error": {"code": 403}}
        return 200, self.ok(0.1)

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api(monkeypatch):
    for var in ("NO_PROXY", "no_proxy"):  # an HTTP proxy in the environment must not swallow local requests
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    srv = FakePerspective()
    yield srv
    srv.close()


def perspective(srv: FakePerspective, tmp_path: Path, **kw) -> PerspectiveScorer:
    kw = {"api_key": KEY, "url": srv.url, "qps": 1000, "cache": tmp_path / "cache.sqlite", "backoff": 0.01, **kw}
    return PerspectiveScorer(**kw)


def test_perspective_request_format_scores_and_cache(fake_api, tmp_path):
    s = perspective(fake_api, tmp_path)
    texts = ["tox=0.7 you fool", "", "hello there", "tox=0.2", "tox=0.7 you fool"]
    assert s.score(texts) == [0.7, None, 0.1, 0.2, 0.7]
    assert fake_api.count() == 3  # duplicates and empty texts send nothing
    r = fake_api.requests[0]
    assert r["path"] == "/v1alpha1/comments:analyze" and r["ctype"] == "application/json"
    assert r["query"] == {"key": [KEY]}
    assert r["body"] == {"comment": {"text": "tox=0.7 you fool"}, "requestedAttributes": {"TOXICITY": {}},
                         "languages": ["en"]}
    # a rerun (new scorer, same cache) makes no request
    again = perspective(fake_api, tmp_path)
    assert again.score(texts) == [0.7, None, 0.1, 0.2, 0.7]
    assert fake_api.count() == 3 and again.stats["cache_hits"] == 4 and again.stats["requests"] == 0
    with Store(tmp_path / "cache.sqlite") as st:
        assert st.kv_get_many(PERSPECTIVE_CACHE_NS, [s.cache_key("tox=0.2")]) == {s.cache_key("tox=0.2"): 0.2}
    # the key is never written: not in the database (nor its WAL), nor in the scorer's repr
    for f in tmp_path.iterdir():
        assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in repr(s)


def test_perspective_retries_429_and_500_with_backoff(fake_api, tmp_path):
    s = perspective(fake_api, tmp_path, backoff=0.05)
    t0 = time.monotonic()
    assert s.score(["FLAKY429", "FLAKY500"]) == [0.55, 0.55]
    assert fake_api.count() == 6 and s.stats["retries"] == 4
    assert time.monotonic() - t0 >= 2 * (0.05 + 0.10)  # exponential: 0.05 s, then 0.1 s, per text


def test_perspective_gives_up_after_bounded_retries(fake_api, tmp_path):
    s = perspective(fake_api, tmp_path, max_retries=2)
    with pytest.raises(RuntimeFailure, match=r"kept failing \(HTTP 503, 3 tries\)") as e:
        s.score(["tox=0.3", "DOWN"])
    assert KEY not in str(e.value)
    assert fake_api.count() == 4  # 1 + 3 tries
    # the score obtained before the failure is cached: the rerun asks only for the failing text
    with pytest.raises(RuntimeFailure):
        perspective(fake_api, tmp_path, max_retries=0).score(["tox=0.3", "DOWN"])
    assert fake_api.count() == 5


def test_perspective_malformed_replies_are_none_and_counted(fake_api, tmp_path, capsys):
    s = perspective(fake_api, tmp_path)
    assert s.score(["MALFORMED", "NOSCORE", "LANG", "tox=0.9"]) == [None, None, None, 0.9]
    assert s.failures == {"malformed reply": 2, "HTTP 400": 1}
    assert "3 text(s) unscorable" in capsys.readouterr().err
    # rerun: the language verdict is cached, malformed replies are asked again
    n = fake_api.count()
    assert perspective(fake_api, tmp_path).score(["MALFORMED", "NOSCORE", "LANG", "tox=0.9"]) == [None] * 3 + [0.9]
    assert fake_api.count() == n + 2


def test_perspective_rate_limit(fake_api, tmp_path):
    s = perspective(fake_api, tmp_path, qps=20)
    t0 = time.monotonic()
    s.score([f"tox=0.{i}" for i in range(1, 7)])
    assert time.monotonic() - t0 >= 5 / 20 - 0.01
    times = [r["t"] for r in fake_api.requests]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 5 and min(gaps) >= 0.04, gaps


def test_perspective_key_url_and_denied(fake_api, tmp_path, monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(UsageError, match="PERSPECTIVE_API_KEY"):
        get_scorer("perspective")
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    monkeypatch.setenv("COMPTRUST_PERSPECTIVE_URL", fake_api.url)
    monkeypatch.setenv("COMPTRUST_PERSPECTIVE_QPS", "500")
    s = get_scorer("perspective", cache=tmp_path / "c.sqlite")
    assert s.url == fake_api.url and s.qps == 500
    assert s.score(["tox=0.4"]) == [0.4]
    with pytest.raises(UsageError, match="refused the key \\(HTTP 403\\)") as e:
        s.score(["DENIED"])
    assert KEY not in str(e.value)
    monkeypatch.setenv("COMPTRUST_PERSPECTIVE_QPS", "fast")
    with pytest.raises(UsageError, match="COMPTRUST_PERSPECTIVE_QPS"):
        get_scorer("perspective")


# ------------------------------------------------------------------------------------------------------------ CLI
def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "comptrust", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def test_cli_toxicity_score_end_to_end(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"text": "have a lovely day", "id": 1}, {"text": "shut up you stupid idiot", "id": 2},
            {"text": "", "id": 3}, {"text": None, "id": 4}, {"text": "Those people are subhuman vermin", "id": 5}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = tmp_path / "sub" / "out.jsonl"
    p = cli("toxicity-score", str(src), "--out", str(out), "--progress")
    assert p.returncode == 0, p.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, 2, 3, 4, 5] and all(g["text"] == r["text"] for g, r in zip(got, rows))
    tox = [g["toxicity"] for g in got]
    assert tox[2] is None and tox[3] is None
    assert tox[0] < 0.5 < tox[1] and tox[4] > 0.5
    assert "[toxicity] 5/5 texts" in p.stderr and "scored 3/5 texts with 'offline'" in p.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    p = cli("toxicity-score", str(bad), "--out", str(tmp_path / "o.jsonl"))
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {bad}:3: not valid JSON"), p.stderr
    bad.write_text('{"text": "fine"}\n{"txt": "x"}\n')
    p = cli("toxicity-score", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert p.returncode == 2 and f"{bad}:2: no \"text\" field" in p.stderr
    p = cli("toxicity-score", str(src), "--out", str(out), "--toxicity-scorer", "nope")
    assert p.returncode == 2 and "known: profanity-check, offline" in p.stderr


def test_cli_toxicity_score_with_perspective_caches(fake_api, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "tox=0.8 bad"}\n{"text": "MALFORMED"}\n{"text": "tox=0.1"}\n')
    env = {"PERSPECTIVE_API_KEY": KEY, "COMPTRUST_PERSPECTIVE_URL": fake_api.url, "COMPTRUST_PERSPECTIVE_QPS": "200"}
    args = ("toxicity-score", str(src), "--out", str(tmp_path / "out.jsonl"), "-s", "perspective",
            "--cache", str(tmp_path / "cache.sqlite"), "--progress")
    p = cli(*args, env=env)
    assert p.returncode == 0, p.stderr
    assert "[toxicity]   3/3 requests in this batch" in p.stderr and "1 text(s) unscorable" in p.stderr
    assert [json.loads(line)["toxicity"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [0.8, None, 0.1]
    assert fake_api.count() == 3 and KEY not in p.stderr + p.stdout
    p = cli(*args, env=env)
    assert p.returncode == 0 and fake_api.count() == 4  # only the malformed one is asked again
    p = cli(*args, env={**env, "PERSPECTIVE_API_KEY": ""})
    assert p.returncode == 2 and "PERSPECTIVE_API_KEY" in p.stderr
