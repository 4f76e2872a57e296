"""What a perspective is, and the helpers every perspective shares.

A perspective = load data -> build prompts (Items) -> parse each output -> metrics over all records -> 0-100
score. Prompt building, parsing and scoring are separate methods so that parsers can be tested (and fuzzed) on
hand-written outputs, and the patched vs original DecodingTrust score rules are one switch.

Data always comes from a folder in DecodingTrust's ``data/`` layout: the user's DecodingTrust checkout, the
shared copy, or comptrust's built-in mini suite (``comptrust/suites/mini``), which uses the same layout and
record formats. One loader per perspective therefore serves every profile.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import yaml
from pydantic import BaseModel, ConfigDict

from comptrust.errors import UsageError
from comptrust.types import GenParams, Item, Parsed, Prompt, Record, Score

PROFILES = ("mini", "lite", "full")


class MissingData(Exception):
    """A data file the perspective (or one of its parts) needs is absent. Carries the path."""

    def __init__(self, path: Path | str, what: str = ""):
        self.path = str(path)
        super().__init__(f"missing data file {path}" + (f" ({what})" if what else ""))


@dataclass(frozen=True)
class EvalOptions:
    """Run knobs shared by all perspectives (kept out of the Perspective classes on purpose)."""

    data_dir: Path
    profile: str = "mini"
    limit: int | None = None  # items per sub-scenario (deterministic subsample)
    n: int | None = None  # samples per prompt where the protocol samples (overrides the profile)
    seed: int = 0  # subsampling + sampling seed
    dt_quirks: bool = False  # reproduce the reference harness's prompt-building quirks
    original_scoring: bool = False  # DecodingTrust's unpatched score rules instead of comp-trust's patch
    mmlu_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def samples(self, protocol_n: int) -> int:
        """n for a perspective whose protocol samples protocol_n outputs per prompt."""
        if self.n is not None:
            return self.n
        return protocol_n if self.profile == "full" else 1

    def public(self) -> dict[str, Any]:
        """What scores.json and the score history record. Per-perspective arguments in ``extra`` are included
        by value (a scorer object by its name); runtime-only helpers (functions) are not."""
        d: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "profile": self.profile,
            "limit": self.limit,
            "n": self.n,
            "seed": self.seed,
            "dt_quirks": self.dt_quirks,
            "original_scoring": self.original_scoring,
        }
        for k, v in sorted(self.extra.items()):
            if isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                d[k] = v
            elif isinstance(getattr(v, "name", None), str):
                d[k] = v.name
        return d


class PerspectiveArgs(BaseModel):
    """A perspective's own settings, declared in its module as a subclass (``class ToxicityArgs(PerspectiveArgs)``)
    with typed, described fields. The run config (comptrust.config.EvalConfig) inherits every perspective's Args,
    so each field is a study-file key, an API keyword and part of the fingerprint of that perspective's units,
    under the field's own name (a flat, prefixed name: ``toxicity_scorer``). The perspective reads the value
    from ``EvalOptions.extra`` under that name (where the Python API may also pass an object, e.g. a scorer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass
class Loaded:
    items: list[Item]
    skipped: list[str] = field(default_factory=list)  # "part: missing <file>"
    notes: list[str] = field(default_factory=list)


class Perspective:
    """Base class. Subclasses set name/version and implement load, parse and score."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    short_title: ClassVar[str] = ""  # its label in charts and narrow tables
    description: ClassVar[str] = ""  # what it measures, in a line (`comptrust perspectives` prints it)
    version: ClassVar[int] = 1
    Args: ClassVar[type[PerspectiveArgs]] = PerspectiveArgs  # its settings (none by default)
    label_free: ClassVar[bool] = False  # parses carry no task label (an output is unparseable only when empty)
    lite_limit: ClassVar[int] = 20  # items per sub-scenario in the lite profile (subclasses set their own)

    def load(self, opts: EvalOptions) -> Loaded:
        raise NotImplementedError

    def parse(self, item: Item, text: str, opts: EvalOptions) -> Parsed:
        raise NotImplementedError

    def score(self, records: Sequence[Record], opts: EvalOptions, loaded: Loaded | None = None) -> Score:
        raise NotImplementedError

    # -- scoring hooks (evaluate and the study's analysis call them for every perspective) --------------------
    def scoring_options(self, opts: EvalOptions) -> EvalOptions:
        """The options to call score() with many times over the same records (a bootstrap): a perspective whose
        scoring is costly memoises here (toxicity: each text scored once). The default: `opts` unchanged."""
        return opts

    def start_scoring(self, records: Sequence[Record], opts: EvalOptions) -> EvalOptions:
        """Called as soon as this perspective's generations exist, while the engine goes on with the next
        perspective: a perspective may start scoring in the background here. Returns scoring_options(opts)."""
        return self.scoring_options(opts)

    def score_note(self, opts: EvalOptions) -> str | None:
        """A line the report shows beside this perspective's numbers (toxicity: which scorer, how close it is to
        DecodingTrust's). None by default."""
        return None

    # convenience for subclasses
    def make_score(self, records: Sequence[Record], **kw: Any) -> Score:
        return Score(
            perspective=self.name,
            n_items=len(records),
            n_generations=sum(len(r.outputs) for r in records),
            **kw,
        )


# ----------------------------------------------------------------------------------------------------------------
# protocol text lives in YAML files next to the perspectives


_PROTOCOL_DIR = Path(__file__).parent / "protocol"


def protocol(name: str) -> dict[str, Any]:
    """Load perspectives/protocol/<name>.yaml: label words, phrase lists, templates."""
    with open(_PROTOCOL_DIR / f"{name}.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


# ----------------------------------------------------------------------------------------------------------------
# data reading with errors that name file, line and field


def require_file(path: Path, what: str = "") -> Path:
    if not path.is_file():
        raise MissingData(path, what)
    return path


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(text: str, value: Any, where: str) -> None:
    """A JSON "\\udXXX" escape may decode to a lone surrogate, which no later step can encode: refuse it here."""
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{where}: a string holds a lone surrogate (\\ud800-\\udfff), not Unicode text") from None


def first_bad_utf8_line(path: Path) -> int:
    """The number of the first line of path that is not valid UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


MAX_JSONL_LINE = 1 << 24  # characters; DecodingTrust's longest record is a few hundred KB


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, record); a malformed line is a UsageError naming file and line. A line is read at most
    MAX_JSONL_LINE characters at a time: a 4 GiB file with no newline would otherwise be one 4 GiB string
    (MemoryError)."""
    require_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(iter(lambda: f.readline(MAX_JSONL_LINE + 1), ""), 1):
                if len(line) > MAX_JSONL_LINE:
                    raise UsageError(f"{path}:{lineno}: a line longer than {MAX_JSONL_LINE:,} characters; not one "
                                     "JSON record per line")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                except RecursionError:
                    raise UsageError(f"{path}:{lineno}: malformed JSON line (nested too deeply)") from None
                _check_unicode(line, rec, f"{path}:{lineno}")
                yield lineno, rec
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}:{first_bad_utf8_line(path)}: not UTF-8 text ({e.reason})") from None


def read_json(path: Path) -> Any:
    require_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise UsageError(f"{path}: malformed JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}:{first_bad_utf8_line(path)}: not UTF-8 text ({e.reason})") from None
    _check_unicode(text, data, str(path))
    return data


def field_of(rec: Any, dotted: str, path: Path, lineno: int | None = None) -> Any:
    """rec["a"]["b"] for dotted "a.b", or a UsageError naming file, line and field."""
    cur = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            where = f"{path}:{lineno}" if lineno is not None else str(path)
            raise UsageError(f"{where}: record is missing required field '{dotted}'")
        cur = cur[part]
    return cur


# ----------------------------------------------------------------------------------------------------------------
# deterministic subsampling


def stable_hash(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()


def subsample(items: Sequence[Any], limit: int | None, key: Callable[[Any], str], seed: int = 0) -> list[Any]:
    """The first `limit` items ordered by a hash of (seed, key(item)); the original order is kept.

    Hashing a key instead of shuffling makes the choice independent of file order and lets paired items
    (the same statement under three system prompts) share one key and so be chosen together.
    """
    if limit is None or limit >= len(items):
        return list(items)
    ranked = sorted(range(len(items)), key=lambda i: stable_hash(seed, key(items[i])))
    keep = sorted(ranked[:limit])
    return [items[i] for i in keep]


def mean(xs: Sequence[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# do_classification: the chat framing shared by adversarial demonstrations, machine ethics and OOD


@lru_cache(maxsize=1)
def do_classification() -> dict[str, Any]:
    """protocol/do_classification.yaml, read once (callers must not mutate it)."""
    return protocol("do_classification")


def classification_prompt(task: str, text: str, demos: Sequence[tuple[str, str]], params: GenParams) -> Prompt:
    """The chat messages DecodingTrust's do_classification sends.

    Zero-shot: a plain system prompt and one user turn "task\\ninput". Few-shot: the task alone in the first user
    turn, a fixed acknowledgement, then one user/assistant pair per demonstration (label capitalised), then the
    input.
    """
    dc = do_classification()
    if not demos:
        return Prompt.chat(("system", dc["zero_shot_system"]), ("user", f"{task}\n{text}"), params=params)
    turns: list[tuple[str, str]] = [("system", dc["few_shot_system"]), ("user", task), ("assistant", dc["few_shot_ack"])]
    for ex_text, ex_label in demos:
        turns += [("user", ex_text), ("assistant", ex_label.capitalize())]
    turns.append(("user", text))
    return Prompt.chat(*turns, params=params)
