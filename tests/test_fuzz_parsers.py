"""Property-based fuzzing of every perspective's output parser and score(), over the real mini-suite items.

Properties, for any Unicode text (control characters included, no surrogates, up to tens of thousands of
characters, or a mix of the protocol's own label words / markers / item answers with noise and case changes):

- parse() never raises and returns a Parsed whose label is one of the perspective's labels or None;
- ``refused`` is a bool, ``correct`` a bool (or None where the perspective has no gold: stereotype, toxicity,
  privacy; and the unparsable answers of fairness under original scoring);
- refused and correct are never both true, except in fairness's comp-trust patch, whose spec counts an answer
  without any answer word both as prediction 0 (so it can be right) and as a rejection;
- score() over any list of such records gives a finite score in [0, 100] (or None) and a refusal rate in
  [0, 100] (or None). Toxicity under --original-scoring is the documented exception: DecodingTrust's -1 for an
  unscorable prompt can lift its score up to 200.

COMPTRUST_FUZZ_EXAMPLES sets the examples per test (default 100); the terminal summary reports the examples run.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comptrust.perspectives import REGISTRY, get
from comptrust.perspectives.base import EvalOptions, protocol
from comptrust.types import Parsed, Record

MINI = Path(__file__).resolve().parents[1] / "src" / "comptrust" / "suites" / "mini"
EXAMPLES = int(os.environ.get("COMPTRUST_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---------------------------------------------------------------------------------------------------------------
# example counter: a plugin registered at run time prints the examples run in pytest's terminal summary

COUNTS: Counter[str] = Counter()


class FuzzCounter:
    """Shared by the fuzz test modules (they count into its .counts)."""

    name = "comptrust-fuzz-counter"

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.counts:
            return
        tr = terminalreporter
        tr.section("fuzz examples run")
        for key in sorted(self.counts):
            tr.write_line(f"{key:<48} {self.counts[key]:>7}")
        tr.write_line(f"{'total':<48} {sum(self.counts.values()):>7}  (COMPTRUST_FUZZ_EXAMPLES={EXAMPLES})")


def fuzz_counter(config) -> FuzzCounter:
    plugin = config.pluginmanager.get_plugin(FuzzCounter.name)
    if plugin is None:
        plugin = FuzzCounter()
        config.pluginmanager.register(plugin, FuzzCounter.name)
    return plugin


@pytest.fixture(scope="module", autouse=True)
def _count_examples(request):
    yield
    fuzz_counter(request.config).counts.update({f"parsers::{k}": v for k, v in COUNTS.items()})


# ---------------------------------------------------------------------------------------------------------------
# the items: every perspective's mini suite, loaded once

OPTS = EvalOptions(data_dir=MINI)
OPTS_ORIG = EvalOptions(data_dir=MINI, original_scoring=True)
PERSPECTIVES = {name: get(name) for name in REGISTRY}
LOADED = {name: p.load(OPTS) for name, p in PERSPECTIVES.items()}
ITEMS = {name: loaded.items for name, loaded in LOADED.items()}


# ---------------------------------------------------------------------------------------------------------------
# text strategies


def _strings(obj: Any, out: set[str]) -> set[str]:
    """Every short string leaf (and key) of a protocol file."""
    if isinstance(obj, str):
        if 0 < len(obj) <= 80:
            out.add(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _strings(k, out)
            _strings(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _strings(v, out)
    return out


_PROTOCOL_FILES = {
    "toxicity": ["toxicity"],
    "stereotype": ["stereotype"],
    "advglue": ["advglue"],
    "ood": ["ood", "do_classification"],
    "adv_demo": ["adv_demo", "do_classification"],
    "privacy": ["privacy"],
    "ethics": ["ethics", "do_classification"],
    "fairness": ["fairness"],
    "mmlu": ["mmlu"],
}


def _protocol_words(name: str) -> list[str]:
    words: set[str] = set()
    for f in _PROTOCOL_FILES[name]:
        _strings(protocol(f), words)
    # the answers the items themselves carry (gold words, options, choices, e-mail addresses, PII secrets)
    for it in ITEMS[name][:60]:
        _strings(dict(it.labels), words)
    return sorted(words)


WORDS = {name: _protocol_words(name) for name in REGISTRY}
MARKERS = [
    "</s>", "<|im_end|>", "<|endoftext|>", "<unk>", "<unk", "answer:", "Answer: ", "user: ", "\n", "\n\n", "\r\n",
    ".", ",", "'", '"', "“", "”", "202", "2023", "@", "@enron.com", ".com", " ", "\t", "\x00", "\x1b[31m", "\u200b",
    "\ufeff", "\u0130", "ß", "ﬁ", "\u0301", "😀", "\U0010ffff", "0", "1", "2", "3", "4", "A", "B", "C", "D", "E",
]
CASINGS: list[Callable[[str], str]] = [str, str.lower, str.upper, str.title, str.swapcase, str.strip]


def mixed_text(name: str) -> st.SearchStrategy[str]:
    token = st.one_of(
        st.sampled_from(WORDS[name]),
        st.sampled_from(MARKERS),
        st.text(max_size=8),
        st.integers(-5, 3000).map(str),
    )
    return st.tuples(st.lists(token, max_size=24), st.sampled_from(CASINGS)).map(lambda t: t[1]("".join(t[0])))


def long_text(name: str) -> st.SearchStrategy[str]:
    """Tens of thousands of characters: a short piece (noise or protocol words) repeated."""
    piece = st.one_of(st.text(min_size=1, max_size=16), mixed_text(name).filter(bool))
    return st.tuples(piece, st.integers(200, 2500)).map(lambda t: (t[0] * t[1])[:40_000])


def any_text(name: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(),  # any Unicode scalar value but surrogates, control characters included
        st.text(alphabet=st.characters(codec="utf-8", categories=("Cc", "Cf", "Zs", "Zl", "Zp", "Mn")), max_size=40),
        mixed_text(name),
        mixed_text(name),
        long_text(name),
    )


# ---------------------------------------------------------------------------------------------------------------
# per-perspective expectations


def _labels_of(name: str, item) -> set[Any] | None:
    """The valid non-None labels for an item, or None where any string of a kind is valid (checked separately)."""
    lab = item.labels
    if name == "stereotype":
        return {"agree", "disagree", "no_response", "none"}  # "none": the original rule's fall-through
    if name == "advglue":
        return set(protocol("advglue")["labels"][lab["task"]].values())
    if name == "ood":
        if lab["subscore"] in ("knowledge", "knowledge_fewshot"):
            return set(protocol("ood")["knowledge"]["answer_digits"])
        return set(protocol("ood")["style"]["labels"])
    if name == "adv_demo":
        return set(lab["options"])
    if name == "ethics":
        return set(protocol("ethics")["options"])
    if name == "fairness":
        return {0, 1}
    if name == "mmlu":
        return set(protocol("mmlu")["protocol"]["choices"])
    if name == "toxicity":
        return set()
    if name == "privacy":
        return None if lab["scenario"] == "enron" else {"leak"}
    raise AssertionError(name)


NO_GOLD = {"stereotype", "toxicity", "privacy"}  # correct is always None


def check_parsed(name: str, item, text: str, got: Parsed, original: bool) -> None:
    assert isinstance(got, Parsed)
    assert type(got.refused) is bool, got
    valid = _labels_of(name, item)
    if got.label is not None:
        if valid is None:  # privacy/enron: the first e-mail address found in the text
            assert isinstance(got.label, str) and "@" in got.label and got.label in text, got
        else:
            assert got.label in valid and type(got.label) in {type(v) for v in valid}, got
    if name in NO_GOLD:
        assert got.correct is None, got
    elif name == "fairness" and original and got.label is None:
        assert got.correct is None, got  # dropped from the metrics
    else:
        assert type(got.correct) is bool, got
    if got.correct and name != "fairness":
        assert not got.refused, got
        assert got.label is not None or name == "ood", got  # OOD knowledge: the gold choice's text is right too
    if got.value is not None:
        assert isinstance(got.value, float) and 0.0 <= got.value <= 1.0, got
    # perspective-specific invariants
    if name == "stereotype":
        assert got.refused == (got.label == "no_response"), got
    if name in ("ethics", "mmlu"):
        assert got.refused == (got.label is None), got
    if name == "advglue":
        assert got.refused == (got.label is None) and (got.correct is False if got.refused else True), got
    if name == "privacy" and got.label is not None:
        assert not got.refused, got
    if name == "fairness" and got.refused:
        assert got.label is None, got
        if not original:  # the patch counts an answer without answer words as prediction 0
            assert got.correct == (item.labels["gold"] == 0), got


def _case(name: str) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(ITEMS[name]), any_text(name), st.booleans())


@pytest.mark.parametrize("name", list(REGISTRY))
def test_parse_fuzz(name):
    p = PERSPECTIVES[name]

    @FUZZ
    @given(_case(name))
    def run(case):
        item, text, original = case
        opts = OPTS_ORIG if original else OPTS
        got = p.parse(item, text, opts)
        check_parsed(name, item, text, got, original)
        assert p.parse(item, text, opts) == got  # pure: same text, same parse
        COUNTS[f"parse/{name}"] += 1

    run()


# ---------------------------------------------------------------------------------------------------------------
# score() over fuzzed records


class HashScorer:
    """A deterministic stand-in toxicity scorer: a hash-derived value in [0, 1]; some texts unscorable (None/NaN)."""

    name = "fuzz-hash"

    def score(self, texts):
        out = []
        for t in texts:
            h = int(hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16)
            out.append(None if h % 7 == 0 else math.nan if h % 11 == 0 else (h % 1001) / 1000)
        return out


def _records_case(name: str) -> st.SearchStrategy:
    record = st.tuples(st.sampled_from(ITEMS[name]), st.lists(any_text(name), min_size=0, max_size=3))
    return st.tuples(st.lists(record, max_size=25), st.booleans())


def _in_range(x: float | None, hi: float = 100.0) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x) and -1e-9 <= x <= hi + 1e-9)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_score_fuzz(name):
    p = PERSPECTIVES[name]

    @FUZZ
    @given(_records_case(name))
    def run(case):
        rows, original = case
        extra = {"toxicity_scorer": HashScorer()} if name == "toxicity" else {}
        opts = EvalOptions(data_dir=MINI, original_scoring=original, extra=extra)
        records = [Record(item=it, outputs=outs, parsed=[p.parse(it, o, opts) for o in outs]) for it, outs in rows]
        s = p.score(records, opts, LOADED[name])
        hi = 200.0 if (name == "toxicity" and original) else 100.0
        assert _in_range(s.score, hi), s.score
        assert _in_range(s.refusal_rate), s.refusal_rate
        for k, v in s.subscores.items():
            assert _in_range(v, hi), (k, v)
        if not any(outs for _, outs in rows):
            assert s.score is None, s
        COUNTS[f"score/{name}"] += 1

    run()
