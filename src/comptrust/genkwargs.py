"""--gen-kwargs: off-protocol decoding settings (lm-eval's `--gen_kwargs temperature=0.7,max_gen_toks=64`).

Why it exists: people compare a model's behaviour under their own serving settings. Why it is marked: every
perspective's decoding (greedy or t=1, its max new tokens, n) is DecodingTrust's protocol, and scores under other
settings are not DecodingTrust scores. The settings are kept as one canonical string (sorted keys), so they are part
of the run's options, of its config fingerprint and, through each prompt's decoding parameters, of every cache key:
off-protocol generations never mix with protocol ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from comptrust.errors import UsageError
from comptrust.types import GenParams, Item

# key -> (GenParams field, type, check, what a valid value is)
_KEYS: dict[str, tuple[str, type, Any, str]] = {
    "temperature": ("temperature", float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_p": ("top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_new_tokens": ("max_new_tokens", int, lambda v: v > 0, "a positive integer"),
    "max_gen_toks": ("max_new_tokens", int, lambda v: v > 0, "a positive integer"),  # lm-eval's name
    "n": ("n", int, lambda v: v > 0, "a positive integer"),
    "seed": ("seed", int, lambda v: v >= 0, "an integer >= 0"),
}


def parse(text: str, flag: str = "--gen-kwargs") -> dict[str, Any]:
    """'temperature=0.7,max_new_tokens=64' -> {GenParams field: value}; one-line UsageError on anything else."""
    out: dict[str, Any] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, eq, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not raw:
            raise UsageError(f"{flag} {text}: '{part}' is not key=value")
        if key == "do_sample":  # lm-eval's switch: false = greedy; true = sample (at temperature 1 unless given)
            if raw.lower() not in ("true", "false"):
                raise UsageError(f"{flag} {text}: do_sample must be true or false")
            if raw.lower() == "false":
                out["temperature"] = 0.0
            else:
                out.setdefault("temperature", 1.0)
            continue
        if key not in _KEYS:
            raise UsageError(f"{flag} {text}: unknown key '{key}'; known: {', '.join([*_KEYS, 'do_sample'])} "
                             "(stop sequences such as 'until' are not supported)")
        field, kind, ok, what = _KEYS[key]
        try:
            val = kind(raw)
        except ValueError:
            raise UsageError(f"{flag} {text}: {key}={raw}: expected {what}") from None
        if not ok(val):
            raise UsageError(f"{flag} {text}: {key}={raw}: expected {what}")
        out[field] = val
    if not out:
        raise UsageError(f"{flag} {text!r}: no key=value settings (e.g. temperature=0.7,max_new_tokens=64)")
    return out


def canonical(text: str) -> str:
    """The same settings, spelled one way (GenParams field names, sorted): what outputs record."""
    return ",".join(f"{k}={v}" for k, v in sorted(parse(text).items()))


def apply(items: Sequence[Item], text: str | None) -> list[Item]:
    """Items with the settings laid over each prompt's protocol decoding parameters (unchanged when text is None)."""
    if not text:
        return list(items)
    kw = parse(text)
    out = []
    for it in items:
        params: GenParams = replace(it.prompt.params, **kw)
        out.append(replace(it, prompt=replace(it.prompt, params=params)))
    return out
