"""Perspective registry: short names -> classes, imported lazily so the CLI starts fast."""

from __future__ import annotations

import difflib
import importlib
import importlib.util

from comptrust.errors import UsageError

# name -> "module:Class". MMLU is listed last: it is the benign-accuracy reference, not a trust perspective.
REGISTRY: dict[str, str] = {
    "toxicity": "comptrust.perspectives.toxicity:Toxicity",
    "stereotype": "comptrust.perspectives.stereotype:Stereotype",
    "advglue": "comptrust.perspectives.advglue:AdvGlue",
    "ood": "comptrust.perspectives.ood:OOD",
    "adv_demo": "comptrust.perspectives.adv_demo:AdvDemo",
    "privacy": "comptrust.perspectives.privacy:Privacy",
    "ethics": "comptrust.perspectives.ethics:Ethics",
    "fairness": "comptrust.perspectives.fairness:Fairness",
    "mmlu": "comptrust.perspectives.mmlu:MMLU",
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
