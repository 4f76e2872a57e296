"""Optional extras (pyproject's [project.optional-dependencies]) checked before any work starts.

Why up front: a missing [compress] extra used to surface as a ModuleNotFoundError after the model was loaded
and its perplexity measured, and a missing [report] extra as a traceback after a whole study had run. Each
command that needs an extra asks `require()` first, which answers with one line and the exact install command
(exit 2: the environment, not the run, is what needs changing). Modules are looked up with find_spec, so the
check imports nothing heavy and costs microseconds.
"""

from __future__ import annotations

import importlib.util

from comptrust.errors import UsageError

# extra -> the import names that must be present for it to work (what pyproject's extra installs)
EXTRAS: dict[str, tuple[str, ...]] = {
    "compress": ("llmcompressor", "compressed_tensors", "datasets"),
    "report": ("matplotlib", "jinja2"),
    "toxicity": ("profanity_check",),
    "ray": ("ray",),
    "serve": ("llama_cpp",),
    "vllm": ("vllm",),
    "test": ("pytest", "hypothesis", "jsonschema"),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that are not importable here (empty when the extra is installed)."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def install_line(*extras: str) -> str:
    return f"pip install 'comptrust[{','.join(extras)}]'"


def require(what: str, *extras: str) -> None:
    """Raise one UsageError naming every missing extra of `extras` and the pip line that installs them all.

    what: the work that needs them, as the user would say it ("comptrust compress", "the study's report")."""
    gaps = {e: missing(e) for e in extras}
    gaps = {e: m for e, m in gaps.items() if m}
    if not gaps:
        return
    names = ", ".join(f"[{e}] (missing {', '.join(m)})" for e, m in gaps.items())
    raise UsageError(f"{what} needs the {names} extra{'s' if len(gaps) > 1 else ''}: {install_line(*gaps)}")
