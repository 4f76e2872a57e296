"""How close are comptrust's offline toxicity scorers to the Perspective API?

Data: the 3,596 DecodingTrust toxicity prompts in ../shared/data/decodingtrust/toxicity/user_prompts/ (RealToxicity-
Prompts toxic 1,196 + non-toxic 1,200, GPT-3.5-written toxic 1,200); each record carries Perspective's TOXICITY
score of the prompt text (prompt.toxicity, or prompt.score.toxicity for the GPT-written ones). For every scorer:
AUROC against Perspective > 0.5, Spearman rank correlation, mean absolute error, and texts/s (2 threads).

Plus bench/data/nonprofane_toxic.jsonl, hand-written toxic texts without swear words (identity attacks,
dehumanising language, threats, exclusion, insults) and benign controls (neutral mentions of identities, violent
words in neutral contexts, everyday text): hit rate (toxic texts scored > 0.5), false-positive rate (benign texts
scored > 0.5) and AUROC, separately for the dev splits (dev1 + dev2, seen while writing the lexicon) and the
held-out split (written after the lexicon was frozen). See bench/data/README.md.

    python bench/toxicity_agreement.py                      # profanity-check, lexicon, offline; writes the table
    python bench/toxicity_agreement.py --hf path/to/model   # also a Hugging Face classifier (hf: scorer)
    python bench/toxicity_agreement.py --candidates         # also PyPI packages tried as the default (if importable)
    python bench/toxicity_agreement.py --fit                # refit the offline combiner (writes the lexicon file)

--fit uses the 2,377 RealToxicityPrompts *continuations* (continuation.text with its Perspective score) in
toxic.jsonl / nontoxic.jsonl, texts disjoint from the evaluated prompts, so the prompt numbers stay held-out.
"""

from __future__ import annotations

import os

import comptrust  # noqa: E402,F401 -- before torch: sets OpenMP's waiting (see comptrust/__init__.py)

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.stats import rankdata, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from comptrust import toxicity_scorers as ts  # noqa: E402

PROMPTS = ROOT.parent / "shared" / "data" / "decodingtrust" / "toxicity" / "user_prompts"
SETS = {
    "rtp-toxic": "toxic.jsonl",
    "rtp-nontoxic": "nontoxic.jsonl",
    "gpt3.5-toxic": "toxic.jsonl.gpt3.n=25.out1.split.annotated.jsonl.filtered.jsonl",
}
HANDWRITTEN = ROOT / "bench" / "data" / "nonprofane_toxic.jsonl"
RESULTS = ROOT / "bench" / "results" / "toxicity_agreement.md"
GOAL = {"auroc": 0.97, "spearman": 0.90}
HAND_PARTS = {"dev": ("dev1", "dev2"), "heldout": ("heldout",)}
NOTES = [
    "- `offline` = alt-profanity-check and the lexicon's word categories (counts and per-word densities) in one "
    "logistic model fit on the RealToxicityPrompts continuations (`--fit`; texts disjoint from these prompts), "
    "noisy-OR'ed with the lexicon's patterns (identity attacks, dehumanising language, threats, directed insults). "
    "Pattern precision on natural text: {pattern_fp}.",
    "- texts/s: one pass over the prompts on a shared 2-core machine (noisy; the lexicon's regular expressions "
    "dominate the offline scorer's time).",
    "- Other PyPI packages with a bundled model were downloaded and inspected: hatesonar and best-profanity are "
    "measured above (`--candidates`); cuss-inspect 1.0.2b0 (its scikit-learn pickles no longer load: "
    "NotFittedError), offensivetext 1.3.9 and toxicityclassifier 1.0.1 (download NLTK data at import), detoxify "
    "(downloads its weights at run time), tox-block and toxic-comment-classifier (TensorFlow) were not usable; no "
    "package bundling a transformer toxicity classifier was found.",
    "- Spearman 0.90 is out of reach for these lexical features: the agreement is lost in the ordering *within* "
    "each prompt set (table below), e.g. among GPT-3.5 prompts that Perspective puts between 0.9 and 1.0. A model "
    "of Perspective itself is needed, such as `hf:cooperleong00/deberta-v3-large_toxicity-scorer` (DeBERTa-v3-large "
    "fit to Perspective scores of 90k RealToxicityPrompts texts, so its agreement on RTP prompts may be inflated by "
    "overlap); it could not be downloaded here, hence is not measured.",
    "- Tried and rejected (scratch scripts, not this bench): a logistic probe on mean-pooled hidden states of the "
    "embedded SmolLM2-135M, fit on the same continuations: AUROC 0.977 / Spearman 0.813 alone, 0.994 / 0.853 "
    "stacked with the offline features, at about 12 texts/s on this CPU (200x slower for +0.01 Spearman).",
]


# ----------------------------------------------------------------------------------------------------------- data
def perspective_value(prompt: dict[str, Any]) -> float | None:
    v = prompt.get("toxicity")
    if v is None and isinstance(prompt.get("score"), dict):
        v = prompt["score"].get("toxicity")
    return float(v) if isinstance(v, (int, float)) else None


def load_prompts(folder: Path = PROMPTS) -> tuple[list[str], np.ndarray, np.ndarray]:
    texts, ys, sets = [], [], []
    for set_name, fname in SETS.items():
        with open(folder / fname, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                p = json.loads(line)["prompt"]
                v = perspective_value(p)
                if v is not None and isinstance(p.get("text"), str):
                    texts.append(p["text"])
                    ys.append(v)
                    sets.append(set_name)
    return texts, np.array(ys), np.array(sets)


def load_continuations(folder: Path = PROMPTS) -> tuple[list[str], np.ndarray]:
    texts, ys = [], []
    for fname in (SETS["rtp-toxic"], SETS["rtp-nontoxic"]):
        with open(folder / fname, encoding="utf-8") as f:
            for line in f:
                c = (json.loads(line) or {}).get("continuation") or {}
                if isinstance(c.get("toxicity"), (int, float)) and isinstance(c.get("text"), str) and c["text"].strip():
                    texts.append(c["text"])
                    ys.append(float(c["toxicity"]))
    return texts, np.array(ys)


def load_handwritten(path: Path = HANDWRITTEN) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -------------------------------------------------------------------------------------------------------- metrics
def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half)."""
    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    r = rankdata(scores)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def agreement(pred: list[float | None], y: np.ndarray) -> dict[str, float]:
    p = np.array([0.0 if v is None else v for v in pred], dtype=float)
    return {
        "auroc": auroc(p, y > 0.5),
        "spearman": float(spearmanr(p, y).statistic),
        "mae": float(np.mean(np.abs(p - y))),
        "unscored": sum(v is None for v in pred),
    }


# ------------------------------------------------------------------------------------------------ extra candidates
def candidate_scorers() -> dict[str, Callable[[list[str]], list[float]]]:
    """PyPI packages with a bundled model that were tried as the offline default (not comptrust dependencies).

    hatesonar 0.1.0 (ONNX tf-idf + logistic regression, Davidson et al. 2017 tweets; its StringNormalizer asks for
    the en_US.UTF-8 locale, so the graph is patched to C.UTF-8 here): p = 1 - p(neither).
    best-profanity 1.1.5 (sklearn pickles): the English model's p(profane).
    """
    out: dict[str, Callable[[list[str]], list[float]]] = {}
    try:
        import onnx
        import onnxruntime as ort
        import hatesonar.api as hs

        model = onnx.load(str(hs.DEFAULT_MODEL_FILE))
        for node in model.graph.node:
            if node.op_type == "StringNormalizer" and not any(a.name == "locale" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

        def hatesonar(texts: list[str]) -> list[float]:
            res = []
            for i in range(0, len(texts), 256):
                _, probs = sess.run(None, {"text": np.array(texts[i : i + 256], dtype=object)})
                res += [1.0 - float(p[2]) for p in probs]
            return res

        out["hatesonar 0.1.0 (candidate)"] = hatesonar
    except Exception as e:  # noqa: BLE001
        print(f"[candidates] hatesonar unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    try:
        import importlib.util

        import joblib

        spec = importlib.util.find_spec("best_profanity")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("best_profanity not installed")
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        vec, clf = joblib.load(d / "english-vectorizer.joblib"), joblib.load(d / "english-model.joblib")
        out["best-profanity 1.1.5 (candidate)"] = lambda texts: [float(v) for v in clf.predict_proba(vec.transform(texts))[:, 1]]
    except Exception as e:  # noqa: BLE001
        print(f"[candidates] best-profanity unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------------------------ fit
def _features(lex: ts.Lexicon, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    pc = ts.ProfanityCheckScorer().score(texts)
    X, Z = [], []
    for t, p in zip(texts, pc):
        hits = lex.analyze(t)
        X.append([ts.lexicon._logit(float(p)), *lex.features(hits)])
        Z.append(sum(c["weight"] * math.log1p(hits.categories[n]) for n, c in lex.categories.items()))
    return np.array(X), np.array(Z)[:, None]


def _soft_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Logistic regression on soft targets (cross-entropy against Perspective's probability), small L2; returns
    [coefficients..., bias]."""
    from scipy.optimize import minimize

    A = np.c_[X, np.ones(len(X))]

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = A @ w
        p = 1 / (1 + np.exp(-z))
        eps = 1e-9
        ce = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
        grad = A.T @ (p - y) / len(y)
        reg = l2 * np.sum(w[:-1] ** 2)
        grad[:-1] += 2 * l2 * w[:-1]
        return ce + reg, grad

    return minimize(loss, np.zeros(A.shape[1]), jac=True, method="L-BFGS-B").x


def fit(lexicon_path: Path = ts.LEXICON_FILE) -> dict[str, Any]:
    lex = ts.Lexicon.load(lexicon_path)
    texts, y = load_continuations()
    print(f"[fit] {len(texts)} RealToxicityPrompts continuations; {int((y > 0.5).sum())} with Perspective > 0.5")
    X, Z = _features(lex, texts)
    w = _soft_logistic(X, y)
    cats = list(lex.categories)
    wl = _soft_logistic(Z, y)
    combine = {
        "offline": {
            "profanity_check": round(float(w[0]), 4),
            "categories": {c: round(float(v), 4) for c, v in zip(cats, w[1 : 1 + len(cats)])},
            "density": {c: round(float(v), 4) for c, v in zip(cats, w[1 + len(cats) : -1])},
            "bias": round(float(w[-1]), 4),
        },
        "lexicon_only": {"scale": round(float(wl[0]), 4), "bias": round(float(wl[1]), 4)},
        "fit": {"data": "RealToxicityPrompts continuations in DecodingTrust toxic.jsonl + nontoxic.jsonl",
                "texts": len(texts), "method": "logistic regression on soft Perspective targets, L2 1e-3"},
    }
    text = lexicon_path.read_text(encoding="utf-8")
    m = re.search(r"^combine:.*\Z", text, flags=re.S | re.M)
    if not m:
        raise SystemExit(f"{lexicon_path}: no top-level 'combine:' block to replace (it must be the last block)")
    import yaml

    block = yaml.safe_dump({"combine": combine}, sort_keys=False, default_flow_style=None, width=110)
    lexicon_path.write_text(text[: m.start()] + block, encoding="utf-8")
    ts.load_lexicon.cache_clear()
    print(f"[fit] wrote combine coefficients to {lexicon_path}:\n{block}")
    return combine


def pattern_precision() -> str:
    """How often the lexicon's patterns fire on prompts and continuations that Perspective scores below 0.3."""
    lex = ts.load_lexicon()
    texts, y, _ = load_prompts()
    ct, cy = load_continuations()
    benign = [t for t, v in zip(texts, y) if v < 0.3] + [t for t, v in zip(ct, cy) if v < 0.3]
    fired = sum(any(lex.analyze(t).patterns.values()) for t in benign)
    return f"a pattern fires on {fired} of the {len(benign):,} prompts and continuations that Perspective scores below 0.3"


# ------------------------------------------------------------------------------------------------------------ run
def measure(name: str, fn: Callable[[list[str]], list[float | None]], texts: list[str], y: np.ndarray,
            sets: np.ndarray, hand: list[dict[str, Any]]) -> dict[str, Any]:
    fn(texts[:16])  # warm up: imports, model loading
    t0 = time.perf_counter()
    pred = fn(texts)
    dt = time.perf_counter() - t0
    row: dict[str, Any] = {"scorer": name, **agreement(pred, y), "texts_per_s": len(texts) / dt}
    for s in SETS:
        m = sets == s
        row[f"spearman/{s}"] = float(spearmanr([pred[i] or 0.0 for i in np.where(m)[0]], y[m]).statistic)
    hp = np.array([v or 0.0 for v in fn([r["text"] for r in hand])])
    tox = np.array([bool(r["toxic"]) for r in hand])
    for part, splits in HAND_PARTS.items():
        m = np.array([r["split"] in splits for r in hand])
        row[f"{part}_hit"] = float((hp[m & tox] > 0.5).mean())
        row[f"{part}_fp"] = float((hp[m & ~tox] > 0.5).mean())
        row[f"{part}_n"] = (int((m & tox).sum()), int((m & ~tox).sum()))
        row[f"{part}_auroc"] = auroc(hp[m], tox[m])
    kinds = sorted({r["kind"] for r in hand})
    row["hand_by_kind"] = {}
    for k in kinds:
        cells = []
        for part, splits in HAND_PARTS.items():
            m = np.array([r["kind"] == k and r["split"] in splits for r in hand])
            cells.append(f"{int((hp[m] > 0.5).sum())}/{int(m.sum())}" if m.any() else "-")
        row["hand_by_kind"][k] = " · ".join(cells)
    row["hand_scores"] = [round(float(v), 3) for v in hp]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| scorer | AUROC (P>0.5) | Spearman | MAE | texts/s | non-profane hit: dev / held-out "
            "| benign FP: dev / held-out | hand-set AUROC: dev / held-out |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['scorer']} | {r['auroc']:.3f} | {r['spearman']:.3f} | {r['mae']:.3f} | {r['texts_per_s']:,.0f} "
            f"| {r['dev_hit']:.0%} / {r['heldout_hit']:.0%} | {r['dev_fp']:.0%} / {r['heldout_fp']:.0%} "
            f"| {r['dev_auroc']:.3f} / {r['heldout_auroc']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", action="store_true", help="refit the offline combiner on the continuations first")
    ap.add_argument("--hf", action="append", default=[], help="also measure hf:MODEL (repeatable)")
    ap.add_argument("--candidates", action="store_true", help="also measure other PyPI packages, if importable")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
    if args.fit:
        fit()
    texts, y, sets = load_prompts()
    hand = load_handwritten()
    print(f"{len(texts)} prompts ({', '.join(f'{s} {int((sets == s).sum())}' for s in SETS)}); "
          f"{int((y > 0.5).sum())} with Perspective > 0.5; hand-written set {len(hand)} texts "
          f"({sum(bool(r['toxic']) for r in hand)} toxic)")
    scorers: dict[str, Callable[[list[str]], list[float | None]]] = {
        name: ts.get_scorer(name).score for name in ("profanity-check", "lexicon", "offline")
    }
    for m in args.hf:
        scorers[f"hf:{m}"] = ts.get_scorer(f"hf:{m}").score
    if args.candidates:
        scorers.update(candidate_scorers())
    rows = []
    for name, fn in scorers.items():
        row = measure(name, fn, texts, y, sets, hand)
        rows.append(row)
        print(f"  {name}: AUROC {row['auroc']:.3f}  Spearman {row['spearman']:.3f}  MAE {row['mae']:.3f}  "
              f"{row['texts_per_s']:,.0f} texts/s  non-profane hit dev {row['dev_hit']:.0%} held-out "
              f"{row['heldout_hit']:.0%}, benign FP dev {row['dev_fp']:.0%} held-out {row['heldout_fp']:.0%}",
              flush=True)
    md = render(rows, texts, y, sets, hand)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md, encoding="utf-8")
    print()
    print(table(rows))
    print(f"\nwrote {args.out}")


def render(rows: list[dict[str, Any]], texts: list[str], y: np.ndarray, sets: np.ndarray,
           hand: list[dict[str, Any]]) -> str:
    import platform

    default = next((r for r in rows if r["scorer"] == ts.DEFAULT_SCORER), None)
    lines = [
        "# Toxicity scorers vs the Perspective API",
        "",
        f"Written by `python bench/toxicity_agreement.py` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, 2 torch threads).",
        "",
        f"**Prompts**: the {len(texts)} DecodingTrust toxicity prompts (" +
        ", ".join(f"{s} {int((sets == s).sum())}" for s in SETS) +
        f"), scored against the Perspective TOXICITY value stored with each prompt; {int((y > 0.5).sum())} have "
        "Perspective > 0.5. AUROC: Perspective > 0.5 as the label. MAE: mean |score - Perspective|.",
        "",
        f"**Hand-written set** (`bench/data/nonprofane_toxic.jsonl`): {sum(bool(r['toxic']) for r in hand)} toxic "
        f"texts without swear words and {sum(not r['toxic'] for r in hand)} benign controls (neutral mentions of "
        "identities, violent words in neutral contexts, everyday text). Hit rate: toxic texts scored > 0.5; FP rate: "
        "benign texts scored > 0.5. *dev* = splits dev1 + dev2 "
        f"({rows[0]['dev_n'][0] if rows else 0} toxic / {rows[0]['dev_n'][1] if rows else 0} benign), seen while "
        "writing the lexicon; *held-out* = split heldout "
        f"({rows[0]['heldout_n'][0] if rows else 0} / {rows[0]['heldout_n'][1] if rows else 0}), written after the "
        "lexicon was frozen and never used for tuning (bench/data/README.md). The set and the lexicon have the same "
        "author: even the held-out numbers flatter the lexicon.",
        "",
        table(rows),
        "",
        f"Goal for the offline default: AUROC >= {GOAL['auroc']}, Spearman >= {GOAL['spearman']}, and it catches "
        "non-profane toxicity.",
    ]
    if default:
        ok_a, ok_s = default["auroc"] >= GOAL["auroc"], default["spearman"] >= GOAL["spearman"]
        lines += [
            "",
            f"**Default `{ts.DEFAULT_SCORER}`**: AUROC {default['auroc']:.3f} ({'met' if ok_a else 'NOT met'}), "
            f"Spearman {default['spearman']:.3f} ({'met' if ok_s else 'NOT met'}); non-profane toxic texts caught: "
            f"{default['dev_hit']:.0%} of the dev split, {default['heldout_hit']:.0%} of the held-out split "
            f"(false positives {default['dev_fp']:.0%} / {default['heldout_fp']:.0%} of the benign controls).",
        ]
    lines += ["", "## Notes", "", *(n.format(pattern_fp=pattern_precision()) for n in NOTES)]
    lines += ["", "## Spearman within each prompt set", "",
              "| scorer | " + " | ".join(SETS) + " |", "|---|" + "---|" * len(SETS)]
    for r in rows:
        lines.append(f"| {r['scorer']} | " + " | ".join(f"{r[f'spearman/{s}']:.3f}" for s in SETS) + " |")
    kinds = list(rows[0]["hand_by_kind"]) if rows else []
    lines += ["", "## Hand-written set: scored > 0.5, by kind (dev · held-out)", "",
              "| scorer | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for r in rows:
        lines.append(f"| {r['scorer']} | " + " | ".join(r["hand_by_kind"][k] for k in kinds) + " |")
    lines += ["", "## Hand-written set: every score", "",
              "| text | toxic | kind | split | " + " | ".join(r["scorer"] for r in rows) + " |",
              "|---|---|---|---|" + "---|" * len(rows)]
    for i, h in enumerate(hand):
        lines.append(f"| {h['text']} | {'yes' if h['toxic'] else 'no'} | {h['kind']} | {h['split']} | " +
                     " | ".join(f"{r['hand_scores'][i]:.2f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
