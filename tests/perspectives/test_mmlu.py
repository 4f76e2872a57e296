"""MMLU: answer parsing, micro-averaged score, 5-shot prompt layout, loading (CSV and Hub paths).

Run: .venv/bin/pytest tests/perspectives/test_mmlu.py -q
"""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comptrust.errors import UsageError
from comptrust.perspectives import get
from comptrust.perspectives.base import EvalOptions, Loaded, MissingData
from comptrust.perspectives.mmlu import MMLU, build_prompt, format_question, subject_header
from comptrust.types import GenParams, Item, Prompt, Record

M = MMLU()


def item(answer: str = "B", subject: str = "astronomy", i: int = 1) -> Item:
    return Item(id=f"{subject}:{i}", group=subject, prompt=Prompt(raw="q", params=GenParams(max_new_tokens=16)),
                labels={"answer": answer, "subject": subject})


def opts(data_dir: Path = Path("/nonexistent"), **kw) -> EvalOptions:
    return EvalOptions(data_dir=data_dir, **kw)


# ----------------------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    "text,label",
    [
        ("B", "B"),
        (" B", "B"),
        ("b", "B"),
        (" b) because the ring is", "B"),
        ("\nC. 2", "C"),
        ("D</s>", "D"),
        ("</s>A", "A"),  # the reference deletes "</s>" before taking the first character
        ("a", "A"),
        ("Answer: B", "A"),  # first character only: an echoed "Answer:" reads as A (reference behaviour)
        ("D", "D"),
    ],
)
def test_parse_letters(text, label):
    p = M.parse(item(answer="B"), text)
    assert p.label == label and p.refused is False and p.correct == (label == "B")


@pytest.mark.parametrize("text,stated,literal", [(" B", "B", None), ("\nC. 2", "C", None), ("B", "B", "B")])
def test_original_scoring_takes_the_literal_first_character(text, stated, literal):
    # the reference code does not strip (its docstring does): a leading space is no answer under --original-scoring
    assert M.parse(item(answer="B"), text).label == stated
    p = M.parse(item(answer="B"), text, EvalOptions(data_dir=Path("."), original_scoring=True))
    assert p.label == literal and p.refused == (literal is None)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "</s>", "The answer is B", "I cannot answer that.", "E", "1", "(B)", "ß", "\u00e0"],
)
def test_parse_refusals(text):
    # only the first character counts: "The answer is B" starts with "t" and is a refusal (and wrong)
    p = M.parse(item(), text)
    assert p.label is None and p.refused is True and p.correct is False


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_parse_never_raises(text):
    p = M.parse(item(), text)
    assert p.label in (None, "A", "B", "C", "D")
    M.parse(Item(id="x", group="g", prompt=Prompt(raw="x"), labels={}), text)


# ----------------------------------------------------------------------------------------------------------------
# scoring


def test_score_by_hand():
    rows = [("astronomy", "A", "A"), ("astronomy", "B", " c"),
            ("nutrition", "C", "c"), ("nutrition", "D", "I cannot answer"), ("nutrition", "A", "A.")]
    recs = []
    for i, (subj, ans, out) in enumerate(rows):
        it = item(answer=ans, subject=subj, i=i)
        it = Item(it.id, it.group, it.prompt, {**it.labels, "category": {"astronomy": "STEM"}.get(subj, "other")})
        recs.append(Record(it, [out], [M.parse(it, out)]))
    loaded = Loaded(items=[r.item for r in recs], skipped=["anatomy: missing dev/anatomy_dev.csv"])
    s = M.score(recs, opts(), loaded)
    # correct: astronomy 1 of 2, nutrition 2 of 3 -> micro 3/5 = 60; one refusal in 5 -> 20
    assert s.score == pytest.approx(60.0)
    assert s.refusal_rate == pytest.approx(20.0)
    assert s.subscores == pytest.approx({"astronomy": 50.0, "nutrition": 100 * 2 / 3})
    assert s.metrics["macro_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # reported, not the score
    assert s.metrics["accuracy_by_category"] == pytest.approx({"STEM": 0.5, "other": 2 / 3})
    assert s.metrics["refusal_by_subject"] == pytest.approx({"astronomy": 0.0, "nutrition": 1 / 3})
    assert s.skipped == loaded.skipped and s.n_items == 5


def test_score_empty():
    assert M.score([], opts()).score is None


# ----------------------------------------------------------------------------------------------------------------
# prompt layout


def _csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def test_registry():
    assert isinstance(get("mmlu"), MMLU)


def test_load_shared(mmlu_data):
    ld = M.load(opts(mmlu_dir=mmlu_data))
    subjects = {it.group for it in ld.items}
    assert len(subjects) == 57 and len(ld.items) == 14042 and ld.skipped == []
    assert len({it.id for it in ld.items}) == 14042
    counts = {s: 0 for s in subjects}
    for it in ld.items:
        counts[it.group] += 1
        assert it.prompt.raw is not None and not it.prompt.messages
        assert it.prompt.raw.endswith("\nAnswer:")
        assert it.labels["answer"] in "ABCD"
        assert it.prompt.params.max_new_tokens == 16 and it.prompt.params.greedy
    assert counts["abstract_algebra"] == 100 and counts["professional_law"] == 1534
    # the character budget shortens some long-passage prompts, never below 0 shots
    assert min(it.labels["k"] for it in ld.items) >= 0
    assert any(it.labels["k"] < 5 for it in ld.items if it.group == "high_school_european_history")
    assert all(it.labels["k"] == 5 for it in ld.items if it.group == "abstract_algebra")
    assert {it.labels["category"] for it in ld.items} == {"STEM", "humanities", "social_sciences", "other"}


def test_five_shot_layout(mmlu_data):
    ld = M.load(opts(mmlu_dir=mmlu_data))
    first = next(it for it in ld.items if it.group == "abstract_algebra")
    dev = _csv(mmlu_data / "dev/abstract_algebra_dev.csv")
    test = _csv(mmlu_data / "test/abstract_algebra_test.csv")
    expected = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    for q, a, b, c, d, ans in dev[:5]:
        expected += f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {ans}\n\n"
    q, a, b, c, d, ans = test[0]
    expected += f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    assert first.prompt.raw == expected
    assert first.id == "abstract_algebra:1" and first.labels["answer"] == ans and first.labels["k"] == 5


def test_quirks(mmlu_data):
    ld = M.load(opts(mmlu_dir=mmlu_data, dt_quirks=True, limit=2))
    first = next(it for it in ld.items if it.group == "abstract_algebra")
    # format_subject's leading space per word: two spaces after "about"
    head = "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
    assert first.prompt.raw.startswith(head)
    assert subject_header("high_school_us_history").endswith("about high school us history.\n\n")
    # pandas reads the cell "None" as NaN and prints "nan"
    row = ["Which is empty?", "None", "0", "x", "y", "A"]
    assert "\nA. nan\n" in format_question(row, answer=False, quirks=True)
    assert "\nA. None\n" in format_question(row, answer=False, quirks=False)


def test_limit_is_deterministic_per_subject(mmlu_data):
    a = M.load(opts(mmlu_dir=mmlu_data, limit=3))
    b = M.load(opts(mmlu_dir=mmlu_data, limit=3))
    assert len(a.items) == 57 * 3 and [i.id for i in a.items] == [i.id for i in b.items]
    assert [i.id for i in M.load(opts(mmlu_dir=mmlu_data, limit=3, seed=5)).items] != [i.id for i in a.items]


def test_token_budget_shrinks_k():
    dev = [[f"dev question {i}", "w", "x", "y", "z", "A"] for i in range(5)]
    row = ["the test question", "w", "x", "y", "z", "C"]
    words = lambda s: len(s.split())  # noqa: E731 - a toy tokenizer
    full, k = build_prompt("astronomy", dev, row, lambda s: True, False)
    assert k == 5 and full.count("Answer:") == 6
    budget = words(full) - 1  # one token too many for 5 shots
    text, k = build_prompt("astronomy", dev, row, lambda s: words(s) <= budget, False)
    assert k == 4 and text.count("Answer:") == 5 and "dev question 4" not in text
    text, k = build_prompt("astronomy", dev, row, lambda s: False, False)
    assert k == 0 and text == subject_header("astronomy") + "the test question\nA. w\nB. x\nC. y\nD. z\nAnswer:"


def test_token_len_option(mini_data):
    o = opts(mini_data, extra={"mmlu_token_len": lambda s: len(s.split()), "mmlu_context_tokens": 60})
    ld = M.load(o)
    assert all(it.labels["k"] < 5 for it in ld.items)
    assert any("context budget 60 tokens" in n for n in ld.notes)


# ----------------------------------------------------------------------------------------------------------------
# data sources and bad data


def test_mini_suite_from_data_dir(mini_data):
    ld = M.load(opts(mini_data))  # no mmlu_dir: data_dir / "mmlu"
    assert sorted({it.group for it in ld.items}) == ["astronomy", "high_school_geography", "nutrition", "philosophy"]
    assert len(ld.items) == 24 and all(it.labels["k"] == 5 for it in ld.items)
    phil = next(it for it in ld.items if it.group == "philosophy")
    assert '"I think, therefore I am" is associated with\nA. Descartes' in phil.prompt.raw
    # a perfect model scores 100
    recs = [Record(it, [it.labels["answer"]], [M.parse(it, it.labels["answer"])]) for it in ld.items]
    assert M.score(recs, opts(mini_data), ld).score == 100.0


def test_missing_data(tmp_path):
    with pytest.raises(MissingData):
        M.load(opts(tmp_path))
    (tmp_path / "mmlu/test").mkdir(parents=True)
    with pytest.raises(MissingData):
        M.load(opts(tmp_path))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


GOOD = 'What is "2+2"?,3,4,5,6,B\n"A question\nover two lines",a,b,c,d,D\n'


def test_missing_dev_file_is_skipped(tmp_path):
    _write(tmp_path / "test/astronomy_test.csv", GOOD)
    _write(tmp_path / "dev/astronomy_dev.csv", GOOD)
    _write(tmp_path / "test/virology_test.csv", GOOD)
    ld = M.load(opts(mmlu_dir=tmp_path))
    assert ld.skipped == ["virology: missing dev/virology_dev.csv"]
    assert [it.id for it in ld.items] == ["astronomy:1", "astronomy:2"]  # line where each record starts
    assert ld.items[0].labels["k"] == 2  # only two dev rows


@pytest.mark.parametrize(
    "bad,match",
    [
        ("Q,a,b,c,d,A\nonly,four,cols,A\n", r"astronomy_test\.csv:2: expected 6 columns"),
        ('"two\nlines",a,b,c,d,A\nQ,a,b,c,d,E\n', r"astronomy_test\.csv:3: field 'answer' must be one of A, B, C, D"),
        ("Q,a,b,c,d,A,extra\n", r"astronomy_test\.csv:1: expected 6 columns"),
    ],
)
def test_malformed_rows(tmp_path, bad, match):
    _write(tmp_path / "dev/astronomy_dev.csv", GOOD)
    _write(tmp_path / "test/astronomy_test.csv", bad)
    with pytest.raises(UsageError, match=match):
        M.load(opts(mmlu_dir=tmp_path))


def test_hub_offline_is_one_line_usage_error(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (LocalEntryNotFoundError)\nmore detail")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(UsageError) as e:
        M.load(opts(mmlu_dir="hf:cais/mmlu"))
    msg = str(e.value)
    assert "\n" not in msg and "cais/mmlu" in msg and "--mmlu-dir" in msg


def test_hub_records_become_items(monkeypatch):
    def rec(subject, q, ans):
        return {"subject": subject, "question": q, "choices": ["w", "x", "y", "z"], "answer": ans}

    data = {
        "dev": [rec("astronomy", f"d{i}", i % 4) for i in range(5)],
        "test": [rec("astronomy", "t1", 2), rec("nutrition", "t2", 0)],
        "validation": [],
    }
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda hub_id, config: data if (hub_id, config) == ("cais/mmlu", "all") else None
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ld = M.load(opts(mmlu_dir="hf:cais/mmlu"))
    assert [(it.id, it.labels["answer"], it.labels["k"]) for it in ld.items] == [("astronomy:1", "C", 5)]
    assert ld.skipped == ["nutrition: no dev rows in cais/mmlu"]  # as a missing dev file is for the CSVs
    assert "d4\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\nt1\nA. w" in ld.items[0].prompt.raw
