"""The HF engine and the generation cache on the real embedded model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest

from comptrust.engine.cached import CachedEngine
from comptrust.engine.hf import HFEngine
from comptrust.models import resolve
from comptrust.store import Store
from comptrust.types import GenParams, Prompt

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "Write one sentence about the sea, please, in a calm and friendly tone.",
    "Is water wet? Answer yes or no.",
]


@pytest.fixture(scope="module")
def engine_fp32():
    return HFEngine(resolve(None), dtype="float32", batch_size=8)


def _greedy(q: str, n_tokens: int = 12) -> Prompt:
    return Prompt.chat(("user", q), params=GenParams(max_new_tokens=n_tokens))


def test_render_uses_chat_template(engine_fp32):
    text = engine_fp32.render(Prompt.chat(("system", "SYS"), ("user", "HELLO"), params=GenParams(max_new_tokens=4)))
    assert "<|im_start|>system\nSYS<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    raw = engine_fp32.render(Prompt(raw="Question: 1+1?\nAnswer:", params=GenParams(max_new_tokens=4)))
    assert raw == "Question: 1+1?\nAnswer:"


def test_batched_greedy_equals_one_by_one(engine_fp32):
    prompts = [_greedy(q) for q in QUESTIONS]
    batched = engine_fp32.generate(prompts)
    single = [engine_fp32.generate([p])[0] for p in prompts]
    assert [g.texts for g in batched] == [g.texts for g in single]
    assert "Paris" in batched[0].texts[0]


def test_stops_at_eos_per_sequence(engine_fp32):
    g = engine_fp32.generate([_greedy("Reply with only the word: yes", 64), _greedy(QUESTIONS[2], 64)])
    assert g[0].n_tokens[0] < 64  # the short answer ended at EOS
    assert "<|im_end|>" not in g[0].texts[0]


def test_sampling_n_and_seed(engine_fp32):
    p = Prompt.chat(("user", "Say a random animal."), params=GenParams(max_new_tokens=8, temperature=1.0, n=4, seed=7))
    a = engine_fp32.generate([p])[0]
    b = engine_fp32.generate([p])[0]
    assert len(a.texts) == 4 and a.texts == b.texts  # same seed, same batch -> same samples
    assert len(set(a.texts)) > 1  # n samples differ from each other


def test_cache_reuses_and_dedupes(engine_fp32, tmp_path):
    calls = []
    real = engine_fp32.generate

    def counting(prompts, progress=None):
        calls.append(len(prompts))
        return real(prompts, progress)

    engine_fp32.generate = counting  # type: ignore[method-assign]
    try:
        with Store(tmp_path / "c.sqlite") as store:
            ce = CachedEngine(engine_fp32, store)
            prompts = [_greedy(QUESTIONS[0], 6), _greedy(QUESTIONS[0], 6), _greedy(QUESTIONS[1], 6)]
            first = ce.generate(prompts)
            assert calls == [2]  # the duplicate was generated once
            second = CachedEngine(engine_fp32, store).generate(prompts)
            assert calls == [2]  # nothing new
            assert [g.texts for g in first] == [g.texts for g in second]
            assert all(g.cached for g in second)
    finally:
        del engine_fp32.generate


def test_bf16_engine_fingerprint_differs(engine_fp32):
    bf = HFEngine(resolve(None), dtype="bfloat16")
    assert bf.fingerprint != engine_fp32.fingerprint


def test_compact_loop_matches_transformers_generate(engine_fp32):
    """Our decode loop (finished rows leave the batch) gives exactly model.generate()'s greedy outputs."""
    prompts = [_greedy(q, 24) for q in QUESTIONS] + [_greedy("Reply with only the word: yes", 24)]
    ours = engine_fp32.generate(prompts)
    engine_fp32.loop = "hf"
    try:
        ref = engine_fp32.generate(prompts)
    finally:
        engine_fp32.loop = "compact"
    assert [g.texts for g in ours] == [g.texts for g in ref]
    assert [g.n_tokens for g in ours] == [g.n_tokens for g in ref]


def test_sampling_respects_top_p(engine_fp32):
    # top_p tiny -> only the most likely token survives -> sampling equals greedy
    q = "What is the capital of France?"
    sampled = engine_fp32.generate(
        [Prompt.chat(("user", q), params=GenParams(max_new_tokens=10, temperature=1.0, top_p=1e-6, n=2))]
    )[0]
    greedy = engine_fp32.generate([_greedy(q, 10)])[0]
    assert sampled.texts == (greedy.texts[0], greedy.texts[0])


def test_sampled_outputs_do_not_depend_on_batch_mates(engine_fp32):
    p = Prompt.chat(("user", "Say a random animal."), params=GenParams(max_new_tokens=8, temperature=1.0, n=2, seed=3))
    other = Prompt.chat(("user", QUESTIONS[2]), params=GenParams(max_new_tokens=8, temperature=1.0, n=2, seed=3))
    alone = engine_fp32.generate([p])[0]
    together = engine_fp32.generate([other, p])[1]
    assert alone.texts == together.texts


def test_static_loop_matches_transformers_generate(engine_fp32):
    """The static-cache loop (the GPU default, here without CUDA graphs) gives model.generate()'s greedy outputs,
    with and without shared-prefix prefill."""
    prompts = [_greedy(q, 16) for q in QUESTIONS[:3]]
    engine_fp32.loop = "hf"
    try:
        ref = engine_fp32.generate(prompts)
        engine_fp32.loop = "static"
        ours = engine_fp32.generate(prompts)
        engine_fp32.prefix_sharing = False
        plain = engine_fp32.generate(prompts)
    finally:
        engine_fp32.loop, engine_fp32.prefix_sharing = "auto", True
    assert [g.texts for g in ours] == [g.texts for g in ref] == [g.texts for g in plain]


def test_compile_setting_is_checked_and_auto_stays_eager_on_the_cpu(engine_fp32):
    """Compile settings and the engine's environment switches are checked up front; "auto" does not compile
    (compiling is opt-in), so the static loop runs the plain model."""
    from comptrust.errors import UsageError

    with pytest.raises(UsageError, match="compile setting='fast'"):
        HFEngine(resolve(None), compile="fast")
    for var, value in (("COMPTRUST_COMPILE", "yes"), ("COMPTRUST_DECODE_ATTN", "flash"),
                       ("COMPTRUST_TRITON_DECODE", "64,2")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(var, value)
            with pytest.raises(UsageError, match=f"{var}='{value}'"):
                HFEngine(resolve(None))
    engine_fp32.loop = "static"
    try:
        engine_fp32.generate([_greedy(QUESTIONS[1], 4)])
    finally:
        engine_fp32.loop = "auto"
    assert engine_fp32.compile == "auto"
    assert engine_fp32._decode_fwd is engine_fp32.model
    assert not any("compiled" in n for n in engine_fp32.notes)


def test_decode_mask_rows_reads_every_mask_form():
    """The visible slots the Triton decode kernel gets, from each mask form transformers may pass."""
    import torch

    from comptrust.engine.attention import _decode_mask_rows

    want = torch.tensor([[False, True, True, False], [True, True, True, True]])
    bool4 = want[:, None, None, :].clone()
    add4 = torch.zeros(2, 1, 1, 4).masked_fill(~bool4, torch.finfo(torch.float32).min)
    assert torch.equal(_decode_mask_rows(bool4, 2, 4), want)
    assert torch.equal(_decode_mask_rows(add4, 2, 4), want)
    assert torch.equal(_decode_mask_rows(want.long(), 2, 4), want)
    assert torch.equal(_decode_mask_rows(bool4, 2, 3), want[:, :3])  # only the slots the keys have
    assert torch.equal(_decode_mask_rows(want[:1, None, None, :], 2, 4), want[:1].expand(2, 4))
    assert _decode_mask_rows(None, 2, 4) is None


def test_compiled_decode_step_compiles_twice_at_most_and_keeps_outputs(engine_fp32, monkeypatch):
    """COMPTRUST_COMPILE=on: batches of new shapes and new caches (and a compaction) do not recompile the decode
    step (batch rows and cache width are dynamic from its first compile; one row is one more graph), and greedy outputs stay those of the plain
    static loop. Traced with dynamo's eager backend (guards and recompiles are dynamo's; no code generation)."""
    import torch

    monkeypatch.setenv("COMPTRUST_COMPILE_BACKEND", "eager")
    prompts = [_greedy(q, 10) for q in QUESTIONS]
    engine_fp32.loop = "static"
    try:
        ref = [g.texts for g in engine_fp32.generate(prompts)]
        eng = HFEngine(resolve(None), dtype="float32", batch_size=8, loop="static", compile="on")
        eng._model = engine_fp32.model  # same weights, no second load
        eng._base_attn, eng.eos_ids, eng.top_k, eng._plain = (engine_fp32._base_attn, engine_fp32.eos_ids,
                                                              engine_fp32.top_k, engine_fp32._plain)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        got = [g.texts for g in eng.generate(prompts)]  # 4 rows
        first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        eng.generate(prompts[:2])  # other shapes
        eng.generate(prompts[1:4] + [_greedy("Count to twenty, please.", 30)])  # new widths, compaction
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        engine_fp32.loop = "auto"
        torch._dynamo.reset()
    assert "decode step compiled with torch.compile" in eng.notes
    assert got == ref
    # rows and cache width are dynamic from the start; a batch of one row is torch's own 0/1 special case
    assert first == 1 and graphs <= 2, (first, graphs)
