"""What every result file carries about the run that wrote it, and the JSON Schemas those files follow.

scores.json (comptrust evaluate) and results.json (a study's report) start with the same header: a schema
version (bumped when a field changes meaning or goes away; new fields do not bump it), when the file was written
(ISO 8601, UTC), the command line, and the versions of the packages that decide outputs. The schemas ship in
``comptrust/schemas/`` so a pipeline can validate a file without this package's code (tests validate real outputs
against them).
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSIONS = {"scores": "1.0", "results": "1.0"}
SCHEMA_DIR = Path(__file__).parent / "schemas"
# distributions whose versions change outputs (reported when installed; torch is named by its import)
VERSIONED = ("torch", "transformers", "tokenizers", "accelerate", "gguf", "llmcompressor", "compressed-tensors",
             "vllm", "llama-cpp-python", "alt-profanity-check")


def versions() -> dict[str, str]:
    """comptrust, Python and the installed ones of VERSIONED (read from package metadata: imports nothing)."""
    from comptrust import __version__

    out = {"comptrust": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")  # the running build (2.13.0+cpu), which the metadata may spell differently
    if torch is not None:
        out["torch"] = torch.__version__
    return out


def command_line() -> str:
    """The command as typed (`comptrust evaluate ...`), or the Python program that called the API."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("comptrust", "__main__.py"):
        argv[0] = "comptrust"
    return shlex.join(argv)


def run_header(kind: str) -> dict[str, Any]:
    """The first keys of a result file of `kind` ("scores" or "results")."""
    return {
        "schema_version": SCHEMA_VERSIONS[kind],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "versions": versions(),
    }


def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a result file: "scores" or "results"."""
    return json.loads((SCHEMA_DIR / f"{kind}.schema.json").read_text(encoding="utf-8"))
