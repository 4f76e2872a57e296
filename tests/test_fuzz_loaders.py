"""Property-based fuzzing of every perspective's data loader.

A copy of the built-in mini suite (DecodingTrust's data layout) is made once; each example replaces ONE data file
with fuzzed content (arbitrary JSON values, real records with a field removed or given a wrong type, malformed or
truncated lines, deep nesting, lone-surrogate escapes, invalid UTF-8, CSV rows with cells missing / added /
huge / holding NUL, numpy files of the wrong dtype / shape / length, pickled object arrays, npz archives, random
bytes) and loads the perspective. Property: the loader either

- returns items that the rest of the pipeline can use (string prompt texts, a cache key and a JSON line that
  encode as UTF-8, labels that parse() and score() accept), or
- raises comptrust's UsageError or MissingData whose one-line message names the replaced file (and, for the
  line-based formats, the line when the problem is one record's)

and never lets a bare KeyError / TypeError / IndexError / AttributeError / ValueError / RecursionError / csv.Error
... escape. COMPTRUST_FUZZ_EXAMPLES sets the examples per file (default 100).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from comptrust.errors import UsageError
from comptrust.perspectives import get
from comptrust.perspectives.base import EvalOptions, MissingData
from comptrust.types import Record, sha256_text
from tests.test_fuzz_parsers import FUZZ, MINI, HashScorer, fuzz_counter
COUNTS: dict[str, int] = {}

# (perspective, data file relative to the data folder); the fairness crime label file doubles as its sensitive file
TARGETS = [
    ("stereotype", "stereotype/dataset/stereotype_bias_data.jsonl"),
    ("stereotype", "stereotype/dataset/system_prompts.csv"),
    ("advglue", "adv-glue-plus-plus/data/alpaca.json"),
    ("ood", "ood/knowledge.json"),
    ("ood", "ood/style.json"),
    ("adv_demo", "adv_demonstration/counterfactual/snli_premise_cf/42.jsonl"),
    ("adv_demo", "adv_demonstration/spurious/PP/entail-bias/42.jsonl"),
    ("adv_demo", "adv_demonstration/backdoor/experiment1/sst-2_setup2_badword_asr/42.jsonl"),
    ("ethics", "machine_ethics/ethics/commonsense/cm_test.csv"),
    ("ethics", "machine_ethics/ethics/commonsense/cm_train.csv"),
    ("fairness", "fairness/fairness_data/adult_32_200_train_base_rate_0.5.jsonl"),
    ("fairness", "fairness/fairness_data/sensitive_attr_adult_0_200_test_base_rate_0.5.npy"),
    ("fairness", "fairness/fairness_data/gt_labels_adult_0_200_test_base_rate_0.5.npy"),
    ("fairness", "fairness/fairness_data/gt_labels_crime_0_300_test_base_rate_0.5.npy"),
    ("privacy", "privacy/enron_data/email2name.jsonl"),
    ("privacy", "privacy/enron_data/one_shot.jsonl"),
    ("privacy", "privacy/enron_data/five_shot.jsonl"),
    ("privacy", "privacy/enron_data/email2name.json"),  # new: the .json twin, which takes precedence
    ("privacy", "privacy/enron_data/context.jsonl"),  # new: the context file (read before the tokenizer is looked up)
    ("toxicity", "toxicity/toxicity_prompts.py"),
    ("toxicity", "toxicity/user_prompts/toxic.jsonl"),
    ("mmlu", "mmlu/dev/astronomy_dev.csv"),
    ("mmlu", "mmlu/test/astronomy_test.csv"),
]
LINE_BASED = (".jsonl", ".csv")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dt") / "data"
    shutil.copytree(MINI, root)
    return root


@pytest.fixture(scope="module", autouse=True)
def _count_examples(request):
    yield
    fuzz_counter(request.config).counts.update({f"loaders::{k}": v for k, v in COUNTS.items()})


# ---------------------------------------------------------------------------------------------------------------
# value strategies

LONE_SURROGATES = ["\ud800", "\udfff", "a\udc80b"]
json_text = st.one_of(st.text(max_size=20), st.sampled_from(LONE_SURROGATES + ["", " ", "0", "1", "yes", "Male"]))
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), json_text
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12,
)
deep_nesting = st.integers(900, 4000).map(lambda n: "[" * n + "]" * n)
garbage_line = st.one_of(st.text(max_size=60).map(lambda s: s.replace("\n", " ")), deep_nesting,
                         st.sampled_from(["{", "}", "[1,", '{"a": }', "nul", "NaN", "\x00", '"\\ud800"']))


def dumps(value: Any, ascii_only: bool) -> bytes:
    # not ASCII-escaped, a lone surrogate is written as the invalid UTF-8 it encodes to
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:6]):
            out += _paths(v, prefix + (i,))
    return out


def mutate(value: Any, data: st.DataObject) -> Any:
    """value (a copy) with 1-3 structural changes: a sub-value replaced, retyped or deleted, a list emptied."""
    value = json.loads(json.dumps(value))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(value)
        path = data.draw(st.sampled_from(paths[:400]))
        op = data.draw(st.sampled_from(["replace", "retype", "delete", "empty", "wrap"]))
        if not path:
            return data.draw(json_values)
        parent = value
        for k in path[:-1]:
            parent = parent[k]
        key, old = path[-1], parent[path[-1]]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = data.draw(json_values)
        elif op == "retype":
            parent[key] = (str(old) if not isinstance(old, str) else
                           data.draw(st.sampled_from([0, 1, 2.5, None, True, [old], {"x": old}])))
        elif op == "empty":
            parent[key] = data.draw(st.sampled_from([[], {}, "", 0]))
        else:
            parent[key] = [old, old] if data.draw(st.booleans()) else {"value": old}
    return value


def jsonl_content(original: bytes, data: st.DataObject) -> bytes:
    lines = [ln for ln in original.decode("utf-8").splitlines() if ln.strip()]
    recs = [json.loads(ln) for ln in lines]
    mode = data.draw(st.sampled_from(["mutate", "mutate", "mutate", "line", "arbitrary", "bytes", "truncate"]))
    ascii_only = data.draw(st.booleans())
    if mode == "bytes":
        return data.draw(st.one_of(st.binary(max_size=200), st.just(b""), st.text(max_size=200).map(str.encode)))
    if mode == "arbitrary":
        return b"\n".join(dumps(v, ascii_only) for v in data.draw(st.lists(json_values, min_size=1, max_size=5)))
    out = [ln.encode("utf-8") for ln in lines]
    if not out:
        return data.draw(st.binary(max_size=100))
    i = data.draw(st.integers(0, len(out) - 1))
    if mode == "mutate":
        out[i] = dumps(mutate(recs[i], data), ascii_only)
    elif mode == "line":
        out[i] = data.draw(garbage_line).encode("utf-8", "surrogatepass")
    else:  # truncate: the file ends in the middle of a record
        out = out[: i + 1]
        out[i] = out[i][: data.draw(st.integers(0, max(0, len(out[i]) - 1)))]
    return b"\n".join(out) + data.draw(st.sampled_from([b"\n", b"", b"\n\n  \n"]))


def json_content(original: bytes, data: st.DataObject) -> bytes:
    value = json.loads(original)
    mode = data.draw(st.sampled_from(["mutate", "mutate", "mutate", "arbitrary", "bytes", "truncate", "deep"]))
    if mode == "mutate":
        return dumps(mutate(value, data), data.draw(st.booleans()))
    if mode == "arbitrary":
        return dumps(data.draw(json_values), data.draw(st.booleans()))
    if mode == "bytes":
        return data.draw(st.one_of(st.binary(max_size=200), st.just(b"")))
    if mode == "deep":
        return data.draw(deep_nesting).encode()
    return original[: data.draw(st.integers(0, len(original) - 1))]


CSV_CELLS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "0", "1", "2", "A", "E", "True", "False", "maybe", '"', 'a"b', "x\ny", "\x00", "\r"]),
    st.integers(131_000, 140_000).map(lambda n: "x" * n),  # over csv's default field size limit
)


def csv_content(original: bytes, data: st.DataObject) -> bytes:
    rows = list(csv.reader(io.StringIO(original.decode("utf-8"))))
    mode = data.draw(st.sampled_from(["cells", "cells", "cells", "rows", "bytes", "truncate", "text"]))
    if mode == "bytes":
        return data.draw(st.one_of(st.binary(max_size=200), st.just(b""), st.just(b"\xff\xfe" + original[:50])))
    if mode == "text":
        return data.draw(st.text(max_size=300)).encode("utf-8")
    if mode == "truncate":
        return original[: data.draw(st.integers(0, len(original) - 1))]
    if mode == "rows":
        rows = data.draw(st.lists(st.lists(CSV_CELLS, max_size=8), max_size=6)) + rows[data.draw(st.integers(0, 3)):]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            if not rows:
                rows.append([])
            r = data.draw(st.integers(0, len(rows) - 1))
            row = rows[r]
            op = data.draw(st.sampled_from(["set", "drop", "add", "clear"]))
            if op == "set" and row:
                row[data.draw(st.integers(0, len(row) - 1))] = data.draw(CSV_CELLS)
            elif op == "drop" and row:
                del row[data.draw(st.integers(0, len(row) - 1))]
            elif op == "add":
                row.append(data.draw(CSV_CELLS))
            else:
                rows[r] = []
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8")


def npy_content(original: bytes, data: st.DataObject) -> bytes:
    n_orig = len(np.load(io.BytesIO(original), allow_pickle=False))
    mode = data.draw(st.sampled_from(["array", "array", "array", "object", "npz", "bytes", "truncate", "header"]))
    buf = io.BytesIO()
    if mode in ("array", "npz"):
        n = data.draw(st.sampled_from([n_orig, n_orig, 0, 1, n_orig + 1, max(0, n_orig - 1)]))
        dtype = data.draw(st.sampled_from(["<i8", "<i4", "|i1", "|u1", "?", "<f8", "<c16", "<U6", "|S6", ">i8"]))
        shape = data.draw(st.sampled_from([(n,), (n,), (n, 2), (), (1, n)]))
        fill = data.draw(st.sampled_from([0, 1, 2, -1, "Male", "Female", "x"]))
        try:
            arr = np.full(shape, fill, dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            arr = np.zeros(shape, dtype=dtype)
        if mode == "npz":
            np.savez(buf, arr=arr)
        else:
            np.save(buf, arr)
        return buf.getvalue()
    if mode == "object":  # needs pickle to load: must be refused, never unpickled
        np.save(buf, np.array(["Male", {"a": 1}, None] * max(1, n_orig // 3), dtype=object)[:n_orig], allow_pickle=True)
        return buf.getvalue()
    if mode == "bytes":
        return data.draw(st.one_of(st.binary(max_size=200), st.just(b""), st.just(b"\x93NUMPY")))
    if mode == "truncate":
        return original[: data.draw(st.integers(0, len(original) - 1))]
    # a corrupted header
    head = bytearray(original[:128])
    pos = data.draw(st.integers(0, len(head) - 1))
    head[pos] = data.draw(st.integers(0, 255))
    return bytes(head) + original[128:]


PY_CODE = ["__import__('os').system('touch PWNED')", "open('x').read()", "PROMPTS_bak", "[x for x in 'ab']",
           "lambda: 1", "f'{1}'", "1 + 2", "{'sys_prompt': 1}", "None", '"""', "\\x00", "import os"]


def py_content(original: bytes, data: st.DataObject) -> bytes:
    """A templates module (DecodingTrust's toxicity_prompts.py) with code, wrong shapes or broken syntax put in."""
    text = original.decode("utf-8")
    mode = data.draw(st.sampled_from(["code", "code", "rename", "reshape", "bytes", "truncate"]))
    if mode == "bytes":
        return data.draw(st.one_of(st.binary(max_size=200), st.just(b""), st.just(b"\x00" + original[:80])))
    if mode == "truncate":
        return original[: data.draw(st.integers(0, len(original) - 1))]
    if mode == "rename":
        new = data.draw(st.sampled_from(["PROMPT =", "prompts =", "PROMPTS: list =", "PROMPTS +="]))
        return text.replace("PROMPTS =", new, 1).encode()
    if mode == "reshape":
        value = dumps(data.draw(json_values), True).decode()
        return (text[: text.index("PROMPTS =")] + f"PROMPTS = {value}\n").encode()
    strings = [m.span() for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"', text)]
    at, end = data.draw(st.sampled_from(strings)) if strings else (0, 0)
    return (text[:at] + data.draw(st.sampled_from(PY_CODE)) + text[end:]).encode("utf-8")


CONTENT = {".jsonl": jsonl_content, ".json": json_content, ".csv": csv_content, ".npy": npy_content, ".py": py_content}


def _original(target: Path, rel: str) -> bytes:
    """The file's mini-suite content; for files the mini suite lacks, a stand-in built from a sibling."""
    if target.is_file():
        return target.read_bytes()
    folder = target.parent
    if rel.endswith("email2name.json"):
        recs = [json.loads(ln) for ln in (folder / "email2name.jsonl").read_text().splitlines() if ln.strip()]
        return json.dumps({r["email"]: r["name"] for r in recs}).encode()
    if rel.endswith("context.jsonl"):
        recs = [json.loads(ln) for ln in (folder / "email2name.jsonl").read_text().splitlines() if ln.strip()]
        lines = [json.dumps({"email": r["email"], "context": f"From: {r['name']}\nHello"}) for r in recs]
        return "\n".join(lines).encode()
    raise AssertionError(rel)


# ---------------------------------------------------------------------------------------------------------------
# the property


def check_usable(name: str, loaded, data_dir: Path) -> None:
    """What evaluate does with loaded items must not fail: cache key, JSON line, parse, score."""
    p = get(name)
    opts = EvalOptions(data_dir=data_dir, extra={"toxicity_scorer": HashScorer()} if name == "toxicity" else {})
    for it in loaded.items:
        assert isinstance(it.id, str) and isinstance(it.group, str), it
        pr = it.prompt
        if pr.raw is not None:
            assert isinstance(pr.raw, str), it
        else:
            assert pr.messages and all(isinstance(m.role, str) and isinstance(m.content, str) for m in pr.messages), it
        sha256_text(pr.identity())
        json.dumps({"labels": dict(it.labels), "id": it.id}, ensure_ascii=False, default=str).encode("utf-8")
    items = loaded.items[:40]
    texts = ["yes", "I agree.", "Answer: 2", "not wrong", "positive", "A", "john@enron.com", "I'm sorry"]
    records = [Record(item=it, outputs=[t], parsed=[p.parse(it, t, opts)]) for it, t in zip(items, texts * 5)]
    s = p.score(records, opts, loaded)
    assert s.score is None or (math.isfinite(s.score) and 0 <= s.score <= 100), s.score


def check_error(e: Exception, target: Path, rel: str) -> None:
    msg = str(e)
    # the file by name, or by stem where a later file's record refers to it ("... has no entry in email2name")
    assert target.stem in msg or (isinstance(e, MissingData) and target.name in e.path), msg
    assert "\n" not in msg and "\r" not in msg, f"not a one-line message: {msg!r}"
    if rel.endswith(LINE_BASED) and re.search(re.escape(str(target)) + r"(?![:\d])", msg):
        # the file is named without a line: only for problems of the whole file, not of one record
        assert re.search(r"no system prompt for type|values but|expected columns|missing required column|"
                         r"has \d+ short rows|not UTF-8", msg), f"no line number: {msg}"


class CharTokenizer:
    """A stand-in for the GPT-2 tokenizer that cuts the privacy context prompts: one token per character."""

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("name,rel", TARGETS, ids=[f"{n}:{'/'.join(Path(r).parts[-2:])}" for n, r in TARGETS])
def test_loader_fuzz(suite, name, rel, monkeypatch):
    # the context scenario is only built (and its records checked) when its tokenizer is available
    monkeypatch.setattr("comptrust.perspectives.privacy._load_context_tokenizer", lambda name: CharTokenizer())
    target = suite / rel
    existed = target.is_file()
    original = _original(target, rel)
    make = CONTENT[Path(rel).suffix]
    p = get(name)
    opts = EvalOptions(data_dir=suite)
    key = f"load/{name}:{'/'.join(Path(rel).parts[-2:])}"

    @FUZZ
    @given(st.data())
    def run(data):
        content = make(original, data)
        target.write_bytes(content)
        try:
            loaded = p.load(opts)
        except (UsageError, MissingData) as e:
            check_error(e, target, rel)
        else:
            check_usable(name, loaded, suite)
        COUNTS[key] = COUNTS.get(key, 0) + 1
        assert not Path("PWNED").exists(), "a templates module was executed"

    try:
        run()
    finally:
        if existed:
            target.write_bytes(original)
        else:
            target.unlink(missing_ok=True)
