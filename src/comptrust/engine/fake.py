"""A scripted engine: the Engine protocol (engine/base.py) with outputs written by the caller, no model.

For tests of what sits above the engine (evaluate, studies, reports, the generation cache) and for trying the
pipeline without a model:

    engine = FakeEngine(lambda prompt, params, seed: "I agree.")         # one answer for every sample
    engine = FakeEngine({"What is 2+2?": "4"}, default="I don't know.")  # by prompt text
    CachedEngine(engine, store).generate(prompts)
    engine.batch_sizes                                                  # [128, 128, 44]: the calls it got

The script is a function ``(prompt, params, seed) -> text or n texts`` (params is ``prompt.params``, seed is
``params.seed``), or a mapping from a prompt's text (a raw prompt's text, or a chat prompt's last message) or its
rendered text to a text or n texts; ``default`` answers prompts a mapping does not name (without one such a
prompt is an error naming it). A single text stands for all n samples. Token counts are the words of each text.

Every generate() call is recorded, in order, in ``calls`` (the prompts of that call); with ``batch_size`` a call
is answered in batches of that many prompts, each recorded in ``batches`` and reported to ``progress``, as a real
engine reports its batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence, Union

from comptrust.engine.base import Generation
from comptrust.types import GenParams, Prompt

Answer = Union[str, Sequence[str]]
ScriptFn = Callable[[Prompt, GenParams, int], Answer]
Script = Union[ScriptFn, Mapping[str, Answer]]


class FakeEngine:
    """A scripted engine meeting engine.base.Engine; records the calls and batches it gets."""

    backend = "fake"

    def __init__(
        self,
        script: Script | None = None,
        *,
        default: Answer | None = None,
        fingerprint: str = "fake",
        chunk_size: int = 128,
        batch_size: int | None = None,
        device: str = "cpu",
        dtype: str = "none",
        name: str = "fake",
    ):
        if script is None and default is None:
            raise ValueError("FakeEngine needs a script (a function or a mapping) or a default answer")
        if script is not None and not callable(script) and not isinstance(script, Mapping):
            raise TypeError(f"FakeEngine script: expected a function or a mapping, got {type(script).__name__}")
        for what, v in (("chunk_size", chunk_size), ("batch_size", batch_size)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"FakeEngine {what} {v!r}: expected a positive integer")
        self.script = script
        self.default = default
        self.fingerprint = fingerprint
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.name = name
        self.load_seconds = 0.0
        self.calls: list[tuple[Prompt, ...]] = []  # one entry per generate() call, its prompts in order
        self.batches: list[tuple[Prompt, ...]] = []  # the batches those calls were answered in

    # -- the Engine protocol ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "fake", "fingerprint": self.fingerprint, "engine": self.backend,
                "device": self.device, "dtype": self.dtype}

    def render(self, prompt: Prompt) -> str:
        """Raw prompts as they are; chat prompts as 'role: content' lines."""
        if prompt.raw is not None:
            return prompt.raw
        return "\n".join(f"{m.role}: {m.content}" for m in prompt.messages)

    def generate(
        self, prompts: Sequence[Prompt], progress: Callable[[int, int], None] | None = None
    ) -> list[Generation]:
        prompts = tuple(prompts)
        self.calls.append(prompts)
        step = self.batch_size or max(len(prompts), 1)
        out: list[Generation] = []
        for b in range(0, len(prompts), step):
            batch = prompts[b : b + step]
            self.batches.append(batch)
            gens = [self._generation(p) for p in batch]
            out += gens
            if progress:
                progress(len(batch), sum(sum(g.n_tokens) for g in gens))
        return out

    # -- the call log ----------------------------------------------------------------------------------------
    @property
    def batch_sizes(self) -> list[int]:
        """Prompts per generate() call, in call order."""
        return [len(c) for c in self.calls]

    @property
    def prompts(self) -> list[Prompt]:
        """Every prompt generated for, in the order the calls sent them (repeats included)."""
        return [p for c in self.calls for p in c]

    def reset(self) -> None:
        self.calls.clear()
        self.batches.clear()

    # -- scripting -------------------------------------------------------------------------------------------
    @staticmethod
    def text_of(prompt: Prompt) -> str:
        """The text a mapping is keyed by: a raw prompt's text, or a chat prompt's last message."""
        if prompt.raw is not None:
            return prompt.raw
        return prompt.messages[-1].content if prompt.messages else ""

    def _answer(self, prompt: Prompt) -> Answer:
        if callable(self.script):
            return self.script(prompt, prompt.params, prompt.params.seed)
        if isinstance(self.script, Mapping):
            for key in (self.text_of(prompt), self.render(prompt)):
                if key in self.script:
                    return self.script[key]
        if self.default is None:
            raise KeyError(f"FakeEngine: no scripted output for the prompt {self.text_of(prompt)[:80]!r} and no default")
        return self.default

    def _generation(self, prompt: Prompt) -> Generation:
        n = prompt.params.n
        got = self._answer(prompt)
        texts = (got,) * n if isinstance(got, str) else tuple(got)
        if len(texts) != n or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"FakeEngine: the script gave {len(texts)} outputs for a prompt with n={n} "
                             f"({self.text_of(prompt)[:80]!r}); give one text or n texts")
        return Generation(texts, tuple(len(t.split()) for t in texts))
