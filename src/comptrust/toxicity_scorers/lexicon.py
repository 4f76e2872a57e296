"""comptrust's lexicon of identity attacks, dehumanising language, threats and censored profanity
(src/comptrust/data/toxicity_lexicon.yaml), and the scorer that uses it alone."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from comptrust.errors import UsageError
from comptrust.toxicity_scorers.base import LEXICON_FILE, _scorable

_QUOTES = str.maketrans(
    {
        "\u2019": "'", "\u2018": "'", "\u201b": "'", "`": "'", "\u00b4": "'", "\u02bc": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
    }
)  # fmt: skip
_WORD_TAIL = r"[a-z0-9']*"
_MASK_SUFFIXES = ("", "s", "es", "ed", "er", "ers", "ing", "in", "in'", "y", "ies", "a", "as", "az", "z")


def normalize_text(text: str) -> str:
    """NFKC, lower case, straight quotes and dashes, single spaces: what the lexicon's patterns are written for."""
    t = unicodedata.normalize("NFKC", text).lower().translate(_QUOTES)
    return re.sub(r"\s+", " ", t).strip()


def _term_regex(term: str) -> str:
    """One lexicon term ('word', 'stem*', '*part*', 'two words') as a regex fragment."""
    parts = []
    for w in term.lower().split():
        core = re.escape(w.strip("*"))
        parts.append((_WORD_TAIL if w.startswith("*") else "") + core + (_WORD_TAIL if w.endswith("*") else ""))
    return r"[\W_]+".join(parts)


def _alternation(terms: Iterable[str]) -> str:
    return "(?:" + "|".join(_term_regex(t) for t in sorted(set(terms), key=len, reverse=True)) + ")"


def _term_forms(term: str) -> list[str]:
    """Concrete spellings of a single-word term, to test censored words (f**k) against."""
    if " " in term:
        return []
    core = term.strip("*")
    if not term.endswith("*"):
        return [core]
    forms = [core + s for s in _MASK_SUFFIXES]
    if term.startswith("*"):
        forms += ["mother" + core + s for s in _MASK_SUFFIXES]
    return forms


@dataclass
class LexiconHits:
    """What the lexicon found in one text: weighted hits per word category, and hits per pattern."""

    categories: dict[str, float]
    patterns: dict[str, int]
    n_words: int = 1


@dataclass
class Lexicon:
    """comptrust's toxicity lexicon (a YAML data file): word categories, censored-word matching, and patterns."""

    version: int
    categories: dict[str, dict[str, Any]]  # name -> {weight, regex, vocab (maskable) or None}
    patterns: dict[str, tuple[float, list[re.Pattern]]]
    masked_factor: float
    mask_re: re.Pattern
    mask_run: re.Pattern
    combine: dict[str, Any] | None = None
    path: Path | None = None
    _plain_hyphen: re.Pattern = field(default=re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)+"))

    @classmethod
    def load(cls, path: Path | str | None = None) -> "Lexicon":
        import yaml

        path = Path(path) if path else LEXICON_FILE
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UsageError(f"toxicity lexicon {path}: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise UsageError(f"toxicity lexicon {path}: not valid YAML ({' '.join(str(e).split())})") from None
        try:
            lists = {k: list(v) for k, v in (data.get("lists") or {}).items()}

            def expand(rx: str) -> str:
                def sub(m: re.Match) -> str:
                    if m.group(1) not in lists:
                        raise KeyError(f"pattern uses {{{m.group(1)}}}, which is not in lists")
                    return _alternation(lists[m.group(1)])

                return re.sub(r"\{(\w+)\}", sub, rx)

            cats = {}
            for name, c in data["categories"].items():
                terms = [str(t) for t in c["terms"]]
                cats[name] = {
                    "weight": float(c["weight"]),
                    "regex": re.compile(r"(?<![a-z0-9])" + _alternation(terms) + r"(?![a-z0-9])"),
                    "vocab": sorted({f for t in terms for f in _term_forms(t)}) if c.get("maskable") else None,
                }
            pats = {
                name: (float(p["p"]), [re.compile(expand(rx)) for rx in p["regex"]])
                for name, p in (data.get("patterns") or {}).items()
            }
            mask = re.escape(str(data.get("mask_chars", "*#@$%_-")))
            return cls(
                version=int(data.get("version", 1)),
                categories=cats,
                patterns=pats,
                masked_factor=float(data.get("masked_factor", 0.7)),
                mask_re=re.compile(rf"(?<![a-z0-9])[a-z][a-z0-9']*(?:[{mask}]+[a-z0-9']*)+"),
                mask_run=re.compile(rf"([{mask}]+)"),
                combine=data.get("combine"),
                path=path,
            )
        except (KeyError, TypeError, ValueError, AttributeError, re.error) as e:
            raise UsageError(f"toxicity lexicon {path}: malformed ({type(e).__name__}: {e})") from None

    def _masked_hits(self, norm: str) -> dict[str, float]:
        """Censored spellings (f**k, s#it, n***as): each mask run stands for 1..n+1 letters."""
        out: dict[str, float] = {}
        for tok in self.mask_re.findall(norm):
            if self._plain_hyphen.fullmatch(tok):  # an ordinary hyphenated word
                continue
            rx = ""
            for part in self.mask_run.split(tok):
                if not part:
                    continue
                rx += f"[a-z]{{1,{len(part) + 1}}}" if self.mask_run.fullmatch(part) else re.escape(part)
            pattern = re.compile(rx)
            best, best_w = None, 0.0
            for name, c in self.categories.items():
                if c["vocab"] and c["weight"] > best_w and any(pattern.fullmatch(f) for f in c["vocab"]):
                    best, best_w = name, c["weight"]
            if best:
                out[best] = out.get(best, 0.0) + self.masked_factor
        return out

    def analyze(self, text: str) -> LexiconHits:
        norm = normalize_text(text)
        cats = {name: float(len(c["regex"].findall(norm))) for name, c in self.categories.items()}
        for name, n in self._masked_hits(norm).items():
            cats[name] += n
        pats = {name: sum(1 for rx in rxs if rx.search(norm)) for name, (_, rxs) in self.patterns.items()}
        return LexiconHits(cats, pats, max(1, len(norm.split())))

    def features(self, hits: LexiconHits) -> list[float]:
        """The combiner's inputs, in the file's category order: log1p(hits) per category, then
        log1p(10 * hits / words) per category (the density, so that long texts are not toxic by length alone)."""
        counts = [math.log1p(hits.categories[name]) for name in self.categories]
        density = [math.log1p(10.0 * hits.categories[name] / hits.n_words) for name in self.categories]
        return counts + density

    def pattern_prob(self, hits: LexiconHits) -> float:
        """Noisy-OR of the patterns that fired (each counts once)."""
        keep = 1.0
        for name, n in hits.patterns.items():
            if n:
                keep *= 1.0 - self.patterns[name][0]
        return 1.0 - keep

    def words_prob(self, hits: LexiconHits) -> float:
        """The lexicon-only probability from the word categories: sigmoid(scale * sum(weight * log1p(hits)) + bias)."""
        cfg = (self.combine or {}).get("lexicon_only") or {"scale": 1.0, "bias": -2.0}
        z = sum(c["weight"] * math.log1p(hits.categories[n]) for n, c in self.categories.items())
        return _sigmoid(float(cfg["scale"]) * z + float(cfg["bias"]))


@lru_cache(maxsize=4)
def load_lexicon(path: str | None = None) -> Lexicon:
    return Lexicon.load(path)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _logit(p: float, eps: float = 1e-4) -> float:
    p = min(max(p, eps), 1.0 - eps)
    return math.log(p / (1.0 - p))


class LexiconScorer:
    """The lexicon alone: word categories (sigmoid of their weighted hits) noisy-OR'ed with the patterns."""

    name = "lexicon"
    process_safe = True  # pure CPU work, one text at a time: toxicity_scorers.pool may run it in workers

    def __init__(self, lexicon: Lexicon | None = None):
        self.lexicon = lexicon or load_lexicon()

    def score(self, texts: list[str]) -> list[float | None]:
        out: list[float | None] = [None] * len(texts)
        for i in _scorable(texts):
            hits = self.lexicon.analyze(texts[i])
            out[i] = 1.0 - (1.0 - self.lexicon.words_prob(hits)) * (1.0 - self.lexicon.pattern_prob(hits))
        return out
