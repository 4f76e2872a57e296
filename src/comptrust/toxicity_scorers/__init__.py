"""Toxicity scorers: text -> probability of being toxic, in [0, 1] (None where a text could not be scored).

DecodingTrust scores generations with Google's Perspective API, which needs a key and the network, allows about
1 query per second, and changes its model over time. comptrust scores offline by default and offers the others:

  offline          get_scorer()'s default: alt-profanity-check combined with comptrust's lexicon of identity attacks,
                   dehumanising language, threats and censored profanity (src/comptrust/data/toxicity_lexicon.yaml)
  profanity-check  alt-profanity-check alone: a bag-of-words linear model (fast, misses toxicity without swear words)
  lexicon          the lexicon alone (no dependency beyond PyYAML)
  hf:MODEL[#LABEL] a Hugging Face sequence-classification model (Hub id or local directory), e.g.
                   hf:cooperleong00/deberta-v3-large_toxicity-scorer or hf:unitary/toxic-bert
  perspective      the Perspective API (key in PERSPECTIVE_API_KEY), rate-limited, retried, cached in a Store

An evaluation that names no scorer uses the toxicity protocol's default_scorer (perspectives/protocol/toxicity.yaml).
bench/toxicity_agreement.py measures how close each offline scorer is to Perspective on DecodingTrust's prompts
(bench/results/toxicity_agreement.md).
A caller may also pass any object with the two members of `Scorer`. The scorer's name is recorded in the Score,
because numbers from different scorers are not comparable.

Layout: one module per scorer (profanity, lexicon, offline, hf, perspective), the protocol in base, and the
registry here, the one place that maps a scorer name to its class.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

from comptrust.errors import UsageError
from comptrust.toxicity_scorers.base import DATA_DIR, DEFAULT_SCORER, LEXICON_FILE, Scorer
from comptrust.toxicity_scorers.hf import HFClassifierScorer
from comptrust.toxicity_scorers.lexicon import Lexicon, LexiconHits, LexiconScorer, load_lexicon, normalize_text
from comptrust.toxicity_scorers.offline import OfflineScorer
from comptrust.toxicity_scorers.perspective import PERSPECTIVE_CACHE_NS, PerspectiveScorer, perspective_cache_path
from comptrust.toxicity_scorers.profanity import ProfanityCheckScorer

__all__ = ["DATA_DIR", "DEFAULT_SCORER", "LEXICON_FILE", "PERSPECTIVE_CACHE_NS", "HFClassifierScorer", "Lexicon",
           "LexiconHits", "LexiconScorer", "OfflineScorer", "PerspectiveScorer", "ProfanityCheckScorer", "Scorer",
           "SCORERS", "agreement_note", "get_scorer", "load_lexicon", "normalize_text", "perspective_cache_path",
           "scorer_names"]

SCORERS: dict[str, Callable[..., Scorer]] = {
    "profanity-check": ProfanityCheckScorer,
    "offline": OfflineScorer,
    "lexicon": LexiconScorer,
    "perspective": PerspectiveScorer,
}


def scorer_names() -> list[str]:
    return [*SCORERS, "hf:<model id or dir>"]


@lru_cache(maxsize=None)
def agreement_note(name: str) -> str:
    """One line saying what a toxicity number scored by `name` stands for: the Perspective API itself, or a
    surrogate with its measured agreement (src/comptrust/data/toxicity_agreement.yaml). Cached: score() asks
    once per call, and a bootstrap calls score() a thousand times."""
    if name == "perspective":
        return "scored by the Perspective API (DecodingTrust's own scorer)"
    import yaml

    data = yaml.safe_load((DATA_DIR / "toxicity_agreement.yaml").read_text(encoding="utf-8"))
    a = (data.get("scorers") or {}).get(name)
    if not a:
        return f"Perspective surrogate: {name}, agreement with Perspective not measured"
    return (f"Perspective surrogate: {name}, AUROC {a['auroc']:.3f}, Spearman {a['spearman']:.3f} vs Perspective "
            f"on {data['measured_on']}")


def get_scorer(name: str = DEFAULT_SCORER, **options: Any) -> Scorer:
    """Build a scorer by name ('hf:MODEL' for a Hugging Face classifier); options go to its constructor.

    An unknown name is a UsageError listing the known ones."""
    name = (name or "").strip()
    if name.startswith("hf:"):
        return HFClassifierScorer(name[3:], **options)
    factory = SCORERS.get(name)
    if factory is None:
        raise UsageError(f"unknown toxicity scorer '{name}'; known: {', '.join(scorer_names())}")
    return factory(**options)
