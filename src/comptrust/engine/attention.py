"""comptrust's attention function for transformers models, registered as ATTN_NAME.

Prefill goes to transformers' SDPA; one-token decode steps go to a Triton flash-decoding kernel on CUDA
(engine/triton_attn.py), or elsewhere to SDPA over grouped KV heads read in place; the static loop's shared-prefix
decoding passes its SharedPrefix (engine/prefix_attn.py) through the model call as PREFIX_KWARG.
"""

from __future__ import annotations

import os

from comptrust.errors import UsageError

ATTN_NAME = "comptrust_sdpa"  # SDPA whose one-token decode step reads grouped KV heads without copying them
PREFIX_KWARG = "comptrust_prefix"  # the static loop's SharedPrefix, passed through model(...) to the attention
DECODE_ATTN = os.environ.get("COMPTRUST_DECODE_ATTN", "auto")  # auto (Triton on CUDA when it imports) | sdpa


def check_engine_env() -> None:
    """The engine's environment switches, checked up front (a typo would otherwise be ignored, or fail mid-run)."""
    attn = os.environ.get("COMPTRUST_DECODE_ATTN", "auto")
    if attn not in ("auto", "sdpa"):
        raise UsageError(f"COMPTRUST_DECODE_ATTN={attn!r}: expected auto or sdpa")
    tune = os.environ.get("COMPTRUST_TRITON_DECODE")
    if tune is not None:
        from comptrust.engine.triton_attn import parse_tuning

        if parse_tuning(tune) is None:
            raise UsageError(f"COMPTRUST_TRITON_DECODE={tune!r}: expected four positive integers BT,WARPS,PROGRAMS_PER_SM,STAGES")


def _decode_mask_rows(attention_mask, b: int, kv_len: int):
    """The visible slots of each row's last query, [b, kv_len] bool, from the mask transformers hands the
    attention function (a 4D bool mask, an additive float mask, or None = all visible)."""
    import torch

    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :kv_len]
    elif m.dim() == 2:
        m = m[:, :kv_len]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    return m.expand(b, kv_len) if m.shape[0] != b else m


def _use_triton_decode(module, query, kwargs) -> bool:
    if DECODE_ATTN == "sdpa" or not query.is_cuda:
        return False
    import torch

    if torch.compiler.is_compiling():  # compiled decode steps use SDPA: with the kernel inside, the DecodingTrust
        return False  # mix spent minutes recompiling on an H100 (and the compiled synthetic step gained nothing)
    if kwargs.get("position_bias") is not None or getattr(module, "sliding_window", None):
        return False
    cfg = getattr(module, "config", None)
    if cfg is not None and getattr(cfg, "attn_logit_softcapping", None):
        return False
    from comptrust.engine import triton_attn

    return triton_attn.available() and query.shape[-1] in (16, 32, 64, 128, 256)


def _gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except for one-token decode steps. On CUDA those go to a Triton
    flash-decoding kernel (engine/triton_attn.py) that reads only the K/V slots the mask shows and each KV
    head once; elsewhere, with grouped KV heads, the query heads of a KV head are laid out as that head's query
    rows, so K and V are read once instead of being copied num_key_value_groups times (transformers copies
    them whenever a mask is given). COMPTRUST_DECODE_ATTN=sdpa turns the Triton kernel off."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    shared = kwargs.pop(PREFIX_KWARG, None)
    if shared is not None and q_len == 1:
        return _shared_prefix_decode(module, query, key, value, attention_mask, scaling, shared, kwargs), None
    if q_len == 1 and _use_triton_decode(module, query, kwargs):
        from comptrust.engine import triton_attn

        rows = _decode_mask_rows(attention_mask, b, key.shape[2])
        if rows is None:
            rows = torch.ones((b, key.shape[2]), dtype=torch.bool, device=query.device)
        out = triton_attn.decode_attention(query, key, value, rows, scaling)
        return out.transpose(1, 2), None
    if q_len != 1 or hkv == hq or kwargs.get("position_bias") is not None or getattr(module, "sliding_window", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q = query.reshape(b, hkv, hq // hkv, d)
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, -1:, : key.shape[2]]  # [b, 1, 1, kv]: the same for every query row of a KV head
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, 1, d).transpose(1, 2), None


def _shared_prefix_decode(module, query, key, value, attention_mask, scaling, sp, kwargs):
    """A decode step of shared-prefix decoding (engine/prefix_attn.py): key/value hold only the rows' own
    generated slots, sp the prompts' K/V once per prompt; the Triton kernel on CUDA, the plain-torch version
    elsewhere. Returns [B, 1, Hq, D]."""
    import math

    import torch

    from comptrust.engine import prefix_attn

    b, _, _, d = query.shape
    layer = module.layer_idx
    pk, pv = sp.keys[layer], sp.values[layer]
    smask = _decode_mask_rows(attention_mask, b, key.shape[2])
    if smask is None:
        smask = torch.ones((b, key.shape[2]), dtype=torch.bool, device=query.device)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    if _use_triton_decode(module, query, kwargs):
        from comptrust.engine import triton_attn

        out = triton_attn.shared_prefix_decode_attention(
            query, pk, pv, sp.mask, sp.blocks, sp.rows_per_block, key, value, smask, scale)
    else:
        out = prefix_attn.two_level_attention(query, pk, pv, sp, key, value, smask, scale)
    return out.transpose(1, 2)


_ATTN_REGISTERED = False


def register_attention() -> None:
    global _ATTN_REGISTERED
    if _ATTN_REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _gqa_sdpa)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _ATTN_REGISTERED = True

