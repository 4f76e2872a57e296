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
        scale, T, SPLIT, NSPT, SPOFF,
        G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One (row, KV head, slice of T) program: online softmax over the visible slots of the slice. Its partial
        result goes to split SPOFF + sp of NSPT per (row, query head): the shared-prefix path puts the prefix's
        splits first and the suffix's after them, and one combine merges both."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
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
            elif IEEE:  # float32 models: full-precision products (Triton's default for a float32 dot is tf32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
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
            elif IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v)
            m_i = m_new
        hq = kvh * G + offs_g
        base = (b * tl.num_programs(1) * G + hq) * NSPT + SPOFF + sp  # [B, Hq, NSPT] flattened
        tl.store(Acc + base[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
        tl.store(Mx + base, m_i, mask=gmask)
        tl.store(Ls + base, l_i, mask=gmask)

    @triton.jit
    def _prefix_split(
        Q, K, V, M, Blk, Acc, Mx, Ls,
        sqb, sqh, skp, skh, skt, svp, svh, svt, smp,
        scale, T, SPLIT, HQ, NSPT,
        G: tl.constexpr, BR: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One (block of rows sharing a prompt, KV head, slice of the prompt) program: the block's query vectors
        (rows x the G query heads of this KV head, at most BR) form one matrix, so the prompt's K/V slice is read
        once for all of them. Partials go to splits [0, nsplit) of NSPT; the suffix kernel fills the rest."""
        blk = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        p = tl.load(Blk + blk * 3)
        r0 = tl.load(Blk + blk * 3 + 1)
        nr = tl.load(Blk + blk * 3 + 2)
        offs_d = tl.arange(0, D)
        offs_i = tl.arange(0, BR)
        j = offs_i // G
        h = offs_i % G
        imask = j < nr
        row = r0 + j
        hq = kvh * G + h
        q = tl.load(Q + row[:, None] * sqb + hq[:, None] * sqh + offs_d[None, :], mask=imask[:, None], other=0.0)
        q = (q.to(tl.float32) * scale).to(Q.dtype.element_ty)
        m_i = tl.full([BR], float("-inf"), tl.float32)
        l_i = tl.zeros([BR], tl.float32)
        acc = tl.zeros([BR, D], tl.float32)
        t_lo = sp * SPLIT
        kbase = K + p * skp + kvh * skh
        vbase = V + p * svp + kvh * svh
        for t in range(0, SPLIT, BT):
            offs_t = t_lo + t + tl.arange(0, BT)
            inb = offs_t < T
            vis = tl.load(M + p * smp + offs_t, mask=inb, other=0) != 0
            k = tl.load(kbase + offs_t[:, None] * skt + offs_d[None, :], mask=vis[:, None], other=0.0)
            v = tl.load(vbase + offs_t[:, None] * svt + offs_d[None, :], mask=vis[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(vis[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            pr = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr.to(V.dtype.element_ty), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(V.dtype.element_ty), v)
            m_i = m_new
        base = (row * HQ + hq) * NSPT + sp
        tl.store(Acc + base[:, None] * D + offs_d[None, :], acc, mask=imask[:, None])
        tl.store(Mx + base, m_i, mask=imask)
        tl.store(Ls + base, l_i, mask=imask)

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
        mask.stride(0), scale, t, split, nsp, 0,
        G=g, BG=bg, D=d, BT=bt, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    _decode_combine[(b * hq,)](acc, mx, ls, out, NSP=nsp, BS=max(2, triton.next_power_of_2(nsp)), D=d)
    return out.view(b, hq, 1, d)


_OP = _make_custom_op()

# prefix kernel launch settings (block of slots, warps, programs per SM, stages): its block of queries is a
# [BR x D] matrix (up to 64 x 128 floats of accumulator), so it gets more warps than the one-row kernel
PREFIX_TUNING = [64, 4, 4, 2]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def shared_prefix_decode_attention(q, pk, pv, pmask, blocks, rows_per_block: int, sk, sv, smask, scale=None):
    """Two-level decode attention (engine/prefix_attn.py says why and gives the plain-torch version).

    q [B, Hq, 1, D]; pk/pv [P, Hkv, Tp, D] and pmask [P, Tp] (uint8/bool): each prompt's K/V once; blocks [NB, 3]
    int32 (prompt, first row, rows <= rows_per_block): which batch rows attend to which prompt; sk/sv
    [B, Hkv, Ts, D] and smask [B, Ts]: each row's own slots. -> [B, Hq, 1, D] in q's dtype.

    The prefix kernel reads a prompt's K/V once per block of rows (25 samples of a prompt: once instead of 25
    times), the one-row kernel reads each row's suffix, and the combine kernel merges both sets of partial
    softmaxes by log-sum-exp."""
    import torch

    b, hq, one, d = q.shape
    hkv, tp, ts = pk.shape[1], pk.shape[2], sk.shape[2]
    assert one == 1 and hq % hkv == 0 and pk.stride(-1) == 1 and pv.stride(-1) == 1
    assert sk.stride(-1) == 1 and sv.stride(-1) == 1
    assert d in (16, 32, 64, 128, 256), f"head dim {d} not supported by the Triton decode kernel"
    g = hq // hkv
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    pmask = (pmask != 0).to(torch.uint8) if pmask.dtype != torch.uint8 else pmask
    smask = (smask != 0).to(torch.uint8) if smask.dtype != torch.uint8 else smask
    if pmask.stride(-1) != 1:
        pmask = pmask.contiguous()
    if smask.stride(-1) != 1:
        smask = smask.contiguous()
    qs = q.reshape(b, hq, d)
    if qs.stride(-1) != 1:
        qs = qs.contiguous()
    sms = _sm_count(q.device.index or 0)
    # prefix: one program per (block, KV head, slice)
    pbt, pwarps, pper_sm, pstages = PREFIX_TUNING
    pbt = pbt if d <= 128 else min(pbt, 32)
    nb = blocks.shape[0]
    nsp_p = _num_splits(nb, hkv, tp, sms, pbt, pper_sm)
    split_p = _round_up(-(-tp // nsp_p), pbt)
    nsp_p = -(-tp // split_p)
    # suffix: the one-row kernel
    bt, warps, per_sm, stages = _TUNE
    bt = bt if d <= 128 else min(bt, 32)
    nsp_s = _num_splits(b, hkv, ts, sms, bt, per_sm)
    split_s = _round_up(-(-ts // nsp_s), bt)
    nsp_s = -(-ts // split_s)
    nspt = nsp_p + nsp_s
    acc = torch.empty((b, hq, nspt, d), dtype=torch.float32, device=q.device)
    mx = torch.empty((b, hq, nspt), dtype=torch.float32, device=q.device)
    ls = torch.empty((b, hq, nspt), dtype=torch.float32, device=q.device)
    br = max(16, triton.next_power_of_2(rows_per_block * g))
    _prefix_split[(nb, hkv, nsp_p)](
        qs, pk, pv, pmask, blocks, acc, mx, ls,
        qs.stride(0), qs.stride(1), pk.stride(0), pk.stride(1), pk.stride(2), pv.stride(0), pv.stride(1), pv.stride(2),
        pmask.stride(0), scale, tp, split_p, hq, nspt,
        G=g, BR=br, D=d, BT=pbt, IEEE=q.dtype == torch.float32, num_warps=pwarps, num_stages=pstages,
    )
    bg = 1 if g == 1 else max(16, triton.next_power_of_2(g))
    _decode_split[(b, hkv, nsp_s)](
        qs, sk, sv, smask, acc, mx, ls,
        qs.stride(0), qs.stride(1), sk.stride(0), sk.stride(1), sk.stride(2), sv.stride(0), sv.stride(1), sv.stride(2),
        smask.stride(0), scale, ts, split_s, nspt, nsp_p,
        G=g, BG=bg, D=d, BT=bt, IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    _decode_combine[(b * hq,)](acc, mx, ls, out, NSP=nspt, BS=max(2, triton.next_power_of_2(nspt)), D=d)
    return out.view(b, hq, 1, d)
