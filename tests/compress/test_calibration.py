"""Calibration sources, chat-template rendering, seeded sampling, and bad files."""

import json

import pytest

from comptrust.compress.calibration import BUILTIN_FILE, load_calibration, read_jsonl
from comptrust.errors import UsageError
from tests.compress import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_builtin_set_is_chat_templated(tok):
    records = read_jsonl(BUILTIN_FILE)
    assert len(records) >= 150
    assert all(len(r["messages"]) == 2 for r in records)
    c = load_calibration(None, tok, n=16, seq_len=64, seed=0)
    assert c.n == 16 and c.chat_template and c.kind == "builtin"
    assert all(t.startswith("<|im_start|>user\n") for t in c.texts)
    assert all(len(x) <= 64 for x in c.input_ids)


def test_seed_determinism(tok):
    a = load_calibration(None, tok, n=32, seq_len=64, seed=0)
    b = load_calibration(None, tok, n=32, seq_len=64, seed=0)
    c = load_calibration(None, tok, n=32, seq_len=64, seed=1)
    assert a.indices == b.indices and a.input_ids == b.input_ids and a.sha256() == b.sha256()
    assert a.indices != c.indices and a.sha256() != c.sha256()


def test_n_larger_than_set_uses_all(tok, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one sample"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    c = load_calibration(str(f), tok, n=128, seq_len=32, seed=0)
    assert c.n == 2 and c.n_available == 2 and c.kind == "jsonl"
    assert sorted(c.texts)[0].startswith("<|im_start|>user") and "one sample" in c.texts


def test_plain_text_blocks(tok, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("first block\nstill first\n\n\nsecond block\n")
    c = load_calibration(str(f), tok, n=10, seq_len=32, seed=0)
    assert sorted(c.texts) == ["first block\nstill first", "second block"] and not c.chat_template


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"text": "ok"}\n{"text": "broken"\n', ":2: malformed JSON"),
        ('{"text": "ok"}\n["a list"]\n', ":2: expected an object"),
        ('{"messages": [{"role": "user"}]}\n', ":1: each message needs"),
        ('{"text": "   "}\n', ":1: \"text\" is empty"),
    ],
)
def test_bad_jsonl_names_file_and_line(tok, tmp_path, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(UsageError) as e:
        load_calibration(str(f), tok, n=4, seq_len=32, seed=0)
    assert str(f) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_empty_text_file(tok, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n\n ")
    with pytest.raises(UsageError, match="empty"):
        load_calibration(str(f), tok, n=4, seq_len=32, seed=0)


def test_hub_dataset_offline_is_a_usage_error(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match="cannot load this Hub dataset") as e:
        load_calibration("nobody-here/no-such-dataset:train", tok, n=4, seq_len=32, seed=0)
    assert "\n" not in str(e.value)


def test_unknown_source(tok):
    with pytest.raises(UsageError, match="no such file"):
        load_calibration("./missing.jsonl", tok, n=4, seq_len=32, seed=0)


def test_builtin_file_is_valid_jsonl():
    for line in BUILTIN_FILE.read_text().splitlines():
        rec = json.loads(line)
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]


ALPACA = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
]


def test_alpaca_records_become_chat_templated_conversations(tok, tmp_path):
    f = tmp_path / "alpaca.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    c = load_calibration(str(f), tok, n=2, seq_len=128, seed=0)
    assert c.chat_template and c.n == 2
    by_text = {t for t in c.texts}
    assert any("<|im_start|>user\nTranslate to French.\n\nGood morning<|im_end|>" in t and "Bonjour" in t for t in by_text)
    assert any("<|im_start|>user\nName a primary colour.<|im_end|>" in t for t in by_text)  # no empty input line


def test_alpaca_columns_of_a_hub_dataset(tok, monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({k: [r[k] for r in ALPACA] for k in ("instruction", "input", "output")})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds)
    c = load_calibration("tatsu-lab/alpaca", tok, n=2, seq_len=128, seed=0)
    assert c.kind == "hub" and c.chat_template and any("Bonjour" in t for t in c.texts)


@pytest.mark.parametrize("rec,needle", [({"instruction": "", "output": "x"}, '"instruction" is empty'),
                                        ({"instruction": "a", "input": 3}, "must be strings")])
def test_bad_alpaca_record_names_file_and_line(tok, tmp_path, rec, needle):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(UsageError, match=needle) as e:
        load_calibration(str(f), tok, n=1, seq_len=32, seed=0)
    assert f"{f}:1" in str(e.value)


def test_batched_set_is_the_unbatched_tokens_grouped_and_cut(tok):
    """--calib-batch B: the same samples, longest first, each cut to its run of B's shortest (no padding)."""
    one = load_calibration(None, tok, n=40, seq_len=512, seed=3)
    b = load_calibration(None, tok, n=40, seq_len=512, seed=3, batch=8)
    assert one.batch == 1 and b.batch == 8 and b.describe()["batch"] == 8
    assert sorted(b.indices) == sorted(one.indices)
    by_index = dict(zip(one.indices, one.input_ids))
    for i, ids in zip(b.indices, b.input_ids):
        assert ids == by_index[i][: len(ids)]  # a prefix of the sample: tails cut, nothing added
    lens = [len(x) for x in b.input_ids]
    runs = [lens[k : k + 8] for k in range(0, len(lens), 8)]
    assert all(len(set(r)) == 1 for r in runs)  # every forward is rectangular
    assert [r[0] for r in runs] == sorted((r[0] for r in runs), reverse=True)
    assert b.meta["tokens_before_batching"] == one.n_tokens > b.n_tokens
    # each run keeps its shortest sample whole
    for k in range(0, len(lens), 8):
        assert min(len(by_index[i]) for i in b.indices[k : k + 8]) == lens[k]


def test_batch_of_one_changes_nothing(tok):
    a = load_calibration(None, tok, n=16, seq_len=64, seed=0)
    b = load_calibration(None, tok, n=16, seq_len=64, seed=0, batch=1)
    assert a.input_ids == b.input_ids and a.indices == b.indices and "tokens_before_batching" not in b.meta
