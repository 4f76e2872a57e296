"""CachedEngine's chunk size: the engine's own chunk_size is honoured, COMPTRUST_CHUNK_SIZE overrides it, and the
cut is deterministic (a scripted engine records the calls it gets; no model needed)."""

from __future__ import annotations

import pytest

from comptrust.engine.base import Generation
from comptrust.engine.cached import DEFAULT_CHUNK_SIZE, CachedEngine, chunk_size_for
from comptrust.store import Store
from comptrust.types import GenParams, Prompt


class ScriptedEngine:
    """Answers every prompt with its own text reversed; records the size and content of each generate() call."""

    def __init__(self, chunk_size=None):
        self.fingerprint = "scripted"
        if chunk_size is not None:
            self.chunk_size = chunk_size
        self.calls: list[list[str]] = []

    def render(self, prompt: Prompt) -> str:
        return prompt.raw

    def generate(self, prompts, progress=None):
        self.calls.append([p.raw for p in prompts])
        return [Generation((p.raw[::-1],), (len(p.raw),)) for p in prompts]


def _prompts(k: int) -> list[Prompt]:
    return [Prompt(raw=f"prompt {i:03d} " + "x" * (i % 7), params=GenParams(max_new_tokens=4)) for i in range(k)]


def test_engine_chunk_size_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPTRUST_CHUNK_SIZE", raising=False)
    eng = ScriptedEngine(chunk_size=7)
    with Store(tmp_path / "s.sqlite") as st:
        gens = CachedEngine(eng, st).generate(_prompts(20))
    assert [len(c) for c in eng.calls] == [7, 7, 6]
    assert [g.texts[0] for g in gens] == [p.raw[::-1] for p in _prompts(20)]


def test_env_overrides_engine_and_explicit_overrides_env(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPTRUST_CHUNK_SIZE", "4")
    eng = ScriptedEngine(chunk_size=1024)
    with Store(tmp_path / "s.sqlite") as st:
        CachedEngine(eng, st).generate(_prompts(10))
    assert [len(c) for c in eng.calls] == [4, 4, 2]
    assert chunk_size_for(eng, 3) == 3


def test_default_without_attribute_or_env(monkeypatch):
    monkeypatch.delenv("COMPTRUST_CHUNK_SIZE", raising=False)
    assert chunk_size_for(ScriptedEngine()) == DEFAULT_CHUNK_SIZE
    assert chunk_size_for(ScriptedEngine(chunk_size=0)) == DEFAULT_CHUNK_SIZE  # nonsense attribute: the default


def test_hf_engine_chunk_reaches_cached_engine(tmp_path, monkeypatch):
    """The attribute hf.py exposes (128 on the CPU, 1,024 on CUDA) is what CachedEngine uses."""
    monkeypatch.delenv("COMPTRUST_CHUNK_SIZE", raising=False)
    from comptrust.engine.hf import HFEngine
    from comptrust.errors import UsageError
    from comptrust.models import resolve

    try:
        eng = HFEngine(resolve(None), device="cpu")  # loads the tokenizer only; the model loads on first use
    except UsageError:
        pytest.skip("the embedded model (for its tokenizer) is not installed")
    eng.chunk_size = 33
    with Store(tmp_path / "s.sqlite") as st:
        assert CachedEngine(eng, st).chunk_size == 33


def test_cut_is_deterministic_and_resume_sees_the_same_chunks(tmp_path, monkeypatch):
    """An interrupted run (its second chunk fails) resumed later sends the engine exactly the chunks an
    uninterrupted run sends after the first one: what the crash tests rely on."""
    monkeypatch.delenv("COMPTRUST_CHUNK_SIZE", raising=False)
    prompts = _prompts(25)
    whole = ScriptedEngine(chunk_size=6)
    with Store(tmp_path / "a.sqlite") as st:
        CachedEngine(whole, st).generate(prompts)

    class Failing(ScriptedEngine):
        def generate(self, ps, progress=None):
            if len(self.calls) == 1:
                self.calls.append(["<failed>"])
                raise RuntimeError("boom")
            return super().generate(ps, progress)

    broken = Failing(chunk_size=6)
    with Store(tmp_path / "b.sqlite") as st:
        with pytest.raises(RuntimeError):
            CachedEngine(broken, st).generate(prompts)
        resumed = ScriptedEngine(chunk_size=6)
        CachedEngine(resumed, st).generate(prompts)
    assert broken.calls[0] == whole.calls[0]
    assert resumed.calls == whole.calls[1:]
