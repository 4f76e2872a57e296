"""Engine planning and sampling logic without a real model: token-budget batches, shared prefixes, n-expansion,
the counter-based sampler; plus the static loop and the backend selection on a tiny random model (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from comptrust.engine.planning import plan_batches, prefill_groups, shared_prefixes
from comptrust.engine.sampling import M31, counter_uniform, row_seed, sample_next
from comptrust.errors import UsageError
from comptrust.types import GenParams


# -- token-budget batches --------------------------------------------------------------------------------------
def test_batches_respect_token_budget_and_rows():
    seqs = [[1] * n for n in (10, 50, 20, 40, 30, 5, 60, 15)]
    plan = plan_batches(seqs, n=1, max_new_tokens=10, token_budget=150, max_rows=3, prefix_sharing=False)
    assert sorted(i for b in plan for i in b) == list(range(len(seqs)))  # every prompt exactly once
    for b in plan:
        width = max(len(seqs[i]) for i in b) + 10
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * width <= 150
    # longest first: the first batch holds the longest prompt
    assert 6 in plan[0]


def test_batches_count_n_samples_as_rows():
    seqs = [[1] * 10 for _ in range(8)]
    plan = plan_batches(seqs, n=4, max_new_tokens=10, token_budget=10_000, max_rows=8, prefix_sharing=False)
    assert all(len(b) * 4 <= 8 for b in plan) and len(plan) == 4
    # a prompt whose samples alone exceed the limits still gets its own batch
    plan = plan_batches([[1] * 10], n=16, max_new_tokens=10, token_budget=100, max_rows=4)
    assert plan == [[0]]


def test_batches_grow_with_budget():
    seqs = [[i % 7] * (20 + i % 13) for i in range(200)]
    small = plan_batches(seqs, 1, 16, 2_000, None, prefix_sharing=False)
    large = plan_batches(seqs, 1, 16, 20_000, None, prefix_sharing=False)
    assert len(large) < len(small)


# -- shared prefixes -------------------------------------------------------------------------------------------
def test_shared_prefixes_cluster_by_subject_not_by_header():
    header = list(range(100, 110))  # shared by everything (10 tokens)
    subj_a, subj_b = list(range(200, 260)), list(range(300, 380))  # 60 / 80 tokens of demonstrations
    seqs = [header + subj_a + [1, 2, 3], header + subj_a + [4, 5], header + subj_b + [6], header + subj_b + [7, 8],
            header + subj_b + [9], [5, 5, 5]]
    p = shared_prefixes(seqs, min_len=8)
    assert p[0] == p[1] == 70
    assert p[2] == p[3] == p[4] == 90
    assert p[5] == 0


def test_shared_prefix_leaves_every_prompt_a_token():
    seqs = [[1, 2, 3, 4] * 10, [1, 2, 3, 4] * 10, [1, 2, 3, 4] * 10 + [9]]  # duplicates and a strict prefix
    p = shared_prefixes(seqs, min_len=8)
    assert all(0 < p[i] < len(seqs[i]) for i in range(3))
    assert len(set(tuple(s[: p[i]]) for i, s in enumerate(seqs))) == 1


def test_shared_prefixes_are_true_shared_prefixes():
    import random

    rng = random.Random(0)
    for trial in range(300):
        stems = [[rng.randrange(4) for _ in range(rng.randrange(0, 30))] for _ in range(rng.randrange(1, 5))]
        seqs = [rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
                for _ in range(rng.randrange(1, 25))]
        p = shared_prefixes(seqs, min_len=rng.choice([1, 4, 8]))
        for i, s in enumerate(seqs):
            assert 0 <= p[i] < len(s)  # a token of its own is left
            if p[i]:  # the prefix is shared, with the same length, by another member of its cluster
                assert any(j != i and p[j] == p[i] and seqs[j][: p[i]] == s[: p[i]] for j in range(len(seqs)))


def test_shared_prefixes_ignore_short_overlaps():
    assert shared_prefixes([[1, 2, 3, 4], [1, 2, 3, 5]], min_len=8) == [0, 0]
    assert shared_prefixes([[1]], min_len=1) == [0]
    assert shared_prefixes([], min_len=1) == []


def test_plan_keeps_prefix_clusters_together():
    a, b = [7] * 40, [8] * 40
    seqs = [a + [i] for i in range(6)] + [b + [i] for i in range(6)]
    plan = plan_batches(seqs, n=1, max_new_tokens=8, token_budget=6 * 49, max_rows=None)
    assert len(plan) == 2
    assert {frozenset(x) for x in plan} == {frozenset(range(6)), frozenset(range(6, 12))}


def test_prefill_groups_bound_padding():
    toks = [100, 98, 95, 50, 48, 10, 9]
    groups = prefill_groups([0] * 7, toks, max_tokens=10_000, max_waste=0.2)
    assert sorted(i for g in groups for i in g) == list(range(7))
    for g in groups:
        w = max(toks[i] for i in g)
        assert sum(toks[i] for i in g) >= 0.8 * len(g) * w
    assert len(prefill_groups([0] * 7, toks, max_tokens=10_000, max_waste=1.0)) == 1
    for g in prefill_groups([0] * 7, toks, max_tokens=100, max_waste=1.0):
        assert len(g) == 1 or len(g) * max(toks[i] for i in g) <= 100


# -- the counter-based sampler ---------------------------------------------------------------------------------
def _keys(seeds):
    t = torch.tensor(seeds, dtype=torch.long)
    return t & M31, (t >> 31) & M31


def test_counter_uniform_is_a_pure_function_of_its_keys():
    lo, hi = _keys([row_seed(0, [1, 2, 3], j) for j in range(3)])
    ids = torch.arange(50).repeat(3, 1)
    u1 = counter_uniform(lo, hi, 5, ids)
    u2 = counter_uniform(lo[[2, 0, 1]], hi[[2, 0, 1]], 5, ids)  # rows reordered: same numbers move with them
    assert torch.equal(u1[[2, 0, 1]], u2)
    assert not torch.equal(counter_uniform(lo, hi, 6, ids), u1)  # another step, other numbers
    assert ((u1 > 0) & (u1 < 1)).all()


def test_counter_uniform_looks_uniform():
    lo, hi = _keys([row_seed(s, [s], 0) for s in range(64)])
    u = counter_uniform(lo, hi, torch.tensor(3), torch.arange(2048).repeat(64, 1)).flatten()
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (hist / u.numel() - 0.1).abs().max() < 0.01


def test_sample_next_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]])).repeat(4000, 1)
    lo, hi = _keys([row_seed(1, [r], 0) for r in range(4000)])
    p = GenParams(max_new_tokens=1, temperature=1.0)
    picks = sample_next(logits, p, None, lo, hi, 0)
    freq = torch.bincount(picks, minlength=4).double() / 4000
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.03)
    assert freq[3] == 0


def test_sample_next_top_k_top_p_and_greedy():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    lo, hi = _keys([row_seed(2, [r], 0) for r in range(500)])
    assert set(sample_next(logits, GenParams(4, temperature=1.0), 2, lo, hi, 0).tolist()) <= {0, 1}
    assert set(sample_next(logits, GenParams(4, temperature=1.0, top_p=1e-6), None, lo, hi, 0).tolist()) == {0}
    assert set(sample_next(logits, GenParams(4), None, None, None, 0).tolist()) == {0}  # greedy needs no keys


def test_row_seed_depends_on_seed_prompt_and_sample():
    a = row_seed(0, [1, 2], 0)
    assert a == row_seed(0, [1, 2], 0)
    assert len({a, row_seed(1, [1, 2], 0), row_seed(0, [1, 3], 0), row_seed(0, [1, 2], 1)}) == 4
    assert 0 <= a < 2**62


# -- a tiny random model: loops agree, n-expansion, backend selection -----------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from comptrust.models import resolve

    try:
        base = resolve(None)
    except UsageError:
        pytest.skip("the embedded model (for its tokenizer) is not installed")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from comptrust.engine.hf import HFEngine
    from comptrust.models.resolve import ResolvedModel

    tok = AutoTokenizer.from_pretrained(str(base.path))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    rm = ResolvedModel(spec="tiny", name="tiny random llama", kind="random", path=base.path, fingerprint="tiny")
    return HFEngine(rm, device="cpu", dtype="float32", preloaded=model, ignore_eos=False)


def _prompts(k, params):
    from comptrust.types import Prompt

    sys_msg = "You are a careful assistant. Answer briefly and honestly, and say so when you do not know. " * 2
    return [Prompt.chat(("system", sys_msg), ("user", f"Question number {i}: what is {i} plus {i * 3}?"), params=params)
            for i in range(k)]


@pytest.mark.parametrize("loop", ["compact", "static"])
def test_loops_match_generate_greedy(tiny_engine, loop):
    prompts = _prompts(5, GenParams(max_new_tokens=12))
    tiny_engine.loop = "hf"
    try:
        ref = tiny_engine.generate(prompts)
    finally:
        tiny_engine.loop = "auto"
    tiny_engine.loop = loop
    try:
        tiny_engine.counters.clear()
        ours = tiny_engine.generate(prompts)
        assert tiny_engine.counters["prefill_forwards"] >= 2  # shared system prompt: a prefix forward first
        tiny_engine.prefix_sharing = False
        plain = tiny_engine.generate(prompts)
    finally:
        tiny_engine.loop, tiny_engine.prefix_sharing = "auto", True
    assert [g.texts for g in ours] == [g.texts for g in ref] == [g.texts for g in plain]


def test_n_expansion_prefills_once_and_loops_agree(tiny_engine):
    params = GenParams(max_new_tokens=10, temperature=1.0, n=3, seed=5)
    prompts = _prompts(3, params)
    outs = {}
    for loop in ("compact", "static"):
        tiny_engine.loop = loop
        tiny_engine.counters.clear()
        outs[loop] = tiny_engine.generate(prompts)
        # 3 prompts x 3 samples = 9 rows, but only the 3 prompts (and their shared prefix) are prefilled
        assert tiny_engine.counters["prefill_tokens"] < sum(len(tiny_engine.encode(p)) for p in prompts)
    tiny_engine.loop = "auto"
    assert outs["compact"] == outs["static"]
    assert all(len(g.texts) == 3 for g in outs["compact"])
    assert len(set(outs["compact"][0].texts)) > 1
    alone = tiny_engine.generate(prompts[1:2])[0]
    assert alone == outs["compact"][1]  # samples do not depend on batch mates


def test_make_engine_backends(monkeypatch):
    from comptrust.engine import make_engine, pick_backend

    assert pick_backend("hf") == "hf"
    assert pick_backend("auto", "cpu") == "hf"
    with pytest.raises(UsageError):
        pick_backend("tensorrt")
    import comptrust.engine.vllm_engine as ve

    monkeypatch.setattr(ve, "vllm_available", lambda: False)
    assert pick_backend("auto") == "hf"
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(UsageError, match="vLLM is not installed"):
        make_engine(None, backend="vllm")


def test_make_engine_hf_on_cpu():
    from comptrust.engine import make_engine
    from comptrust.engine.hf import HFEngine

    try:
        e = make_engine(None, backend="auto", device="cpu", dtype="float32", batch_size=4, token_budget=999)
    except UsageError:
        pytest.skip("the embedded model is not installed")
    assert isinstance(e, HFEngine) and e.backend == "hf" and e.batch_size == 4 and e.token_budget == 999


def test_vllm_sampling_params_mapping(monkeypatch):
    """The request parameters the vLLM backend would send, checked with a stand-in vllm module."""
    import sys
    import types

    captured = {}

    class SP:
        def __init__(self, **kw):
            captured.update(kw)

    fake = types.ModuleType("vllm")
    fake.SamplingParams = SP
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from comptrust.engine.vllm_engine import VLLMEngine

    e = VLLMEngine.__new__(VLLMEngine)
    e.eos_ids, e.top_k, e.ignore_eos = [2], 50, False
    e.sampling_params(GenParams(max_new_tokens=7), [1, 2])
    assert captured["temperature"] == 0.0 and captured["max_tokens"] == 7 and captured["stop_token_ids"] == [2]
    captured.clear()
    e.sampling_params(GenParams(max_new_tokens=7, temperature=0.7, top_p=0.9, n=5, seed=3), [1, 2])
    assert captured["n"] == 5 and captured["top_k"] == 50 and math.isclose(captured["top_p"], 0.9)
    assert captured["seed"] == row_seed(3, [1, 2], 0) & 0x7FFF_FFFF


@pytest.mark.gpu
def test_static_loop_with_cuda_graphs_matches_generate():
    """On a GPU: the static loop with CUDA graphs gives model.generate()'s greedy outputs, and the same samples
    as the compact loop (a tiny random Llama in fp32, so no weights need to travel)."""
    import os
    from pathlib import Path

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from comptrust.engine.hf import HFEngine
    from comptrust.models.resolve import ResolvedModel

    tok_dir = os.environ.get("COMPTRUST_GPU_TEST_TOKENIZER")
    if not tok_dir:
        from comptrust.models import resolve

        tok_dir = str(resolve(None).path)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    rm = ResolvedModel(spec="tiny", name="tiny", kind="random", path=Path(tok_dir), fingerprint="tiny")
    e = HFEngine(rm, device="cuda", dtype="float32", preloaded=model)
    greedy = _prompts(6, GenParams(max_new_tokens=20))
    sampled = _prompts(3, GenParams(max_new_tokens=20, temperature=1.0, n=2, seed=1))
    out = {}
    for loop in ("static", "compact", "hf"):
        e.loop = loop
        out[loop] = (e.generate(greedy), e.generate(sampled) if loop != "hf" else None)
    assert e.counters["graph_captures"] >= 2 and not e.notes
    assert [g.texts for g in out["static"][0]] == [g.texts for g in out["hf"][0]] == [g.texts for g in out["compact"][0]]
    assert out["static"][1] == out["compact"][1]


def test_prefill_groups_bound_new_tokens_apart_from_context():
    # rows continuing a long shared prefix: the cached-slot bound counts the context, the new-token bound does not
    ctx, toks = [500] * 40, [100] * 40
    small = prefill_groups(ctx, toks, max_tokens=6_000, max_waste=0.5)
    assert all(len(g) * 600 <= 6_000 for g in small) and len(small) == 4
    big = prefill_groups(ctx, toks, max_tokens=60_000, max_waste=0.5, max_new=2_000)
    assert sorted(i for g in big for i in g) == list(range(40))
    assert all(len(g) * 100 <= 2_000 for g in big) and len(big) == 2
    # without max_new the grouping is what it was
    assert prefill_groups(ctx, toks, 6_000, 0.5, None) == small
