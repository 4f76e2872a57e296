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
    def _attend_slice(q, kbase, vbase, mrow, sp, SPLIT, T, skt, svt,
                      R: tl.constexpr, D: tl.constexpr, ONE: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax of R query rows q [R, D] (pre-scaled) over the visible slots of slice sp (SPLIT slots)
        of one K/V head: returns (max, sum, accumulator), float32, for the combine kernel. ONE: a single query
        row (R == 1: no matrix product)."""
        offs_d = tl.arange(0, D)
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, D], tl.float32)
        for t in range(0, SPLIT, BT):
            offs_t = sp * SPLIT + t + tl.arange(0, BT)
            m_i, l_i, acc = _attend_block(q, kbase, vbase, mrow, offs_t, offs_d, T, skt, svt, m_i, l_i, acc,
                                          ONE=ONE, BT=BT, IEEE=IEEE)
        return m_i, l_i, acc

    @triton.jit
    def _store_partials(Acc, Mx, Ls, base, acc, m_i, l_i, rmask, D: tl.constexpr):
        """A program's partial result: rows at `base` (flattened (row, query head, slice)), where rmask holds."""
        offs_d = tl.arange(0, D)
        tl.store(Acc + base[:, None] * D + offs_d[None, :], acc, mask=rmask[:, None])
        tl.store(Mx + base, m_i, mask=rmask)
        tl.store(Ls + base, l_i, mask=rmask)

    @triton.jit
    def _attend_block(q, kbase, vbase, mrow, offs_t, offs_d, T, skt, svt, m_i, l_i, acc,
                      ONE: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr):
        """One block of BT slots: load the visible K/V slots (predicated loads fetch nothing where the mask hides
        a slot) and fold them into the online softmax (running max m_i, running sum l_i, accumulator acc)."""
        inb = offs_t < T  # SPLIT is a multiple of BT, so a block never crosses into the next slice
        vis = tl.load(mrow + offs_t, mask=inb, other=0) != 0
        k = tl.load(kbase + offs_t[:, None] * skt + offs_d[None, :], mask=vis[:, None], other=0.0)
        v = tl.load(vbase + offs_t[:, None] * svt + offs_d[None, :], mask=vis[:, None], other=0.0)
        if ONE:
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
        if ONE:
            acc = acc * alpha[:, None] + tl.sum(p.reshape(BT, 1) * v.to(tl.float32), axis=0)[None, :]
        elif IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

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
        m_i, l_i, acc = _attend_slice(q, K + b * skb + kvh * skh, V + b * svb + kvh * svh, M + b * smb, sp, SPLIT, T,
                                      skt, svt, R=BG, D=D, ONE=BG == 1, BT=BT, IEEE=IEEE)
        hq = kvh * G + offs_g
        base = (b * tl.num_programs(1) * G + hq) * NSPT + SPOFF + sp  # [B, Hq, NSPT] flattened
        _store_partials(Acc, Mx, Ls, base, acc, m_i, l_i, gmask, D=D)

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
        m_i, l_i, acc = _attend_slice(q, K + p * skp + kvh * skh, V + p * svp + kvh * svh, M + p * smp, sp, SPLIT, T,
                                      skt, svt, R=BR, D=D, ONE=False, BT=BT, IEEE=IEEE)
        _store_partials(Acc, Mx, Ls, (row * HQ + hq) * NSPT + sp, acc, m_i, l_i, imask, D=D)

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

    mask = _mask_bytes(mask)
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


def _check_shapes(q, k, v) -> None:
    hq, one, d = q.shape[1:]
    hkv = k.shape[1]
    assert one == 1 and hq % hkv == 0 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert d in (16, 32, 64, 128, 256), f"head dim {d} not supported by the Triton decode kernel"


def _last_dim_dense(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_bytes(mask):
    """A mask as one byte per slot: a bool mask viewed as bytes in place (no kernel: this ran as two small kernels
    per layer and step), other dtypes cast; under torch.compile a real cast (inductor cannot lower a bool -> uint8
    bitcast)."""
    import torch

    if mask.dtype == torch.uint8:
        return mask
    if mask.dtype == torch.bool and not torch.compiler.is_compiling():
        return mask.view(torch.uint8)
    return (mask != 0).to(torch.uint8)


def _as_mask_bytes(mask):
    """A [N, T] mask as one dense byte per slot."""
    return _last_dim_dense(_mask_bytes(mask))


def _tuning(tune: list[int], d: int) -> tuple[int, int, int, int]:
    """(block of slots, warps, programs per SM, stages); head dims above 128 get blocks of 32 slots at most."""
    bt, warps, per_sm, stages = tune
    return (bt if d <= 128 else min(bt, 32)), warps, per_sm, stages


def _slices(programs: int, hkv: int, t: int, sms: int, bt: int, per_sm: int) -> tuple[int, int]:
    """(number of slices, slots per slice) that cut T for `programs` x hkv programs, a slice a whole number of
    BT blocks."""
    split = _round_up(-(-t // _num_splits(programs, hkv, t, sms, bt, per_sm)), bt)
    return -(-t // split), split


def _partials(b: int, hq: int, nspt: int, d: int, device):
    """The split kernels' outputs, merged by _combine: per (row, query head, slice) accumulator, max, sum."""
    import torch

    return (torch.empty((b, hq, nspt, d), dtype=torch.float32, device=device),
            torch.empty((b, hq, nspt), dtype=torch.float32, device=device),
            torch.empty((b, hq, nspt), dtype=torch.float32, device=device))


def _launch_rows(qs, k, v, mask, parts, scale: float, split: int, nsp: int, nspt: int, offset: int, g: int,
                 tune: tuple[int, int, int, int]) -> None:
    """The one-row kernel over k/v [B, Hkv, T, D] with mask [B, T]: nsp slices of `split` slots, written to
    slices offset.. of nspt per (row, query head)."""
    import torch

    b, _, d = qs.shape
    bt, warps, _, stages = tune
    acc, mx, ls = parts
    _decode_split[(b, k.shape[1], nsp)](
        qs, k, v, mask, acc, mx, ls,
        qs.stride(0), qs.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), scale, k.shape[2], split, nspt, offset,
        G=g, BG=1 if g == 1 else max(16, triton.next_power_of_2(g)), D=d, BT=bt, IEEE=qs.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )


def _combine(parts, q, nspt: int):
    """Merge the nspt partial softmaxes of every (row, query head) -> [B, Hq, 1, D] in q's dtype."""
    import torch

    b, hq, _, d = q.shape
    acc, mx, ls = parts
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    _decode_combine[(b * hq,)](acc, mx, ls, out, NSP=nspt, BS=max(2, triton.next_power_of_2(nspt)), D=d)
    return out.view(b, hq, 1, d)


def _launch(q, k, v, mask, scale: float):
    """q [B, Hq, 1, D], k/v [B, Hkv, T, D], mask [B, T] (bool or 0/1) -> [B, Hq, 1, D] in q's dtype."""
    _check_shapes(q, k, v)
    b, hq, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    tune = _tuning(_TUNE, d)
    qs = _last_dim_dense(q.reshape(b, hq, d))
    mask = _last_dim_dense(mask)
    nsp, split = _slices(b, hkv, t, _sm_count(q.device.index or 0), tune[0], tune[2])
    parts = _partials(b, hq, nsp, d, q.device)
    _launch_rows(qs, k, v, mask, parts, scale, split, nsp, nsp, 0, hq // hkv, tune)
    return _combine(parts, q, nsp)


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

    _check_shapes(q, pk, pv)
    _check_shapes(q, sk, sv)
    b, hq, _, d = q.shape
    hkv, tp, ts = pk.shape[1], pk.shape[2], sk.shape[2]
    g = hq // hkv
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    pmask, smask = _as_mask_bytes(pmask), _as_mask_bytes(smask)
    qs = _last_dim_dense(q.reshape(b, hq, d))
    sms = _sm_count(q.device.index or 0)
    # prefix: one program per (block, KV head, slice); suffix: the one-row kernel
    pbt, pwarps, pper_sm, pstages = _tuning(PREFIX_TUNING, d)
    nb = blocks.shape[0]
    nsp_p, split_p = _slices(nb, hkv, tp, sms, pbt, pper_sm)
    tune = _tuning(_TUNE, d)
    nsp_s, split_s = _slices(b, hkv, ts, sms, tune[0], tune[2])
    nspt = nsp_p + nsp_s
    parts = _partials(b, hq, nspt, d, q.device)
    acc, mx, ls = parts
    br = max(16, triton.next_power_of_2(rows_per_block * g))
    _prefix_split[(nb, hkv, nsp_p)](
        qs, pk, pv, pmask, blocks, acc, mx, ls,
        qs.stride(0), qs.stride(1), pk.stride(0), pk.stride(1), pk.stride(2), pv.stride(0), pv.stride(1), pv.stride(2),
        pmask.stride(0), scale, tp, split_p, hq, nspt,
        G=g, BR=br, D=d, BT=pbt, IEEE=q.dtype == torch.float32, num_warps=pwarps, num_stages=pstages,
    )
    _launch_rows(qs, sk, sv, smask, parts, scale, split_s, nsp_s, nspt, nsp_p, g, tune)
    return _combine(parts, q, nspt)
