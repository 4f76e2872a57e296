"""The Triton decode-attention kernel (engine/triton_attn.py) against PyTorch SDPA. Needs a CUDA GPU and Triton:
skipped in CI (no GPU); run on the device machine with `python3 -m pytest tests/test_triton_attn.py`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
triton_attn = pytest.importorskip("comptrust.engine.triton_attn")
if not triton_attn.available():
    pytest.skip("needs Triton", allow_module_level=True)


def _ref(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None, None, :])


@pytest.mark.parametrize("b,hq,hkv,t,d", [(3, 4, 4, 70, 64), (5, 9, 3, 300, 64), (64, 32, 32, 288, 128),
                                          (8, 32, 8, 1030, 128), (2, 16, 2, 17, 128), (4, 8, 1, 513, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_equals_sdpa_with_padding_and_holes(b, hq, hkv, t, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(b * t)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype, generator=g)
    ar = torch.arange(t, device="cuda")
    starts = torch.randint(0, max(t // 2, 1), (b,), device="cuda", generator=g)
    mask = ar[None] >= starts[:, None]
    mask[:, t // 3] = False  # a hole, as shared-prefix layouts can leave
    mask[:, starts.max().item()] = True
    out = triton_attn.decode_attention(q, k, v, mask)
    ref = _ref(q.float(), k.float(), v.float(), mask)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_engine_greedy_outputs_match_sdpa():
    """A tiny random Llama: the static loop's greedy tokens with the Triton kernel equal those with SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import os
    from pathlib import Path

    import comptrust.engine.hf as hf
    from comptrust.engine import attention
    from comptrust.models import resolve
    from comptrust.models.resolve import ResolvedModel
    from comptrust.types import GenParams, Prompt

    tok_dir = os.environ.get("COMPTRUST_TOKENIZER_DIR")  # a tokenizer folder (the device machine has no embedded model)
    rm = (ResolvedModel(spec="tiny", name="tiny random llama", kind="random", path=Path(tok_dir), fingerprint="tiny")
          if tok_dir else resolve(None))
    eng0 = hf.HFEngine(rm, device="cuda", dtype="float32")
    tok = eng0.tok
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda").float().eval()
    prompts = [Prompt.chat(("user", "word " * n), params=GenParams(max_new_tokens=20)) for n in (3, 40, 11)]
    outs = {}
    for mode in ("sdpa", "auto"):
        attention.DECODE_ATTN = mode
        eng = hf.HFEngine(rm, device="cuda", dtype="float32", preloaded=model, loop="static", ignore_eos=True)
        outs[mode] = [g.texts for g in eng.generate(prompts)]
    attention.DECODE_ATTN = "auto"
    assert outs["sdpa"] == outs["auto"]


# -- shared-prefix decoding (engine/prefix_attn.py): the Triton kernel and the engine on the GPU ---------------
def _shared_case(p, n, hq, hkv, tp, ts, d, dtype, drop=()):
    from comptrust.engine.prefix_attn import make_shared_prefix, select_rows

    g = torch.Generator(device="cuda").manual_seed(p * 1000 + n * 10 + tp)
    b = p * n
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype, generator=g)
    pk = torch.randn(p, hkv, tp, d, device="cuda", dtype=dtype, generator=g)
    pv = torch.randn(p, hkv, tp, d, device="cuda", dtype=dtype, generator=g)
    sk = torch.randn(b, hkv, ts, d, device="cuda", dtype=dtype, generator=g)
    sv = torch.randn(b, hkv, ts, d, device="cuda", dtype=dtype, generator=g)
    starts = torch.randint(0, max(tp // 2, 1), (p,), device="cuda", generator=g)
    pmask = (torch.arange(tp, device="cuda")[None] >= starts[:, None]).to(torch.uint8)
    used = int(torch.randint(1, ts + 1, (1,), device="cuda", generator=g))
    smask = torch.zeros(b, ts, dtype=torch.bool, device="cuda")
    smask[:, :used] = True
    sp = make_shared_prefix([pk], [pv], pmask, [i for i in range(p) for _ in range(n)], hq // hkv, "cuda")
    if drop:
        keep = torch.tensor([r for r in range(b) if r not in drop], device="cuda")
        sp = select_rows(sp, keep)
        q, sk, sv, smask = q[keep], sk[keep], sv[keep], smask[keep]
    return q, pk, pv, sp, sk, sv, smask


@pytest.mark.gpu
@pytest.mark.parametrize("p,n,hq,hkv,tp,ts,d", [(4, 25, 32, 32, 170, 160, 128), (3, 25, 40, 40, 96, 150, 128),
                                                (5, 7, 32, 8, 300, 64, 128), (2, 3, 16, 2, 1030, 16, 64),
                                                (6, 1, 8, 8, 40, 32, 64), (2, 25, 32, 4, 77, 48, 128)])
@pytest.mark.parametrize("drop", [(), (0, 3, 4, 5, 11)])
def test_shared_prefix_kernel_equals_reference(p, n, hq, hkv, tp, ts, d, drop):
    from comptrust.engine.prefix_attn import two_level_attention

    drop = tuple(r for r in drop if r < p * n - 1)
    q, pk, pv, sp, sk, sv, smask = _shared_case(p, n, hq, hkv, tp, ts, d, torch.bfloat16, drop)
    scale = 1.0 / d**0.5
    out = triton_attn.shared_prefix_decode_attention(q, pk, pv, sp.mask, sp.blocks, sp.rows_per_block, sk, sv,
                                                     smask, scale)
    ref = two_level_attention(q.double(), pk.double(), pv.double(), sp, sk.double(), sv.double(), smask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    # and the same numbers as the one-row kernel over the concatenated K/V (what the unshared path computes)
    grp = sp.group
    kk, vv = torch.cat([pk[grp], sk], 2), torch.cat([pv[grp], sv], 2)
    flat = triton_attn.decode_attention(q, kk, vv, torch.cat([sp.mask[grp].bool(), smask], 1), scale)
    assert ((out.float() - flat.float()).norm() / flat.float().norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_shared_prefix_kernel_float32_is_full_precision(hq, hkv):
    """Float32 models get IEEE products (not tf32): the engine's fp32 equality tests depend on it."""
    from comptrust.engine.prefix_attn import two_level_attention

    q, pk, pv, sp, sk, sv, smask = _shared_case(3, 5, hq, hkv, 70, 32, 64, torch.float32, (1, 7))
    out = triton_attn.shared_prefix_decode_attention(q, pk, pv, sp.mask, sp.blocks, sp.rows_per_block, sk, sv,
                                                     smask, 0.125)
    ref = two_level_attention(q.double(), pk.double(), pv.double(), sp, sk.double(), sv.double(), smask, 0.125)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def _tiny_engine_model(heads: int, kv_heads: int):
    import os
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from comptrust.models import resolve
    from comptrust.models.resolve import ResolvedModel

    tok_dir = os.environ.get("COMPTRUST_TOKENIZER_DIR") or str(resolve(None).path)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda").float().eval()
    rm = ResolvedModel(spec="tiny", name="tiny random llama", kind="random", path=Path(tok_dir), fingerprint="tiny")
    return rm, model


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)])
def test_engine_shared_decode_equals_unshared(heads, kv_heads):
    """Static loop with CUDA graphs and the Triton kernels: one K/V copy per prompt gives the same greedy and
    sampled outputs as a copy per row (fp32 tiny random Llama, EOS ignored: fixed lengths)."""
    import comptrust.engine.hf as hf
    from comptrust.types import GenParams, Prompt

    rm, model = _tiny_engine_model(heads, kv_heads)
    outs = {}
    for shared in (None, False):
        eng = hf.HFEngine(rm, device="cuda", dtype="float32", preloaded=model, loop="static", ignore_eos=True,
                          shared_decode=shared)
        res = []
        for params in (GenParams(max_new_tokens=24, temperature=1.0, n=25, seed=3), GenParams(max_new_tokens=20, n=3)):
            prompts = [Prompt.chat(("system", "Continue the text."), ("user", "word " * k), params=params)
                       for k in (3, 40, 11, 90)]
            res.append([g.texts for g in eng.generate(prompts)])
        outs[shared] = res
        assert eng.counters["graph_captures"] >= 2 and not eng.notes
        assert bool(eng.counters["shared_decode_batches"]) == (shared is None)
    assert outs[None] == outs[False]
    assert len(set(outs[None][0][0])) > 1  # 25 different samples


# -- fused elementwise kernels (engine/triton_fused.py): the same bits as transformers' modules ---------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_reproduce_torch_bits(dtype):
    """SiLU * up over every finite value of the dtype, RMSNorm and rotary on random rows: bit-identical here
    (install() fuses only what passes this very check, so a failure here means the fused path is off)."""
    from comptrust.engine import triton_fused

    triton_fused._CHECKED.clear()
    assert triton_fused.self_check(torch.device("cuda"), dtype) == {"rms": True, "silu": True, "rope": True}


@pytest.mark.gpu
def test_engine_fused_equals_unfused(monkeypatch):
    """bf16 tiny random Llama, static loop with CUDA graphs, shared-prefix decoding on and off: greedy and sampled
    (n = 25) outputs with the fused kernels equal those of transformers' own modules."""
    import comptrust.engine.hf as hf
    from comptrust.engine import triton_fused
    from comptrust.types import GenParams, Prompt

    rm, model = _tiny_engine_model(8, 8)
    model = model.to(torch.bfloat16)
    outs, notes = {}, {}
    for fused in ("0", "1"):
        monkeypatch.setenv("COMPTRUST_FUSED", fused)
        triton_fused.uninstall(model)
        for shared in (None, False):
            eng = hf.HFEngine(rm, device="cuda", dtype="bfloat16", preloaded=model, loop="static", ignore_eos=True,
                              shared_decode=shared)
            res = []
            for params in (GenParams(max_new_tokens=24, temperature=1.0, n=25, seed=3), GenParams(max_new_tokens=40)):
                prompts = [Prompt.chat(("system", "Continue the text."), ("user", "word " * k), params=params)
                           for k in (3, 40, 11, 90)]
                res.append([g.texts for g in eng.generate(prompts)])
            outs[fused, shared] = res
            notes[fused] = list(eng.notes) or notes.get(fused, [])
    triton_fused.uninstall(model)
    assert any("fused kernels" in n for n in notes["1"]) and not any("fused" in n for n in notes["0"])
    for shared in (None, False):
        assert outs["1", shared] == outs["0", shared]
    assert len(set(outs["1", None][0][0])) > 1
