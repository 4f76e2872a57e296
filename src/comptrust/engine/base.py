"""The engine contract every backend (HF transformers, later vLLM and OpenAI-compatible servers) meets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from comptrust.types import Prompt


@dataclass(frozen=True)
class Generation:
    texts: tuple[str, ...]  # n outputs for one prompt
    n_tokens: tuple[int, ...]  # new tokens generated for each output (EOS excluded)
    cached: bool = False


class Engine(Protocol):
    fingerprint: str  # names the weights AND what changes outputs (dtype, template): part of every cache key

    def render(self, prompt: Prompt) -> str:
        """The exact text the model will see (chat template applied)."""

    def generate(
        self, prompts: Sequence[Prompt], progress: Callable[[int, int], None] | None = None
    ) -> list[Generation]:
        """One Generation per prompt, in order. progress(prompts_done, new_tokens) is called per batch."""
