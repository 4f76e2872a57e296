"""CachedEngine's chunk size: the engine's own chunk_size is honoured, COMPTRUST_CHUNK_SIZE overrides it, and the
cut is deterministic (engine.fake.FakeEngine records the calls it gets; no model needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from comptrust.engine.cached import DEFAULT_CHUNK_SIZE, CachedEngine, chunk_size_for
from comptrust.engine.fake import FakeEngine
from comptrust.store import Store
from comptrust.types import GenParams, Prompt


def _reverser(chunk_size: int = DEFAULT_CHUNK_SIZE) -> FakeEngine:
    """Answers every prompt with its own text reversed."""
    return FakeEngine(lambda prompt, params, seed: prompt.raw[::-1], fingerprint="scripted", chunk_size=chunk_size)


def _calls(eng: FakeEngine) -> list[list[str]]:
    return [[p.raw for p in call] for call in eng.calls]


def _prompts(k: int) -> list[Prompt]:
    return [Prompt(raw=f"prompt {i:03d} " + "x" * (i % 7), params=GenParams(max_new_tokens=4)) for i in range(k)]


def test_engine_chunk_size_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPTRUST_CHUNK_SIZE", raising=False)
    eng = _reverser(chunk_size=7)
    with Store(tmp_path / "s.sqlite") as st:
        gens = CachedEngine(eng, st).generate(_prompts(20))
    assert eng.batch_sizes == [7, 7, 6]
    assert [g.texts[0] for g in gens] == [p.raw[::-1] for p in _prompts(20)]


def test_env_overrides_engine_and_explicit_overrides_env(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPTRUST_CHUNK_SIZE", "4")
    eng = _reverser(chunk_size=1024)
    with Store(tmp_path / "s.sqlite") as st:
        CachedEngine(eng, st).generate(_prompts(10))
    assert eng.batch_sizes == [4, 4, 2]
    assert chunk_size_for(eng, 3) == 3


def test_default_without_attribute_or_env(monkeypatch):
    monkeypatch.delenv("COMPTRUST_CHUNK_SIZE", raising=False)
    assert chunk_size_for(SimpleNamespace(fingerprint="no-chunk-size")) == DEFAULT_CHUNK_SIZE
    assert chunk_size_for(SimpleNamespace(chunk_size=0)) == DEFAULT_CHUNK_SIZE  # nonsense attribute: the default
    assert chunk_size_for(SimpleNamespace(chunk_size=True)) == DEFAULT_CHUNK_SIZE


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
    whole = _reverser(chunk_size=6)
    with Store(tmp_path / "a.sqlite") as st:
        CachedEngine(whole, st).generate(prompts)

    class Failing(FakeEngine):  # its second call fails (and is recorded as the fake records every call)
        def generate(self, ps, progress=None):
            if len(self.calls) == 1:
                self.calls.append(tuple(ps))
                raise RuntimeError("boom")
            return super().generate(ps, progress)

    broken = Failing(lambda prompt, params, seed: prompt.raw[::-1], fingerprint="scripted", chunk_size=6)
    with Store(tmp_path / "b.sqlite") as st:
        with pytest.raises(RuntimeError):
            CachedEngine(broken, st).generate(prompts)
        resumed = _reverser(chunk_size=6)
        CachedEngine(resumed, st).generate(prompts)
    assert _calls(broken)[0] == _calls(whole)[0]
    assert _calls(resumed) == _calls(whole)[1:]
