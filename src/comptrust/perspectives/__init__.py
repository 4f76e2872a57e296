"""Perspective registry: short names -> classes, imported lazily so the CLI starts fast."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from functools import lru_cache

from comptrust.errors import UsageError

# name -> "module:Class", in the order every listing, table and chart uses: the paper's result-sheet order,
# benign accuracy (MMLU, the reference, not a trust perspective) first, then the eight trust perspectives.
# A new perspective is one line here plus its module (which declares its title, short title, description and
# settings), its protocol YAML, its mini-suite data and its tests.
REGISTRY: dict[str, str] = {
    "mmlu": "comptrust.perspectives.mmlu:MMLU",
    "advglue": "comptrust.perspectives.advglue:AdvGlue",
    "ood": "comptrust.perspectives.ood:OOD",
    "adv_demo": "comptrust.perspectives.adv_demo:AdvDemo",
    "ethics": "comptrust.perspectives.ethics:Ethics",
    "fairness": "comptrust.perspectives.fairness:Fairness",
    "toxicity": "comptrust.perspectives.toxicity:Toxicity",
    "privacy": "comptrust.perspectives.privacy:Privacy",
    "stereotype": "comptrust.perspectives.stereotype:Stereotype",
}


def available() -> list[str]:
    """Names whose module exists in this installation."""
    out = []
    for name, target in REGISTRY.items():
        mod = target.split(":")[0]
        if importlib.util.find_spec(mod) is not None:
            out.append(name)
    return out


def canonical(name: str) -> str:
    """The registry spelling of a perspective name typed by a person: case-insensitive, '-' for '_' (lm-eval's
    task names are lower case, people type `-p MMLU` or `adv-demo`). Unknown names come back as given."""
    key = name.strip().lower().replace("-", "_")
    return key if key in REGISTRY else name


def get(name: str):
    name = canonical(name)
    if name not in REGISTRY:
        hint = difflib.get_close_matches(name.lower().replace("-", "_"), REGISTRY, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UsageError(f"unknown perspective '{name}'{extra}; known: {', '.join(REGISTRY)}")
    mod, cls = REGISTRY[name].split(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == mod:
            raise UsageError(f"perspective '{name}' is not implemented in this version") from None
        raise
    return getattr(module, cls)()


def parse_list(spec: str) -> list[str]:
    """'all' or a comma list -> validated names, in registry order for 'all'."""
    if spec.strip().lower() == "all":
        return list(REGISTRY)
    names = list(dict.fromkeys(canonical(s) for s in spec.split(",") if s.strip()))
    if not names:
        raise UsageError("no perspective given; use e.g. --perspectives stereotype or --perspectives all")
    for n in names:
        if n not in REGISTRY:
            get(n)  # raises the helpful error
    return names


@lru_cache(maxsize=None)
def short_title(name: str) -> str:
    """A perspective's label in charts and narrow tables (its class's ``short_title``; the name if unknown)."""
    try:
        return get(name).short_title or name
    except UsageError:
        return name
