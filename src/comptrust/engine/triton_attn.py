"""One-token decode attention for CUDA, as a Triton kernel (flash-decoding).

Why: in a decode step with a static KV cache, PyTorch's SDPA with a mask reads every slot of the cache, the
left padding and the columns not yet written included, and with a mask it cannot use its flash kernel. For a
Llama-2-7B (no grouped KV heads) at 64 rows and 288 slots that is 9.4 GB of K/V per step next to 12.7 GB of
weights. This kernel reads a K/V slot only where the row's mask says it is visible (predicated loads fetch
nothing), keeps the softmax online in float32, and reads each KV head once for all the query heads that share it.

Semantics are those of `scaled_dot_product_attention(q, k, v, attn_mask=mask)` for one query token per row:
q [B, Hq, 1, D], k/v [B, Hkv, T, D] (Hq a multiple of Hkv), mask [B, T] bool (True = visible). A row with no
visible slot gives zeros (SDPA gives NaN there; such rows never occur in the engine).

CPU runs never get here (the engine calls this only for CUDA tensors when Triton imports); tests that need a GPU
compare it with SDPA (tests/test_triton_attn.py, run on the device machine).
"""

from __future__ import annotations

import functools
import math
import os

try:  # Triton ships with CUDA builds of torch; the CPU build has none
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode_split(
        Q, K, V, M, Acc, Mx, Ls,
        sqb, sqh, skb, skh, skt, svb, svh, svt, smb,
        scale, T, SPLIT,
        G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
    ):
        """One (row, KV head, slice of T) program: online softmax over the visible slots of the slice."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        nsp = tl.num_programs(2)
        offs_d = tl.arange(0, D)
        offs_g = tl.arange(0, BG)
        gmask = offs_g < G
        q = tl.load(Q + b * sqb + (kvh * G + offs_g)[:, None] * sqh + offs_d[None, :], mask=gmask[:, None], other=0.0)
        q = (q.to(tl.float32) * scale).to(Q.dtype.element_ty)
        m_i = tl.full([BG], float("-inf"), tl.float32)
        l_i = tl.zeros([BG], tl.float32)
        acc = tl.zeros([BG, D], tl.float32)
        t_lo = sp * SPLIT
        kbase = K + b * skb + kvh * skh
        vbase = V + b * svb + kvh * svh
        for t in range(0, SPLIT, BT):
            offs_t = t_lo + t + tl.arange(0, BT)
            inb = offs_t < T  # SPLIT is a multiple of BT, so a block never crosses into the next slice
            vis = tl.load(M + b * smb + offs_t, mask=inb, other=0) != 0
            k = tl.load(kbase + offs_t[:, None] * skt + offs_d[None, :], mask=vis[:, None], other=0.0)
            v = tl.load(vbase + offs_t[:, None] * svt + offs_d[None, :], mask=vis[:, None], other=0.0)
            if BG == 1:
                s = tl.sum(k.to(tl.float32) * q.to(tl.float32), axis=1)[None, :]
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(vis[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if BG == 1:
                acc = acc * alpha[:, None] + tl.sum(p.reshape(BT, 1) * v.to(tl.float32), axis=0)[None, :]
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v)
            m_i = m_new
        hq = kvh * G + offs_g
        base = (b * tl.num_programs(1) * G + hq) * nsp + sp  # [B, Hq, nsplit] flattened
        tl.store(Acc + base[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
        tl.store(Mx + base, m_i, mask=gmask)
        tl.store(Ls + base, l_i, mask=gmask)

    @triton.jit
    def _decode_combine(Acc, Mx, Ls, O, NSP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
        """Merge the slices of one (row, query head): rescale each by exp(m_s - max) and normalise."""
        r = tl.program_id(0)
        offs_s = tl.arange(0, BS)
        offs_d = tl.arange(0, D)
        smask = offs_s < NSP
        m = tl.load(Mx + r * NSP + offs_s, mask=smask, other=float("-inf"))
        l = tl.load(Ls + r * NSP + offs_s, mask=smask, other=0.0)
        mx = tl.max(m, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp(m - mx)
        den = tl.sum(l * w, axis=0)
        a = tl.load(Acc + (r * NSP + offs_s)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
        num = tl.sum(a * w[:, None], axis=0)
        out = tl.where(den > 0, num / den, 0.0)
        tl.store(O + r * D + offs_d, out.to(O.dtype.element_ty))


# launch settings (block of slots, warps, programs per SM, pipeline stages); bench/profile_gpu.py sweeps them; the default was
# the fastest for Llama-2-7B at 64 rows on an H100 (COMPTRUST_TRITON_DECODE="BT,WARPS,PROGRAMS_PER_SM,STAGES")
DEFAULT_TUNING = [32, 1, 8, 3]


def parse_tuning(text: str) -> list[int] | None:
    """COMPTRUST_TRITON_DECODE's value as four positive integers, or None when it is not that."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return None
    return [int(p) for p in parts]


_TUNE = parse_tuning(os.environ.get("COMPTRUST_TRITON_DECODE", "")) or list(DEFAULT_TUNING)  # engine checks the value


def set_tuning(bt: int, warps: int, per_sm: int, stages: int = 2) -> None:
    _TUNE[:] = [bt, warps, per_sm, stages]
    _num_splits.cache_clear()


@functools.lru_cache(maxsize=64)
def _num_splits(b: int, hkv: int, t: int, sms: int, bt: int, per_sm: int) -> int:
    """Enough slices of T that the grid has ~per_sm programs per SM, each slice at least two BT blocks long."""
    want = max(1, math.ceil(per_sm * sms / max(b * hkv, 1)))
    most = max(1, t // (2 * bt))
    return min(want, most)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_attention(q, k, v, mask, scale: float | None = None):
    """q [B, Hq, 1, D], k/v [B, Hkv, T, D], mask [B, T] (bool or 0/1) -> [B, Hq, 1, D] in q's dtype.

    Goes through a registered custom op, so torch.compile keeps it as one opaque call instead of breaking its
    graph at every layer."""
    import torch

    # one byte per slot, as a real cast: torch.compile's inductor cannot lower a bool -> uint8 bitcast
    mask = (mask != 0).to(torch.uint8) if mask.dtype != torch.uint8 else mask
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _OP(q, k, v, mask, scale) if _OP is not None else _launch(q, k, v, mask, scale)


def _make_custom_op():
    """Registered once at import, outside any torch.compile trace."""
    if triton is None:
        return None
    import torch

    try:
        @torch.library.custom_op("comptrust::decode_attention", mutates_args=())
        def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
            return _launch(q, k, v, mask, scale)

        @_op.register_fake
        def _(q, k, v, mask, scale):
            return q.new_empty(q.shape)

        return _op
    except Exception:  # pragma: no cover - torch without torch.library.custom_op
        return None


def _launch(q, k, v, mask, scale: float):
    """q [B, Hq, 1, D], k/v [B, Hkv, T, D], mask [B, T] (bool or 0/1) -> [B, Hq, 1, D] in q's dtype."""
    import torch

    b, hq, one, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    assert one == 1 and hq % hkv == 0 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert d in (16, 32, 64, 128, 256), f"head dim {d} not supported by the Triton decode kernel"
    g = hq // hkv
    bg = 1 if g == 1 else max(16, triton.next_power_of_2(g))
    bt, warps, per_sm, stages = _TUNE
    bt = bt if d <= 128 else min(bt, 32)
    qs = q.reshape(b, hq, d)
    if qs.stride(-1) != 1:
        qs = qs.contiguous()
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    nsp = _num_splits(b, hkv, t, _sm_count(q.device.index or 0), bt, per_sm)
    split = -(-t // nsp)
    split = -(-split // bt) * bt
    nsp = -(-t // split)
    acc = torch.empty((b, hq, nsp, d), dtype=torch.float32, device=q.device)
    mx = torch.empty((b, hq, nsp), dtype=torch.float32, device=q.device)
    ls = torch.empty((b, hq, nsp), dtype=torch.float32, device=q.device)
    _decode_split[(b, hkv, nsp)](
        qs, k, v, mask, acc, mx, ls,
        qs.stride(0), qs.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), scale, t, split,
        G=g, BG=bg, D=d, BT=bt, num_warps=warps, num_stages=stages,
    )
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    _decode_combine[(b * hq,)](acc, mx, ls, out, NSP=nsp, BS=max(2, triton.next_power_of_2(nsp)), D=d)
    return out.view(b, hq, 1, d)


_OP = _make_custom_op()
