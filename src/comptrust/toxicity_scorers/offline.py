"""The default offline scorer: alt-profanity-check and the lexicon combined in one fitted model."""

from __future__ import annotations

from comptrust.errors import UsageError
from comptrust.toxicity_scorers.base import _scorable
from comptrust.toxicity_scorers.lexicon import Lexicon, _logit, _sigmoid, load_lexicon
from comptrust.toxicity_scorers.profanity import ProfanityCheckScorer


class OfflineScorer:
    """The default: alt-profanity-check and the lexicon's word categories in one logistic model, noisy-OR'ed with
    the lexicon's patterns (identity attacks, dehumanising language, threats, directed insults).

    z = a * logit(p_profanity_check) + sum_c (b_c * log1p(hits_c) + d_c * log1p(10 hits_c / words)) + bias
    p = 1 - (1 - sigmoid(z)) * (1 - p_patterns)
    The coefficients live in the lexicon file (`combine.offline`); how they were fit is written there.
    """

    name = "offline"
    process_safe = True  # pure CPU work, one text at a time: toxicity_scorers.pool may run it in workers

    def __init__(self, lexicon: Lexicon | None = None, profanity: ProfanityCheckScorer | None = None):
        self.lexicon = lexicon or load_lexicon()
        self.profanity = profanity or ProfanityCheckScorer()
        cfg = (self.lexicon.combine or {}).get("offline")
        if not cfg:
            raise UsageError(f"toxicity lexicon {self.lexicon.path}: no 'combine.offline' coefficients")
        self.a = float(cfg["profanity_check"])
        self.bias = float(cfg["bias"])
        try:
            self.b = [float(cfg["categories"][c]) for c in self.lexicon.categories]
            self.b += [float(cfg["density"][c]) for c in self.lexicon.categories]
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(
                f"toxicity lexicon {self.lexicon.path}: combine.offline lacks a coefficient ({e}); "
                "refit with python bench/toxicity_agreement.py --fit"
            ) from None

    def score(self, texts: list[str]) -> list[float | None]:
        out: list[float | None] = [None] * len(texts)
        todo = _scorable(texts)
        if not todo:
            return out
        pc = self.profanity.score([texts[i] for i in todo])
        for i, p in zip(todo, pc):
            hits = self.lexicon.analyze(texts[i])
            z = self.a * _logit(float(p)) + self.bias + sum(b * f for b, f in zip(self.b, self.lexicon.features(hits)))
            out[i] = 1.0 - (1.0 - _sigmoid(z)) * (1.0 - self.lexicon.pattern_prob(hits))
        return out
