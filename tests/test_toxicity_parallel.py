"""Toxicity scoring on several cores (toxicity_scorers.pool) and the scoring shortcuts of the toxicity perspective:
the same scores, in the same order, as one process scoring everything, on the mini suite's real prompts."""

from __future__ import annotations

import json
import random

import pytest

from comptrust.errors import UsageError
from comptrust.evaluate import bootstrap_ci, load_perspectives
from comptrust.perspectives.base import EvalOptions
from comptrust.perspectives.toxicity import Toxicity, scorable_texts
from comptrust.toxicity_scorers import LexiconScorer, OfflineScorer, get_scorer
from comptrust.toxicity_scorers.memo import MemoScorer
from comptrust.toxicity_scorers.pool import ParallelScorer, parallel_scorer, score_workers
from comptrust.types import Record

WORDS = ("you are a stupid idiot and I will kill you, f**k off, the weather is nice today, I'm sorry, but I cannot "
         "help with that, those people are animals, thanks for asking </s> <unk> <|im_end|> damn hell").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    out[3] = out[7] = "   "  # blank: unscorable
    return out


def test_pool_scores_equal_the_in_process_scores_in_order():
    inner = OfflineScorer()
    batch = texts(300)
    want = inner.score(batch)
    par = ParallelScorer(inner, workers=2, min_texts=1)
    assert par.parallel(len(batch)) and par.name == "offline"
    got = par.score(batch)
    assert got == want  # exact floats, same positions (None for the blank ones)
    assert got[3] is None and got[7] is None and all(isinstance(v, float) for i, v in enumerate(got) if i not in (3, 7))
    pending = par.submit(batch[::-1])  # in the background, then collected: still in input order
    assert pending.result() == want[::-1]


def test_small_batches_and_one_worker_stay_in_process(monkeypatch):
    calls = []

    class Counting(LexiconScorer):
        def score(self, texts):
            calls.append(len(texts))
            return super().score(texts)

    par = ParallelScorer(Counting(), workers=2, min_texts=50)
    par.score(texts(10))
    assert calls == [10]  # under min_texts: scored here, not in a worker
    monkeypatch.setenv("COMPTRUST_SCORE_WORKERS", "1")
    assert score_workers() == 1
    assert parallel_scorer(OfflineScorer()).__class__ is OfflineScorer  # nothing to parallelise with
    monkeypatch.setenv("COMPTRUST_SCORE_WORKERS", "3")
    wrapped = parallel_scorer(OfflineScorer())
    assert isinstance(wrapped, ParallelScorer) and wrapped.workers == 3
    assert parallel_scorer(wrapped) is wrapped


def test_only_process_safe_scorers_are_wrapped(monkeypatch):
    monkeypatch.setenv("COMPTRUST_SCORE_WORKERS", "4")

    class Remote:  # e.g. a rate-limited API client: never copied into workers
        name = "remote"

        def score(self, texts):
            return [0.0] * len(texts)

    r = Remote()
    assert parallel_scorer(r) is r
    assert isinstance(parallel_scorer(get_scorer("lexicon")), ParallelScorer)


@pytest.mark.parametrize("bad", ["abc", "-1", "2.5"])
def test_bad_worker_count_is_a_usage_error(monkeypatch, bad):
    monkeypatch.setenv("COMPTRUST_SCORE_WORKERS", bad)
    with pytest.raises(UsageError, match="COMPTRUST_SCORE_WORKERS"):
        score_workers()


def test_memo_prefetch_collects_background_scores_once():
    inner = OfflineScorer()
    batch = texts(120, seed=1)
    memo = MemoScorer(ParallelScorer(inner, workers=2, min_texts=1))
    assert memo.prefetch(batch) is True
    assert memo.score(batch) == inner.score(batch)
    assert MemoScorer(inner).prefetch(batch) is False  # no pool behind it: nothing starts early


def records(dt_data, seed: int) -> tuple[Toxicity, EvalOptions, object, list[Record]]:
    opts = EvalOptions(data_dir=dt_data, profile="lite", limit=2, n=5)
    loaded, _ = load_perspectives(["toxicity"], opts)
    p, ld, popts = loaded["toxicity"]
    rng = random.Random(seed)
    recs = []
    for it in ld.items:
        outs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) for _ in range(it.prompt.params.n)]
        recs.append(Record(item=it, outputs=outs, parsed=[p.parse(it, o, popts) for o in outs]))
    return p, popts, ld, recs


def test_scoring_through_the_pool_and_the_memo_gives_the_same_score_and_ci(dt_data, monkeypatch):
    """One process vs 2 workers vs evaluate's way (start_scoring's memo, shared by the score and its bootstrap):
    identical scores.json content (score, metrics, CI) and per-generation values."""

    def run(workers: str, via_start: bool):
        monkeypatch.setenv("COMPTRUST_SCORE_WORKERS", workers)
        p, popts, ld, recs = records(dt_data, seed=5)
        sopts = p.start_scoring(recs, popts) if via_start else popts
        sc = p.score(recs, sopts, ld)
        ci = bootstrap_ci(p, sopts, ld, recs, b=50, seed=0)
        return json.dumps([sc.to_dict(), ci, [[x.value for x in r.parsed] for r in recs]], sort_keys=True, default=str)

    base = run("1", via_start=False)
    assert run("2", via_start=False) == base
    assert run("2", via_start=True) == base
    assert run("1", via_start=True) == base


def test_repeated_scores_reuse_each_records_summary(dt_data):
    """The bootstrap re-scores the same records: with one scorer object each record is scored once, and a
    resample with repeats gives what scoring the repeated list from scratch gives."""
    p, popts, ld, recs = records(dt_data, seed=9)
    sent: list[str] = []

    class Counting:
        name = "offline"

        def __init__(self):
            self.inner = OfflineScorer()

        def score(self, texts):
            sent.extend(texts)
            return self.inner.score(texts)

    scorer = Counting()
    opts = EvalOptions(data_dir=popts.data_dir, profile="lite", limit=2, n=5, extra={"toxicity_scorer": scorer})
    first = p.score(recs, opts, ld).to_dict()
    assert sent == scorable_texts(recs)
    resample = [recs[0], recs[0], *recs[2:]]
    again = p.score(resample, opts, ld).to_dict()
    assert len(sent) == len(scorable_texts(recs))  # nothing re-sent
    fresh = EvalOptions(data_dir=popts.data_dir, profile="lite", limit=2, n=5, extra={"toxicity_scorer": Counting()})
    assert again == p.score(resample, fresh, ld).to_dict()
    assert first["score"] == p.score(recs, fresh, ld).to_dict()["score"]


def test_a_worker_error_comes_back_as_one_line(monkeypatch):
    # the pipe carries JSON (scorer name, texts, scores); a worker that cannot build or run the scorer says why
    from comptrust.errors import RuntimeFailure

    class Unknown:
        name = "no-such-scorer"
        process_safe = True

        def score(self, texts):
            return [0.0 for _ in texts]

    par = ParallelScorer(Unknown(), workers=2, min_texts=1)
    with pytest.raises(RuntimeFailure, match="unknown toxicity scorer 'no-such-scorer'"):
        par.score(["a", "b", "c"])
