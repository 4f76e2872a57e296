"""The few value types every layer shares. Frozen so they can be cache keys and set members."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenParams:
    """Decoding parameters. temperature 0 means greedy decoding (DecodingTrust's t=0)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        if self.greedy:  # sampling knobs do not change greedy outputs: keep them out of the cache key
            d.update(temperature=0.0, top_p=1.0, seed=0)
        return d


@dataclass(frozen=True)
class Prompt:
    """One request. Chat prompts are a tuple of messages; raw prompts (base models, MMLU) are text."""

    messages: tuple[Message, ...] = ()
    raw: str | None = None
    params: GenParams = GenParams(max_new_tokens=16)

    @staticmethod
    def chat(*pairs: tuple[str, str], params: GenParams) -> "Prompt":
        return Prompt(messages=tuple(Message(r, c) for r, c in pairs), params=params)

    def identity(self) -> str:
        """A stable text form of the request before any template is applied."""
        body = self.raw if self.raw is not None else [[m.role, m.content] for m in self.messages]
        return json.dumps({"p": body, "g": self.params.key()}, ensure_ascii=False, sort_keys=True)


@dataclass(frozen=True)
class Item:
    """One evaluation item: a prompt plus what the parser and metric need (gold label, group tags, ...)."""

    id: str
    group: str  # sub-scenario, e.g. "benign", "sst2", "qa_2023_idk"
    prompt: Prompt
    labels: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Parsed:
    """A parsed output. label is a task label, or None when no valid label was found."""

    label: Any = None
    refused: bool = False
    correct: bool | None = None
    value: float | None = None  # e.g. toxicity of the text


@dataclass
class Record:
    """An item with its generated outputs (n of them) and their parses."""

    item: Item
    outputs: list[str]
    parsed: list[Parsed]


@dataclass
class Score:
    """A perspective's result. score and refusal_rate are on a 0-100 scale."""

    perspective: str
    score: float | None
    refusal_rate: float | None
    n_items: int
    n_generations: int
    subscores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    # sub-score -> why it has no value (e.g. too few parsable answers): such parts are left out of `score`, which
    # is None when nothing was scorable; never a fixed stand-in value the model did not earn
    not_scorable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_text(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()
