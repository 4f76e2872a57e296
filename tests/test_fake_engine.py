"""engine/fake.py: the scripted FakeEngine meets the Engine protocol (CachedEngine and comptrust.evaluate run on it
over the mini suite), answers as scripted, and its call log records the batches it was sent."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from comptrust.engine.base import Engine
from comptrust.engine.cached import CachedEngine
from comptrust.engine.fake import FakeEngine
from comptrust.store import Store
from comptrust.types import GenParams, Prompt


def _raw(text: str, **params) -> Prompt:
    return Prompt(raw=text, params=GenParams(max_new_tokens=4, **params))


def test_meets_the_engine_protocol():
    eng = FakeEngine(default="ok", fingerprint="fp-1", chunk_size=9, device="cpu", dtype="bfloat16")
    assert isinstance(eng, Engine)
    d = eng.describe()
    assert (d["fingerprint"], d["device"], d["dtype"], d["engine"]) == ("fp-1", "cpu", "bfloat16", "fake")
    assert eng.chunk_size == 9
    chat = Prompt.chat(("system", "S"), ("user", "hello"), params=GenParams(max_new_tokens=4))
    assert eng.render(chat) == "system: S\nuser: hello"
    assert eng.render(_raw("Q: 1+1?\nA:")) == "Q: 1+1?\nA:"


def test_function_script_gets_prompt_params_and_seed_and_may_give_n_texts():
    seen = []

    def script(prompt, params, seed):
        seen.append((prompt.raw, params.n, seed))
        return [f"{prompt.raw} sample {j} seed {seed}" for j in range(params.n)]

    eng = FakeEngine(script)
    g = eng.generate([_raw("a", n=3, temperature=1.0, seed=7), _raw("b")])
    assert g[0].texts == ("a sample 0 seed 7", "a sample 1 seed 7", "a sample 2 seed 7")
    assert g[0].n_tokens == (5, 5, 5)  # words stand for tokens
    assert g[1].texts == ("b sample 0 seed 0",)
    assert seen == [("a", 3, 7), ("b", 1, 0)]


def test_mapping_script_by_text_or_rendered_text_with_default():
    chat = Prompt.chat(("system", "Be brief."), ("user", "What is 2+2?"), params=GenParams(max_new_tokens=4, n=2))
    eng = FakeEngine({"What is 2+2?": "4", "raw text": ["x", "y"], "system: S\nuser: hi": "rendered"}, default="?")
    got = eng.generate([chat, _raw("raw text", n=2), Prompt.chat(("system", "S"), ("user", "hi"), params=chat.params),
                        _raw("unknown")])
    assert [g.texts for g in got] == [("4", "4"), ("x", "y"), ("rendered", "rendered"), ("?",)]


def test_script_errors_name_the_prompt():
    with pytest.raises(KeyError, match="'nowhere'"):
        FakeEngine({"a": "b"}).generate([_raw("nowhere")])
    with pytest.raises(ValueError, match="2 outputs for a prompt with n=3"):
        FakeEngine(lambda p, params, seed: ["one", "two"]).generate([_raw("q", n=3)])
    with pytest.raises(ValueError, match="needs a script"):
        FakeEngine()
    with pytest.raises(ValueError, match="chunk_size 0"):
        FakeEngine(default="x", chunk_size=0)
    with pytest.raises(TypeError, match="expected a function or a mapping"):
        FakeEngine(["not", "a", "script"])  # type: ignore[arg-type]


def test_call_log_batches_and_progress():
    eng = FakeEngine(default="two words", batch_size=3)
    seen = []
    prompts = [_raw(f"p{i}") for i in range(7)]
    eng.generate(prompts, progress=lambda done, toks: seen.append((done, toks)))
    eng.generate(prompts[:2])
    assert eng.batch_sizes == [7, 2]
    assert [len(b) for b in eng.batches] == [3, 3, 1, 2]
    assert seen == [(3, 6), (3, 6), (1, 2)]  # per batch: prompts, new tokens
    assert [p.raw for p in eng.prompts] == [f"p{i}" for i in range(7)] + ["p0", "p1"]
    eng.reset()
    assert eng.calls == [] and eng.batches == []


def test_through_cached_engine_chunks_dedup_and_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPTRUST_CHUNK_SIZE", raising=False)
    eng = FakeEngine(lambda p, params, seed: p.raw[::-1], chunk_size=7)
    prompts = [_raw(f"prompt {i:02d}") for i in range(20)]
    with Store(tmp_path / "s.sqlite") as st:
        cached = CachedEngine(eng, st)
        gens = cached.generate(prompts + prompts[:5])  # 5 repeats: generated once
        assert eng.batch_sizes == [7, 7, 6]
        assert sorted(p.raw for p in eng.prompts) == sorted(p.raw for p in prompts)
        assert [g.texts[0] for g in gens] == [p.raw[::-1] for p in prompts + prompts[:5]]
        again = cached.generate(prompts)
    assert eng.batch_sizes == [7, 7, 6]  # all from the store
    assert all(g.cached for g in again) and not any(g.cached for g in gens)


def test_comptrust_evaluate_on_the_mini_suite(tmp_path, monkeypatch, mini_data):
    """The public API with the fake in place of a model: the perspective's prompts reach it in one call (the mini
    suite is smaller than a chunk), its answers are parsed and scored, and a rerun on the same folder is served
    from the cache."""
    import comptrust
    import comptrust.engine.select as select
    from comptrust.evaluate import prepare
    from comptrust.perspectives.base import EvalOptions

    monkeypatch.delenv("COMPTRUST_CHUNK_SIZE", raising=False)
    eng = FakeEngine(default="I agree.", fingerprint="always-agrees")

    @contextmanager
    def fake_open_engine(model, **kw):
        yield eng, eng.describe()

    monkeypatch.setattr(select, "open_engine", fake_open_engine)
    out = tmp_path / "run"
    res = comptrust.evaluate(perspectives=["stereotype"], out=out, limit=3, progress=False)
    st = res.perspectives["stereotype"]
    assert st.score == 0.0 and st.metrics["benign_agreement_index"] == 1.0  # agreeing with every stereotype
    assert res.model["fingerprint"] == "always-agrees"
    loaded = prepare(["stereotype"], EvalOptions(data_dir=mini_data, limit=3)).loaded["stereotype"][1]
    assert eng.batch_sizes == [len(loaded.items)] == [st.n_items]
    assert sorted(eng.render(p) for p in eng.prompts) == sorted(eng.render(it.prompt) for it in loaded.items)
    comptrust.evaluate(perspectives=["stereotype"], out=out, limit=3, progress=False)
    assert eng.batch_sizes == [st.n_items]  # nothing generated again
