"""Benign MMLU accuracy, the reference point for how much a compressed model still knows (DecodingTrust notes §9).

As comp-trust runs it: a raw-text (no chat template) 5-shot prompt from the subject's dev split, greedy generation of
16 tokens, and the first character of the answer as the prediction. An answer that does not start with A-D is a
"refusal" and counts as wrong. Score = 100 x accuracy micro-averaged over all questions.

Data: the hendrycks CSV release (dev/{subject}_dev.csv, test/{subject}_test.csv; no header; question, A, B, C, D,
answer) from opts.mmlu_dir, else data_dir/mmlu; or the Hub copy (cais/mmlu) when mmlu_dir is "hf:cais/mmlu".

Context budget: the reference drops demonstrations while the prompt is longer than 2048 GPT-2 tokens. A
token-length function can be passed as opts.extra["mmlu_token_len"] (budget opts.extra["mmlu_context_tokens"],
default 2048); without one the budget is 4 characters per token, i.e. 8192 characters.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import Field, field_validator

from comptrust.errors import UsageError
from comptrust.perspectives.base import (
    EvalOptions,
    Loaded,
    MissingData,
    Perspective,
    PerspectiveArgs,
    protocol,
    subsample,
)
from comptrust.types import GenParams, Item, Parsed, Prompt, Record, Score

Row = list[str]  # question, A, B, C, D, answer letter


@lru_cache(maxsize=1)
def _proto() -> dict[str, Any]:
    return protocol("mmlu")


@lru_cache(maxsize=1)
def _category_of() -> dict[str, str]:
    return {s: cat for cat, subjects in _proto()["categories"].items() for s in subjects}


# ----------------------------------------------------------------------------------------------------------------
# reading


def read_csv_rows(path: Path) -> list[tuple[int, Row]]:
    """(first line of the record, row) for every record; a bad record is a UsageError naming file, line, field."""
    choices = _proto()["protocol"]["choices"]
    out = []
    try:
        # utf-8-sig: a byte-order mark (Excel's UTF-8 export) would otherwise start every first question with U+FEFF
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            start = 1
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    start = reader.line_num + 1
                    continue
                if len(row) != len(choices) + 2:
                    raise UsageError(
                        f"{path}:{start}: expected {len(choices) + 2} columns (question, "
                        f"{', '.join(choices)}, answer), got {len(row)}"
                    )
                if row[-1].strip() not in choices:
                    raise UsageError(
                        f"{path}:{start}: field 'answer' must be one of {', '.join(choices)}, got {row[-1]!r}"
                    )
                out.append((start, [*row[:-1], row[-1].strip()]))
                start = reader.line_num + 1
    except csv.Error as e:
        raise UsageError(f"{path}:{start}: malformed CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason})") from None
    return out


def _hub_data(hub_id: str) -> dict[str, dict[str, list[tuple[int, Row]]]]:
    """{subject: {"dev": rows, "test": rows}} from the Hub copy (fields question, subject, choices, answer index)."""
    p = _proto()["protocol"]
    letters = p["choices"]
    try:
        from datasets import load_dataset
    except ImportError:
        raise UsageError("loading MMLU from the Hub needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = load_dataset(hub_id, p["hub_config"])
    except Exception as e:  # offline, unknown id, gated, ...: one clear line
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"could not load MMLU from the Hugging Face Hub ({hub_id}): {first}; "
            "pass --mmlu-dir with the CSV release (dev/ and test/) instead"
        ) from None
    out: dict[str, dict[str, list[tuple[int, Row]]]] = defaultdict(lambda: {"dev": [], "test": []})
    for split in ("dev", "test"):
        if split not in ds:
            raise UsageError(f"{hub_id}: no '{split}' split")
        for i, rec in enumerate(ds[split], 1):
            try:
                subject, q, ch, ans = rec["subject"], rec["question"], list(rec["choices"]), int(rec["answer"])
            except (KeyError, TypeError, ValueError) as e:
                raise UsageError(f"{hub_id} {split} row {i}: missing or bad field ({e})") from None
            if len(ch) != len(letters) or not 0 <= ans < len(letters):
                raise UsageError(f"{hub_id} {split} row {i}: expected {len(letters)} choices and an answer index")
            out[subject][split].append((len(out[subject][split]) + 1, [q, *map(str, ch), letters[ans]]))
    return dict(out)


# ----------------------------------------------------------------------------------------------------------------
# prompt building


def subject_header(subject: str, quirks: bool = False) -> str:
    words = subject.split("_")
    # reference quirk: every word gets a leading space, so the header reads "about  abstract algebra."
    name = "".join(" " + w for w in words) if quirks else " ".join(words)
    return _proto()["header"].format(subject=name)


def format_question(row: Row, answer: bool, quirks: bool = False) -> str:
    p = _proto()
    na = set(p["pandas_na_cells"]) if quirks else set()

    def cell(x: str) -> str:
        return "nan" if x in na else x

    text = cell(row[0])
    for letter, choice in zip(p["protocol"]["choices"], row[1:-1]):
        text += p["choice_line"].format(letter=letter, text=cell(choice))
    text += p["answer_cue"]
    if answer:
        text += p["shot_answer"].format(answer=row[-1])
    return text


def length_check(opts: EvalOptions) -> tuple[Callable[[str], bool], str]:
    """fits(prompt) and a description of the budget used."""
    p = _proto()["protocol"]
    tokens = int(opts.extra.get("mmlu_context_tokens", p["context_tokens"]))
    token_len = opts.extra.get("mmlu_token_len")
    if callable(token_len):
        return (lambda s: token_len(s) <= tokens), f"{tokens} tokens"
    chars = tokens * int(p["chars_per_token"])
    return (lambda s: len(s) <= chars), f"{chars} characters ({tokens} tokens x {p['chars_per_token']} chars/token)"


def build_prompt(subject: str, dev: list[Row], row: Row, fits: Callable[[str], bool], quirks: bool) -> tuple[str, int]:
    """(prompt, k): k demonstrations, k shrinking from ntrain while the prompt does not fit (never below 0)."""
    end = format_question(row, answer=False, quirks=quirks)
    k = min(_proto()["protocol"]["ntrain"], len(dev))
    while True:
        text = subject_header(subject, quirks) + "".join(format_question(d, True, quirks) for d in dev[:k]) + end
        if k == 0 or fits(text):
            return text, k
        k -= 1


# ----------------------------------------------------------------------------------------------------------------


class MMLUArgs(PerspectiveArgs):
    mmlu_context_tokens: int | None = Field(None, description="mmlu: context budget in tokens for the 5-shot prompt")

    @field_validator("mmlu_context_tokens")
    @classmethod
    def _positive_tokens(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v


class MMLU(Perspective):
    name = "mmlu"
    lite_limit = 2  # items per sub-scenario in the lite profile
    Args = MMLUArgs
    title = "MMLU (benign accuracy)"
    short_title = "MMLU"
    description = (
        'MMLU 57 subjects, 5-shot, generative (the first letter of the answer): benign accuracy, not '
        "lm-eval's log-likelihood mmlu"
    )
    version = 1

    def _source(self, opts: EvalOptions) -> tuple[dict[str, dict[str, list[tuple[int, Row]]]], list[str], str]:
        """(per-subject dev/test rows, skipped parts, where from)."""
        spec = str(opts.mmlu_dir) if opts.mmlu_dir is not None else None
        if spec is not None and spec.startswith("hf:"):
            hub_id = spec[3:] or _proto()["protocol"]["hub_id"]
            hub = _hub_data(hub_id)
            no_dev = sorted(s for s, d in hub.items() if not d["dev"])
            data = {s: d for s, d in hub.items() if d["dev"] and d["test"]}
            return data, [f"{s}: no dev rows in {hub_id}" for s in no_dev], f"hub:{hub_id}"
        root = Path(opts.mmlu_dir) if opts.mmlu_dir is not None else opts.data_dir / "mmlu"
        test_dir = root / "test"
        if not test_dir.is_dir():
            raise MissingData(test_dir, "MMLU test split")
        tests = sorted(test_dir.glob("*_test.csv"))
        if not tests:
            raise MissingData(test_dir / "{subject}_test.csv", "no MMLU test files")
        data: dict[str, dict[str, list[tuple[int, Row]]]] = {}
        skipped = []
        for t in tests:
            subject = t.name[: -len("_test.csv")]
            dev = root / "dev" / f"{subject}_dev.csv"
            if not dev.is_file():
                skipped.append(f"{subject}: missing dev/{dev.name}")
                continue
            data[subject] = {"dev": read_csv_rows(dev), "test": read_csv_rows(t)}
        return data, skipped, str(root)

    def load(self, opts: EvalOptions) -> Loaded:
        p = _proto()["protocol"]
        data, skipped, where = self._source(opts)
        fits, budget = length_check(opts)
        params = GenParams(max_new_tokens=p["max_new_tokens"], temperature=p["temperature"], seed=opts.seed)
        items: list[Item] = []
        short = 0
        for subject in sorted(data):
            dev = [r for _, r in data[subject]["dev"][: p["ntrain"]]]
            test = data[subject]["test"]
            rows = subsample(test, opts.limit, key=lambda lr, s=subject: f"{s}:{lr[0]}", seed=opts.seed)
            for lineno, row in rows:
                text, k = build_prompt(subject, dev, row, fits, opts.dt_quirks)
                short += k < p["ntrain"]
                items.append(
                    Item(
                        id=f"{subject}:{lineno}",
                        group=subject,
                        prompt=Prompt(raw=text, params=params),
                        labels={"answer": row[-1], "subject": subject,
                                "category": _category_of().get(subject, "unlisted"), "k": k},
                    )
                )
        notes = [f"source {where}; context budget {budget}"]
        if short:
            notes.append(f"{short} question(s) got fewer than {p['ntrain']} demonstrations to fit the budget")
        return Loaded(items=items, skipped=skipped, notes=notes)

    def parse(self, item: Item, text: str, opts: EvalOptions | None = None) -> Parsed:
        """The prediction is the answer's first character, upper-cased, when it is one of A-D.

        deviation: the reference script's docstring says the answer is read after stripping whitespace, its code
        does not strip; with models whose every answer starts with a space (SmolLM2 after "Answer:") the literal
        code scores 0%. The stated rule is the default; --original-scoring takes the literal first character.
        """
        literal = bool(opts and opts.original_scoring)
        s = text.replace("</s>", "").lower() if isinstance(text, str) else ""
        s = s if literal else s.strip()
        pred = s[0].upper() if s else None
        if pred not in _proto()["protocol"]["choices"]:
            pred = None
        answer = (item.labels or {}).get("answer")
        return Parsed(label=pred, refused=pred is None, correct=pred is not None and pred == answer)

    def score(self, records: Sequence[Record], opts: EvalOptions, loaded: Loaded | None = None) -> Score:
        skipped = list(loaded.skipped) if loaded else []
        per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # correct, refused, total
        cats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in records:
            cat = r.item.labels.get("category") or _category_of().get(r.item.group, "unlisted")
            for pr in r.parsed:
                c = per[r.item.group]
                c[0] += bool(pr.correct)
                c[1] += pr.label is None
                c[2] += 1
                cats[cat][0] += bool(pr.correct)
                cats[cat][1] += 1
        total = sum(c[2] for c in per.values())
        if not total:
            return self.make_score(records, score=None, refusal_rate=None, notes=["no items"], skipped=skipped)
        correct = sum(c[0] for c in per.values())
        refused = sum(c[1] for c in per.values())
        subj_acc = {s: c[0] / c[2] for s, c in sorted(per.items()) if c[2]}
        return self.make_score(
            records,
            score=100 * correct / total,
            refusal_rate=100 * refused / total,
            subscores={s: 100 * a for s, a in subj_acc.items()},
            metrics={
                "accuracy": correct / total,
                "refusal": refused / total,
                "n_questions": total,
                "macro_accuracy": sum(subj_acc.values()) / len(subj_acc),
                "accuracy_by_category": {k: v[0] / v[1] for k, v in sorted(cats.items()) if v[1]},
                "refusal_by_subject": {s: c[1] / c[2] for s, c in sorted(per.items()) if c[2]},
                "n_by_subject": {s: c[2] for s, c in sorted(per.items())},
            },
            skipped=skipped,
            options={"dt_quirks": opts.dt_quirks},
        )
