"""Calibration data for GPTQ, AWQ, SparseGPT and Wanda: which texts, how they are rendered, how they are sampled.

``--calibration`` accepts, tried in this order:
  (unset) or "default"  the built-in set: 152 short instruction/response conversations written for comptrust
                        (data/calibration.jsonl), rendered with the model's chat template
  path/to/file.jsonl    one JSON object per line: {"messages": [{"role": ..., "content": ...}, ...]} or Alpaca's
                        {"instruction", "input", "output"} (both rendered with the chat template), or
                        {"text": "..."} (used as is)
  path/to/file.txt      plain text; blank lines separate samples
  org/name[:split]      a Hugging Face Hub dataset (``datasets.load_dataset``; split "train" by default) with a
                        "messages", Alpaca "instruction"/"input"/"output", or "text" column

Sampling is deterministic: ``random.Random(seed)`` picks ``n`` distinct records (all of them when fewer exist),
so the same seed gives the same calibration set and another seed a different one.

Batching (``--calib-batch B``): llm-compressor runs every calibration forward one sample at a time by default;
on the CPU those small forwards, repeated per layer (and per AWQ grid point), are most of a compression's time.
With B > 1 the samples are sorted by length (longest first) and cut into batches of B, and each sample is
truncated to its batch's shortest, so a batch is one rectangular forward with no padding: what the method sees
is a subset of the real tokens, never a pad. The dropped tails are counted (``tokens_before_batching``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from comptrust.errors import UsageError

DATA_DIR = Path(__file__).parent / "data"
BUILTIN_FILE = DATA_DIR / "calibration.jsonl"
BUILTIN_NAME = "comptrust-instruct-v1"

_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


@dataclass
class CalibrationSet:
    source: str  # what was asked for ("default", a path, a Hub id)
    kind: str  # builtin | jsonl | text | hub
    indices: list[int]  # which records were sampled, in order
    texts: list[str]  # rendered texts (chat template applied where the record is a conversation)
    input_ids: list[list[int]]  # tokenized, truncated to seq_len
    seq_len: int
    seed: int
    n_available: int
    chat_template: bool  # whether conversations went through the tokenizer's chat template
    meta: dict[str, Any] = field(default_factory=dict)
    batch: int = 1  # samples per calibration forward; with batch > 1 input_ids are grouped and cut (module doc)

    @property
    def n(self) -> int:
        return len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for ids in self.input_ids:
            h.update(json.dumps(ids).encode() + b"\n")
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "n_used": self.n,
            "n_available": self.n_available,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "tokens": self.n_tokens,
            "chat_template": self.chat_template,
            "batch": self.batch,
            "sha256_token_ids": self.sha256(),
            **self.meta,
        }


# -- records ---------------------------------------------------------------------------------------------------
def _check_messages(msgs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: each message needs string \"role\" and \"content\" fields")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _alpaca(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """An Alpaca-style record {instruction, input, output} (the shape of the common Hub Alpaca sets) as a
    conversation: the instruction (with its input, when there is one, after a blank line) from the user, the
    output from the assistant; rendered with the model's chat template like every conversation."""
    fields = {k: obj.get(k, "") for k in ("instruction", "input", "output")}
    if not all(isinstance(v, str) for v in fields.values()):
        raise UsageError(f"{where}: \"instruction\", \"input\" and \"output\" must be strings")
    if not fields["instruction"].strip():
        raise UsageError(f"{where}: \"instruction\" is empty")
    user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"].strip() else "")
    msgs = [{"role": "user", "content": user}]
    if fields["output"].strip():
        msgs.append({"role": "assistant", "content": fields["output"]})
    return {"messages": msgs}


def _record(obj: Any, where: str) -> dict[str, Any]:
    """A record is {"messages": [...]}, {"text": "..."} or Alpaca's {"instruction", "input", "output"}."""
    if isinstance(obj, dict) and "messages" in obj:
        return {"messages": _check_messages(obj["messages"], where)}
    if isinstance(obj, dict) and "instruction" in obj:
        return _alpaca(obj, where)
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        if not obj["text"].strip():
            raise UsageError(f"{where}: \"text\" is empty")
        return {"text": obj["text"]}
    raise UsageError(f"{where}: expected an object with \"messages\" (a list), \"text\" (a string) or Alpaca's "
                     "\"instruction\"/\"input\"/\"output\"")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        records.append(_record(obj, f"{path}:{i}"))
    if not records:
        raise UsageError(f"{path}: calibration file is empty (no JSON lines)")
    return records


def read_text(path: Path) -> list[dict[str, Any]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    blocks = [b.strip() for b in re.split(r"\n\s*\n", raw)]
    records = [{"text": b} for b in blocks if b]
    if not records:
        raise UsageError(f"{path}: calibration file is empty")
    return records


def read_hub(spec: str) -> Sequence[dict[str, Any]]:
    name, _, split = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown id, gated, bad split...
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(
            f"--calibration {spec}: cannot load this Hub dataset ({type(e).__name__}: {first}); "
            "pass a local JSONL/text file, or leave --calibration unset for the built-in set"
        ) from None
    cols = set(ds.column_names)
    col = "messages" if "messages" in cols else "instruction" if "instruction" in cols else "text" if "text" in cols else None
    if col is None:
        raise UsageError(f"--calibration {spec}: the dataset has no \"messages\", \"instruction\" (Alpaca) or \"text\" "
                         f"column (columns: {sorted(cols)})")
    return _HubRecords(ds, col, spec)


class _HubRecords(Sequence):
    """Hub datasets can be large: only the sampled rows are read and validated."""

    def __init__(self, ds: Any, col: str, spec: str):
        self.ds, self.col, self.spec = ds, col, spec

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        row = self.ds[i]
        if self.col == "instruction":  # Alpaca: the record is the whole row
            return _record({k: row.get(k, "") for k in ("instruction", "input", "output")}, f"{self.spec} row {i}")
        return _record({self.col: row[self.col]}, f"{self.spec} row {i}")


# -- rendering -------------------------------------------------------------------------------------------------
def render(record: dict[str, Any], tokenizer: Any) -> tuple[str, bool]:
    """-> (text, templated). Conversations go through the model's chat template; without one, a plain
    'role: content' transcript is used (and recorded as chat_template=false)."""
    if "text" in record:
        return record["text"], False
    msgs = record["messages"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False), True
    return "\n".join(f"{m['role']}: {m['content']}" for m in msgs), False


def _source(spec: str | None) -> tuple[str, str, Sequence[dict[str, Any]]]:
    if spec is None or spec in ("", "default", BUILTIN_NAME):
        return BUILTIN_NAME, "builtin", read_jsonl(BUILTIN_FILE)
    p = Path(spec).expanduser()
    if p.is_dir():
        raise UsageError(f"--calibration {spec} is a directory; pass a .jsonl or text file")
    if p.is_file():
        if p.suffix.lower() in (".jsonl", ".json"):
            return str(p), "jsonl", read_jsonl(p)
        return str(p), "text", read_text(p)
    if _HUB_DATASET.match(spec) and not spec.startswith((".", "/", "~")):
        return spec, "hub", read_hub(spec)
    raise UsageError(f"--calibration {spec}: no such file, and not a Hugging Face dataset id (org/name[:split])")


def sample_indices(n_available: int, n: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(n_available), min(n, n_available))


def load_calibration(spec: str | None, tokenizer: Any, n: int, seq_len: int, seed: int,
                     batch: int = 1) -> CalibrationSet:
    source, kind, records = _source(spec)
    idx = sample_indices(len(records), n, seed)
    texts, ids, templated, kept = [], [], [], []
    for i in idx:
        text, t = render(records[i], tokenizer)
        # a chat template already contains the special tokens; plain text gets the tokenizer's usual ones
        enc = tokenizer(text, add_special_tokens=not t, truncation=True, max_length=seq_len)["input_ids"]
        if not enc:
            continue
        texts.append(text)
        ids.append(list(enc))
        templated.append(t)
        kept.append(i)
    if not ids:
        raise UsageError(f"--calibration {source}: no sample produced any tokens")
    meta: dict[str, Any] = {}
    if batch > 1:
        before = sum(len(x) for x in ids)
        order = batch_order([len(x) for x in ids], batch)
        kept, texts = [kept[j] for j, _ in order], [texts[j] for j, _ in order]
        ids = [ids[j][:cut] for j, cut in order]
        meta["tokens_before_batching"] = before
    return CalibrationSet(
        source=source,
        kind=kind,
        indices=kept,
        texts=texts,
        input_ids=ids,
        seq_len=seq_len,
        seed=seed,
        n_available=len(records),
        chat_template=any(templated),
        meta=meta,
        batch=batch,
    )


def batch_order(lengths: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """(sample, tokens kept) in feeding order: longest first (ties by position), in runs of `batch` samples cut
    to the run's shortest. llm-compressor's length-aware sampler then forms these same runs (equal lengths sort
    together), and its truncating collator has nothing left to cut."""
    order = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
    out: list[tuple[int, int]] = []
    for k in range(0, len(order), batch):
        run = order[k : k + batch]
        cut = min(lengths[j] for j in run)
        out += [(j, cut) for j in run]
    return out
