"""The scores *Decoding Compressed Trust* published, shipped as figures (comptrust/data/dct_published.csv, its
source named in its header), so that a study of one of the paper's models can print the paper's number beside
each of its own.

Matching: a study's model matches a published one when the last part of its name, lower-cased and without a
trailing "-hf", equals it (meta-llama/Llama-2-13b-chat-hf -> llama-2-13b-chat); `compare_to` names one
explicitly (e.g. to compare a study of another model, or a local checkpoint). A variant matches a published row
by method and setting (bits for quantization, N:M for pruning), not by name, so renamed variants still match.
The paper used group size 128 and GPTQ with activation ordering; a variant with other settings is matched on
method and bits alone, and the report says that differences of a few points are expected anyway (hardware,
library versions, sampling).
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from importlib import resources
from typing import Any

PERSPECTIVES = ("mmlu", "toxicity", "stereotype", "advglue", "ood", "adv_demo", "privacy", "ethics", "fairness")
NOTE = ("Published: the scores of Decoding Compressed Trust (Hong et al., ICML 2024) for {model}, from the paper's "
        "project page. Differences of a few points are expected (hardware, library versions, sampling, data "
        "subsample); compare deltas against dense rather than absolute scores.")


@lru_cache(maxsize=1)
def rows() -> tuple[dict[str, Any], ...]:
    text = resources.files("comptrust").joinpath("data/dct_published.csv").read_text(encoding="utf-8")
    body = "".join(line for line in io.StringIO(text) if not line.startswith("#"))
    out = []
    for r in csv.DictReader(io.StringIO(body)):
        row: dict[str, Any] = {k: v for k, v in r.items() if k in ("model", "variant", "method", "structure")}
        row["bits"] = int(r["bits"]) if r["bits"] else None
        row["seeds"] = int(r["seeds"] or 1)
        for p in PERSPECTIVES:
            row[p] = float(r[p]) if r.get(p) else None
            row[f"{p}_std"] = float(r[f"{p}_std"]) if r.get(f"{p}_std") else None
        out.append(row)
    return tuple(out)


def models() -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows()))


def match_model(model: str | None, compare_to: str | None = None) -> str | None:
    """The published model a study compares with: compare_to, or the study's model when its name is one."""
    if compare_to:
        return compare_to
    if not model:
        return None
    name = model.rstrip("/").split("/")[-1].split("#")[-1].lower()
    if name.endswith("-hf"):
        name = name[:-3]
    return name if name in models() else None


def match_variant(model: str, describe: dict[str, Any]) -> dict[str, Any] | None:
    """The published row of `model` for a variant described by Variant.describe(), or None."""
    method = describe.get("method")
    for r in rows():
        if r["model"] != model or r["method"] != method:
            continue
        if method == "dense":
            return r
        if describe.get("structure") and describe.get("structure") == r["structure"]:
            return r
        if describe.get("bits") and r["bits"] and int(describe["bits"]) == r["bits"] and not describe.get("sparsity"):
            return r
    return None


def compare(model: str, variants: dict[str, Any], perspectives: list[str]) -> dict[str, Any]:
    """Per variant and perspective: the published score, yours - published, and both deltas against dense."""
    dense_pub = match_variant(model, {"method": "dense"})
    out: dict[str, Any] = {"model": model, "note": NOTE.format(model=model), "variants": {}}
    dense_name = next((n for n, v in variants.items() if v["describe"]["method"] == "dense"), None)
    for name, row in variants.items():
        pub = match_variant(model, row["describe"])
        if pub is None:
            continue
        cells = {}
        for p in perspectives:
            if pub.get(p) is None:
                continue
            mine = row["perspectives"].get(p, {}).get("mean")
            c = {"published": pub[p], "published_std": pub.get(f"{p}_std"),
                 "diff": None if mine is None else mine - pub[p]}
            if dense_pub and dense_pub.get(p) is not None and name != dense_name:
                c["published_delta"] = pub[p] - dense_pub[p]
                mine_d = row["perspectives"].get(p, {}).get("delta")
                c["delta_diff"] = None if mine_d is None else mine_d - c["published_delta"]
            cells[p] = c
        out["variants"][name] = {"row": pub["variant"], "perspectives": cells}
    return out
