"""Shared-prefix decoding (engine/prefix_attn.py): the two-level attention against ordinary attention over the
concatenated K/V, and the engine's static loop with and without it (same greedy and sampled outputs), on the CPU."""

from __future__ import annotations

import pytest
import torch

from comptrust.engine.prefix_attn import make_shared_prefix, row_blocks, select_rows, two_level_attention
from comptrust.errors import UsageError
from comptrust.types import GenParams


def test_row_blocks_cut_runs_of_one_prompt():
    assert row_blocks([0, 0, 0, 1, 1, 2], 2) == [(0, 0, 2), (0, 2, 1), (1, 3, 2), (2, 5, 1)]
    assert row_blocks([3, 3, 3, 3], 64) == [(3, 0, 4)]
    assert row_blocks([], 4) == []


def _case(p, n, hq, hkv, tp, ts, d, gen, drop=None):
    """Random q, prefix and suffix K/V with left-padded prefixes and partly written suffixes; drop: rows removed
    afterwards (non-uniform groups, as after the static loop's compaction)."""
    b = p * n
    q = torch.randn(b, hq, 1, d, generator=gen, dtype=torch.float64)
    pk = torch.randn(p, hkv, tp, d, generator=gen, dtype=torch.float64)
    pv = torch.randn(p, hkv, tp, d, generator=gen, dtype=torch.float64)
    sk = torch.randn(b, hkv, ts, d, generator=gen, dtype=torch.float64)
    sv = torch.randn(b, hkv, ts, d, generator=gen, dtype=torch.float64)
    starts = torch.randint(0, tp - 1, (p,), generator=gen)
    pmask = torch.arange(tp)[None] >= starts[:, None]
    used = torch.randint(1, ts + 1, (1,), generator=gen).item()
    smask = torch.zeros(b, ts, dtype=torch.bool)
    smask[:, :used] = True
    group = [i for i in range(p) for _ in range(n)]
    sp = make_shared_prefix([pk], [pv], pmask.to(torch.uint8), group, hq // hkv)
    if drop:
        keep = torch.tensor([r for r in range(b) if r not in drop])
        sp = select_rows(sp, keep)
        q, sk, sv, smask = q[keep], sk[keep], sv[keep], smask[keep]
    return q, pk, pv, sp, sk, sv, smask


def _ordinary(q, pk, pv, sp, sk, sv, smask):
    """Plain attention of each row over its prompt's K/V followed by its own."""
    grp = sp.group
    k = torch.cat([pk[grp], sk], dim=2)
    v = torch.cat([pv[grp], sv], dim=2)
    mask = torch.cat([sp.mask[grp].bool(), smask], dim=1)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


@pytest.mark.parametrize("p,n,hq,hkv,tp,ts,d", [(3, 4, 4, 4, 37, 16, 32), (2, 25, 8, 2, 50, 32, 16),
                                                (5, 1, 6, 3, 9, 8, 8), (1, 7, 4, 1, 64, 48, 16)])
@pytest.mark.parametrize("drop", [None, (0, 2, 3)])
def test_two_level_equals_ordinary_attention(p, n, hq, hkv, tp, ts, d, drop):
    gen = torch.Generator().manual_seed(p * 100 + n)
    if drop and max(drop) >= p * n:
        drop = (0,)
    case = _case(p, n, hq, hkv, tp, ts, d, gen, drop)
    if drop is None or p > 1:  # (one prompt stays uniform however many of its rows are dropped)
        assert bool(case[3].uniform) == (drop is None)
    out = two_level_attention(*case[:6], case[6], 1.0 / d**0.5)
    ref = _ordinary(*case)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-10


def test_two_level_rows_without_visible_prefix_slots_still_see_their_suffix():
    gen = torch.Generator().manual_seed(1)
    q, pk, pv, sp, sk, sv, smask = _case(2, 3, 4, 4, 10, 8, 16, gen)
    sp.mask[0] = 0  # prompt 0 shows nothing: its rows attend only to their own slots
    out = two_level_attention(q, pk, pv, sp, sk, sv, smask, 0.25)
    ref = _ordinary(q, pk, pv, sp, sk, sv, smask)
    assert torch.isfinite(out).all() and (out - ref).abs().max().item() < 1e-10


# -- the engine: static loop with and without shared-prefix decoding ------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
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
    return HFEngine(rm, device="cpu", dtype="float32", preloaded=model, loop="static", ignore_eos=True)


def _prompts(k, params):
    from comptrust.types import Prompt

    return [Prompt.chat(("system", "Continue the text. " * (1 + i % 3)), ("user", f"Text {i}: the weather " * (i + 1)),
                        params=params) for i in range(k)]


def _run(e, prompts, shared):
    e.shared_decode = shared
    e.counters.clear()
    out = e.generate(prompts)
    return out, dict(e.counters)


@pytest.mark.parametrize("params", [GenParams(max_new_tokens=12, temperature=1.0, n=3, seed=5),
                                    GenParams(max_new_tokens=10, n=2)])
def test_static_loop_shared_decode_equals_unshared(tiny, params):
    prompts = _prompts(4, params)
    ours, c1 = _run(tiny, prompts, None)
    plain, c0 = _run(tiny, prompts, False)
    assert ours == plain
    assert c1["shared_decode_batches"] >= 1 and not c0.get("shared_decode_batches")
    # the prompts' slots are read once per prompt instead of once per row
    assert c1["decode_kv_slots"] < c1["decode_kv_slots_unshared"] == c0["decode_kv_slots"]
    if params.n > 1 and params.temperature > 0:
        assert len(set(ours[0].texts)) > 1


def test_shared_decode_survives_compaction(tiny):
    """Rows finishing early (EOS) are compacted away mid-batch: groups become ragged, outputs stay equal."""
    params = GenParams(max_new_tokens=40, temperature=1.0, n=3, seed=2)
    prompts = _prompts(4, params)
    free, _ = _run(tiny, prompts, False)
    # make the third token of most rows an end-of-sequence token, so most rows finish at step 3
    toks = [tiny.tok(t, add_special_tokens=False)["input_ids"] for g in free for t in g.texts]
    eos = sorted({t[2] for t in toks[: len(toks) * 3 // 4] if len(t) > 2})
    saved = tiny.eos_ids
    tiny.eos_ids = eos
    try:
        ours, c1 = _run(tiny, prompts, None)
        plain, c0 = _run(tiny, prompts, False)
    finally:
        tiny.eos_ids = saved
    assert c1["compactions"] >= 1 and c0["compactions"] >= 1
    assert ours == plain


def test_plan_batches_counts_a_shared_prompt_once():
    from comptrust.engine.planning import plan_batches

    seqs = [[1] * 100 for _ in range(8)]
    # 8 prompts x n=4, 100-token prompts, 20 new tokens: a copy per row needs 32 x 120 slots, shared 8 x 100 + 32 x 20
    assert len(plan_batches(seqs, 4, 20, 1440, prefix_sharing=False, shared_decode=True)) == 1
    assert len(plan_batches(seqs, 4, 20, 1440, prefix_sharing=False)) == 8 // 3 + 1


def test_gpu_batch_limits_follow_measured_free_memory(tiny, monkeypatch):
    """On a GPU the token budget and the row cap come from torch.cuda.mem_get_info (plus what PyTorch's allocator
    holds cached), not from a row constant: twice the free memory, twice the rows (checked with the CUDA calls
    replaced, so it runs without a GPU)."""
    tiny.model  # noqa: B018 -- loaded
    free = [40 << 30]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 141 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    monkeypatch.setattr(tiny, "device", "cuda")
    params = GenParams(max_new_tokens=150, temperature=1.0, n=25)
    b1, r1 = tiny._limits(params)
    free[0] = 84 << 30
    b2, r2 = tiny._limits(params)
    assert b1 == int(0.5 * (44 << 30) / tiny._kv_bytes_per_token())
    assert r1 > 64 and abs(r2 / r1 - 2) < 0.01 and abs(b2 / b1 - 2) < 0.01
    monkeypatch.setattr(tiny, "batch_size", 64)
    assert tiny._limits(params)[1] == 64  # an explicit --batch-size still caps the rows


def test_prefix_mask_is_stored_as_bytes_once():
    """make_shared_prefix keeps the prompts' mask as one byte per slot (the Triton kernel's layout; it was cast per
    layer and step), same visibility."""
    pmask = torch.tensor([[False, True, True], [True, True, True]])
    sp = make_shared_prefix([], [], pmask, [0, 0, 1], 1)
    assert sp.mask.dtype == torch.uint8 and sp.mask.is_contiguous()
    assert torch.equal(sp.mask.bool(), pmask)


def test_bool_mask_viewed_as_bytes_without_a_copy():
    from comptrust.engine.triton_attn import _as_mask_bytes

    m = torch.zeros(4, 1, 1, 9, dtype=torch.bool)
    m[:, 0, 0, 2:7] = True
    rows = m[:, 0, -1, :8]
    b = _as_mask_bytes(rows)
    assert b.dtype == torch.uint8 and b.data_ptr() == rows.data_ptr() and torch.equal(b.bool(), rows)
    assert torch.equal(_as_mask_bytes(rows.long()), b)


def test_fused_kernels_off_the_gpu_and_checked_sources():
    """On the CPU install() replaces nothing; the Llama / Mistral / Qwen2 forwards it replaces on a GPU are still the
    source it was checked against (if transformers changes them, the fused path silently turns off: this says so)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama as ml
    from transformers.models.qwen2 import modeling_qwen2 as mq

    from comptrust.engine import triton_fused as tf

    for m, norm, mlp in ((ml, ml.LlamaRMSNorm, ml.LlamaMLP), (mq, mq.Qwen2RMSNorm, mq.Qwen2MLP)):
        assert tf._norm_src(norm.forward) == tf.RMSNORM_SRC
        assert tf._norm_src(mlp.forward) == tf.MLP_SRC
        assert tf._rope_body_of(getattr(m.apply_rotary_pos_emb, "__wrapped_original__", m.apply_rotary_pos_emb)) == tf.ROPE_BODY
        assert tf._body(m.rotate_half) == tf.ROTATE_HALF_BODY
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    before = ml.apply_rotary_pos_emb
    assert tf.install(model) == {"rms": 0, "mlp": 0, "rope": 0}
    assert ml.apply_rotary_pos_emb is before and not any("forward" in mod.__dict__ for mod in model.modules())
