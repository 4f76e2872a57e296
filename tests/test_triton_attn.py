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
        hf.DECODE_ATTN = mode
        eng = hf.HFEngine(rm, device="cuda", dtype="float32", preloaded=model, loop="static", ignore_eos=True)
        outs[mode] = [g.texts for g in eng.generate(prompts)]
    hf.DECODE_ATTN = "auto"
    assert outs["sdpa"] == outs["auto"]
