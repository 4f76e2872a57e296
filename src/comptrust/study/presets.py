"""Study presets: the paper's grid as one name.

``comptrust study --preset dct-llama2-13b-chat`` runs the comparison of *Decoding Compressed Trust* (Hong et al.,
ICML 2024) for one of its three models: the full DecodingTrust data, the full profile, and the paper's compression
grid (presets/dct-grid.yaml). A study file may start from a preset (``preset: NAME``) and override any key, e.g.
``model: ~`` for the embedded model, ``suite: mini`` for the built-in suites (a file that sets ``suite`` takes none
of the preset's data keys: data_dir, mmlu_dir, profile) or a shorter ``variants`` list;
``comptrust study --init --preset NAME`` prints the preset as a study file to edit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from comptrust.errors import UsageError

GRID = Path(__file__).parent / "presets" / "dct-grid.yaml"


@dataclass(frozen=True)
class Preset:
    model: str  # the Hub id the paper evaluated
    compare_to: str  # its name among the published scores
    title: str


PRESETS = {
    "dct-llama2-13b-chat": Preset("meta-llama/Llama-2-13b-chat-hf", "llama-2-13b-chat", "LLAMA2 13b Chat"),
    "dct-llama2-13b": Preset("meta-llama/Llama-2-13b-hf", "llama-2-13b", "LLAMA2 13b (base)"),
    "dct-vicuna-13b": Preset("lmsys/vicuna-13b-v1.3", "vicuna-13b-v1.3", "Vicuna 13b v1.3"),
}

# what every preset evaluates on: DecodingTrust's data and MMLU from the Hub, the protocol's full counts
DATA = {"suite": "dt", "data_dir": "hf:AI-Secure/DecodingTrust", "mmlu_dir": "hf:cais/mmlu", "profile": "full"}


def get(name: str) -> Preset:
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UsageError(f"unknown preset '{name}'{did}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_data(name: str) -> dict[str, Any]:
    """The preset's study keys, as a study file would hold them."""
    p = get(name)
    return {"model": p.model, "compare_to": p.compare_to, **DATA, **yaml.safe_load(GRID.read_text(encoding="utf-8"))}


def preset_yaml(name: str) -> str:
    """The preset as a commented study file (what `comptrust study --init --preset NAME` prints)."""
    p = get(name)
    head = [
        f"# comptrust study preset '{name}': Decoding Compressed Trust's grid for {p.title}.",
        f"# Run it with `comptrust study --preset {name} --out runs/{name}`, or edit this file and run it.",
        "# For the embedded model instead: preset: NAME, model: ~ , suite: mini (and, say, limit: 2).",
        f"model: {p.model}",
        f"compare_to: {p.compare_to}      # print the paper's published scores beside yours",
        *(f"{k}: {v}" for k, v in DATA.items()),
        "",
    ]
    return "\n".join(head) + GRID.read_text(encoding="utf-8")


def merge(data: Any, cli_preset: str | None = None) -> Any:
    """A study file's keys over its preset's (``preset: NAME`` in the file, or --preset on the command line)."""
    if not isinstance(data, dict) and data is not None:
        return data  # parse_spec says what is wrong with it
    data = dict(data or {})
    name = data.pop("preset", None) or cli_preset
    if name is None:
        return data
    if not isinstance(name, str):
        raise UsageError(f"preset: expected a preset name ({', '.join(PRESETS)}), got {type(name).__name__}")
    base = preset_data(name)
    if "suite" in data:  # the data keys go together: another suite brings its own data_dir, mmlu_dir and profile
        base = {k: v for k, v in base.items() if k not in DATA}
    return {**base, **data}
