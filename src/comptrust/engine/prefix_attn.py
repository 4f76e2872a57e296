"""Two-level decode attention for rows that share a prompt: the shared prefix once per group, then each row's own
suffix, merged with the log-sum-exp trick.

Why: DecodingTrust's full profile samples n = 25 outputs per toxicity and stereotype prompt. The engine decodes
them as 25 rows of one batch, and with an ordinary KV cache every row holds (and every decode step reads) its own
copy of the prompt's K/V. For MHA models (Llama-2) at large batches those reads rival the weights: Llama-2-7B at
64 rows x 288 slots reads 12.7 GB of weights and ~7.3 GB of K/V per step. Here the prompt's K/V is stored once per
prompt ([P, Hkv, Tp, D]) and the rows keep only what they generate ([B, Hkv, Ts, D]); attention over the
concatenation equals

    softmax([s_prefix, s_suffix]) @ [V_prefix; V_suffix]
      = (e^(m_p - m) * acc_p + e^(m_s - m) * acc_s) / (e^(m_p - m) * l_p + e^(m_s - m) * l_s)

where (acc, m, l) are each part's unnormalised output, running max and softmax denominator, m = max(m_p, m_s).

This module is the plain-torch implementation: the CPU path (CI tests it against ordinary attention over the
concatenated K/V, tests/test_shared_prefix_attn.py) and the fallback on CUDA without Triton. The CUDA kernel is in
engine/triton_attn.py (shared_prefix_decode_attention); both take the same SharedPrefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(eq=False)
class SharedPrefix:
    """The prompts' K/V of one decode batch, stored once per prompt.

    keys/values: per layer [P, Hkv, Tp, D]; mask: [P, Tp] (nonzero = visible; prompts are left-padded to Tp);
    group: [B] long, the prompt of each batch row (the rows of a prompt are contiguous, in prompt order);
    uniform: n where row r belongs to prompt r // n for every row (fresh batches), else 0 (after finished rows were
    dropped); blocks: [NB, 3] int32 (prompt, first row, rows) for the Triton kernel, at most rows_per_block rows each.
    """

    keys: list
    values: list
    mask: Any
    group: Any
    uniform: int
    blocks: Any = None
    rows_per_block: int = 0
    q_per_kv: int = 1


def row_blocks(group: Sequence[int], rows_per_block: int) -> list[tuple[int, int, int]]:
    """(prompt, first row, rows) for runs of consecutive rows with the same prompt, cut into pieces of at most
    rows_per_block rows: the unit of work of the Triton prefix kernel (one program reads a prompt's K/V slice once
    for all of a block's rows)."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for r in range(1, len(group) + 1):
        if r == len(group) or group[r] != group[start]:
            for s in range(start, r, rows_per_block):
                out.append((int(group[start]), s, min(rows_per_block, r - s)))
            start = r
    return out


def rows_per_block_for(q_per_kv: int) -> int:
    """Rows per prefix program: the block's query vectors (rows x query heads per KV head) are one matrix of at
    most 64 for the kernel's dot products (25 MHA rows -> 32; GQA with 4 query heads per KV head -> 16 rows)."""
    return max(1, 64 // max(q_per_kv, 1))


def make_shared_prefix(keys: list, values: list, mask, group: Sequence[int], q_per_kv: int, device=None) -> SharedPrefix:
    import torch

    group = [int(g) for g in group]
    dev = device if device is not None else mask.device
    n_prompts = mask.shape[0]
    n = len(group) // n_prompts if n_prompts and len(group) % n_prompts == 0 else 0
    uniform = n if n and group == [r // n for r in range(len(group))] else 0
    rpb = rows_per_block_for(q_per_kv)
    if mask.dtype != torch.uint8:  # one byte per slot, once per batch (the Triton kernel reads bytes; was cast per layer)
        mask = (mask != 0).to(torch.uint8)
    mask = mask.contiguous()
    blocks = torch.tensor(row_blocks(group, rpb) or [(0, 0, 0)], dtype=torch.int32, device=dev)
    return SharedPrefix(keys=keys, values=values, mask=mask, group=torch.tensor(group, dtype=torch.long, device=dev),
                        uniform=uniform, blocks=blocks, rows_per_block=rpb, q_per_kv=q_per_kv)


def select_rows(sp: SharedPrefix, keep) -> SharedPrefix:
    """The same prefix for a subset of the batch rows (keep: ascending row indices, as the static loop's
    compaction gives): rows of a prompt stay contiguous."""
    group = sp.group[keep].tolist()
    return make_shared_prefix(sp.keys, sp.values, sp.mask, group, sp.q_per_kv, sp.group.device)


def partial_attention(q, k, v, mask, scale: float):
    """q [N, Hkv, R, D], k/v [N, Hkv, T, D], mask [N, T] -> (acc [N, Hkv, R, D], m [N, Hkv, R], l [N, Hkv, R]),
    in float32 (float64 inputs stay float64): the unnormalised softmax-weighted sum of V over the visible slots, the max score and the sum of
    exp(score - max). A part with no visible slot gives m = -inf, l = 0, acc = 0."""
    import torch

    dt = torch.promote_types(q.dtype, torch.float32)  # float32 at least; float64 stays (the tests' reference)
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    vis = (mask != 0)[:, None, None, :]
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_safe[..., None])
    return torch.matmul(p, v.to(dt)), m, p.sum(-1)


def merge_partials(parts: list):
    """Normalised output from (acc, m, l) parts over disjoint slot sets (the log-sum-exp merge)."""
    import torch

    m = parts[0][1]
    for _, mi, _ in parts[1:]:
        m = torch.maximum(m, mi)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    num = None
    den = None
    for acc, mi, li in parts:
        w = torch.exp(mi - m)
        num = acc * w[..., None] if num is None else num + acc * w[..., None]
        den = li * w if den is None else den + li * w
    return torch.where(den[..., None] > 0, num / den.clamp(min=1e-30)[..., None], torch.zeros_like(num))


def two_level_attention(q, pk, pv, sp: SharedPrefix, sk, sv, smask, scale: float):
    """q [B, Hq, 1, D]; pk/pv [P, Hkv, Tp, D] (this layer's prefix); sk/sv [B, Hkv, Ts, D], smask [B, Ts] ->
    [B, Hq, 1, D] in q's dtype: attention over each row's prefix (sp.group) followed by its suffix.

    With uniform groups the n rows of a prompt are one matrix of n x (query heads per KV head) queries against
    the prompt's K/V, read once; otherwise the prefix is gathered per row (correct, not fast)."""
    b, hq, _, d = q.shape
    hkv = pk.shape[1]
    g = hq // hkv
    qk = q.reshape(b, hkv, g, d)
    if sp.uniform:
        n = sp.uniform
        p = b // n
        qp = qk.reshape(p, n, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(p, hkv, n * g, d)
        acc, m, l = partial_attention(qp, pk, pv, sp.mask, scale)
        acc = acc.reshape(p, hkv, n, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, g, d)
        m = m.reshape(p, hkv, n, g).permute(0, 2, 1, 3).reshape(b, hkv, g)
        l = l.reshape(p, hkv, n, g).permute(0, 2, 1, 3).reshape(b, hkv, g)
        pre = (acc, m, l)
    else:
        grp = sp.group
        pre = partial_attention(qk, pk[grp], pv[grp], sp.mask[grp], scale)
    suf = partial_attention(qk, sk, sv, smask, scale)
    out = merge_partials([pre, suf])
    return out.reshape(b, hq, 1, d).to(q.dtype)
