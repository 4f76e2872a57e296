"""The engine contract every backend (HF transformers, vLLM, OpenAI-compatible servers, llama.cpp) meets.

Everything a caller reads from an engine is declared here, so a new backend knows what to provide and a type
checker can hold callers to it: ``CachedEngine`` reads ``fingerprint`` (part of every cache key) and
``chunk_size`` (prompts per call and per committed transaction); ``engine.select.open_engine`` reads
``describe()`` (the model description stored with every score); the report reads ``device`` and ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from comptrust.types import Prompt


@dataclass(frozen=True)
class Generation:
    texts: tuple[str, ...]  # n outputs for one prompt
    n_tokens: tuple[int, ...]  # new tokens generated for each output (EOS excluded)
    cached: bool = False


@runtime_checkable
class Engine(Protocol):
    """A batch-first generator: prompts in, one Generation per prompt out, in the same order."""

    fingerprint: str  # names the weights AND what changes outputs (dtype, template): part of every cache key
    device: str  # "cpu", "cuda", "cuda:1", or where a served model runs ("remote")
    dtype: str  # "bfloat16", "float32", ... (a served model: what the server reports, or "unknown")
    chunk_size: int  # prompts per generate() call that fill this engine's batches (CachedEngine honours it)

    def describe(self) -> dict[str, Any]:
        """What is stored as the model's description next to every score (path, fingerprint, engine, ...)."""
        ...

    def render(self, prompt: Prompt) -> str:
        """The exact text the model will see (chat template applied)."""
        ...

    def generate(
        self, prompts: Sequence[Prompt], progress: Callable[[int, int], None] | None = None
    ) -> list[Generation]:
        """One Generation per prompt, in order. progress(prompts_done, new_tokens) is called per batch."""
        ...
