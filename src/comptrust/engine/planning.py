"""Batch planning for the HF engine: pure functions over token id lists, tested without a model.

Which prompts share a prefix (computed once), which prompts go together into a decode batch (a token budget and
a row cap), and which rows of a prefill go into one forward call (similar lengths, little padding).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

MIN_SHARED_PREFIX = 16  # tokens; shorter common prefixes are recomputed (a forward call costs more than they save)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefixes(seqs: Sequence[Sequence[int]], min_len: int = MIN_SHARED_PREFIX) -> list[int]:
    """For each sequence, the length of the prefix it shares with the other members of its cluster (0: none).

    Clusters are runs of the lexicographically sorted sequences; each cluster shares the longest prefix common
    to all its members, capped so that every member keeps at least one token of its own (its last-token logits
    come from its own forward). The clustering maximises the prefill tokens saved, sum of prefix x (members - 1),
    by dynamic programming over the Cartesian tree of the neighbours' common-prefix lengths: a cluster is split
    where its sub-clusters together share more than it does (MMLU: one cluster per subject, not one for the
    common "The following are multiple choice questions" header).
    """
    n = len(seqs)
    out = [0] * n
    if n < 2:
        return out
    order = sorted(range(n), key=lambda i: list(seqs[i]))
    lcp = [common_prefix_len(seqs[order[k]], seqs[order[k + 1]]) for k in range(n - 1)]
    m = n - 1
    # Cartesian tree of lcp (minimum at the root); edge k joins sorted positions k and k+1
    left, right, stack = [-1] * m, [-1] * m, []
    for k in range(m):
        last = -1
        while stack and lcp[stack[-1]] >= lcp[k]:
            last = stack.pop()
        left[k] = last
        if stack:
            right[stack[-1]] = k
        stack.append(k)
    root = stack[0]
    lo, hi, minlen, val, own_p = [0] * m, [0] * m, [0] * m, [0] * m, [0] * m
    choose = [False] * m
    # iterative post-order
    post, todo = [], [root]
    while todo:
        k = todo.pop()
        post.append(k)
        for c in (left[k], right[k]):
            if c >= 0:
                todo.append(c)
    lens = [len(seqs[order[p]]) for p in range(n)]
    for k in reversed(post):
        lk, rk = left[k], right[k]
        lo[k] = lo[lk] if lk >= 0 else k  # the node spans the items at sorted positions lo..hi (inclusive)
        hi[k] = hi[rk] if rk >= 0 else k + 1
        ml = minlen[lk] if lk >= 0 else lens[k]
        mr = minlen[rk] if rk >= 0 else lens[k + 1]
        minlen[k] = min(ml, mr)
        p = min(lcp[k], minlen[k] - 1)
        own = p * (hi[k] - lo[k]) if p >= min_len else 0
        kids = (val[lk] if lk >= 0 else 0) + (val[rk] if rk >= 0 else 0)
        own_p[k] = p
        if own > 0 and own >= kids:
            choose[k], val[k] = True, own
        else:
            val[k] = kids
    todo = [root]
    while todo:
        k = todo.pop()
        if choose[k]:
            for pos in range(lo[k], hi[k] + 1):
                out[order[pos]] = own_p[k]
            continue
        for c in (left[k], right[k]):
            if c >= 0:
                todo.append(c)
    return out


def plan_batches(
    seqs: Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    token_budget: int,
    max_rows: int | None = None,
    prefix_sharing: bool = True,
    shared_decode: bool = False,
) -> list[list[int]]:
    """Indices of `seqs` in batches: each holds at most max_rows output rows (prompts x n) and token_budget
    tokens (rows x (longest prompt + max_new_tokens)), except that a prompt always fits alone.

    shared_decode: the n rows of a prompt keep one copy of its K/V (the static loop's shared-prefix decoding),
    so a batch costs prompts x longest prompt + rows x max_new_tokens tokens of cache instead.

    Prompts sharing a prefix are kept together (their prefix is then computed once per batch); clusters, and
    prompts inside them, go longest first: lengths inside a batch are close, and the biggest batch comes first,
    so a batch too large for memory fails at once.
    """
    if not seqs:
        return []
    idx = list(range(len(seqs)))
    if prefix_sharing:
        plen = shared_prefixes(seqs)
        clusters: dict[Any, list[int]] = defaultdict(list)
        for i in idx:
            clusters[tuple(seqs[i][: plen[i]]) if plen[i] else ("solo", i)].append(i)
        groups = sorted(clusters.values(), key=lambda g: (-max(len(seqs[i]) for i in g), min(g)))
        order = [i for g in groups for i in sorted(g, key=lambda i: (-len(seqs[i]), i))]
    else:
        order = sorted(idx, key=lambda i: (-len(seqs[i]), i))
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, len(seqs[i]))
        rows = (len(cur) + 1) * n
        cost = (len(cur) + 1) * w + rows * max_new_tokens if shared_decode else rows * (w + max_new_tokens)
        if cur and ((max_rows is not None and rows > max_rows) or cost > token_budget):
            batches.append(cur)
            cur, w = [], len(seqs[i])
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def prefill_groups(ctx_lens: Sequence[int], tok_lens: Sequence[int], max_tokens: int, max_waste: float,
                   max_new: int | None = None) -> list[list[int]]:
    """Sub-batches for one prefill forward each: similar new-token counts (padding is computed like real
    tokens, so at most max_waste of a sub-batch's new-token slots are padding), at most max_tokens slots
    (rows x (context + new tokens): the forward's KV cache) and, if given, at most max_new new-token slots
    (rows x new tokens: what the matmuls compute; without it the context counts against max_tokens alone, so
    rows continuing a long shared prefix get small forwards)."""
    order = sorted(range(len(tok_lens)), key=lambda i: (-tok_lens[i], -ctx_lens[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        if cur:
            ws = tok_lens[cur[0]]
            wc = max(max(ctx_lens[j] for j in cur), ctx_lens[i])
            rows = len(cur) + 1
            waste = 1 - (real + tok_lens[i]) / (rows * ws)
            if rows * (ws + wc) > max_tokens or waste > max_waste or (max_new is not None and rows * ws > max_new):
                out.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += tok_lens[i]
    if cur:
        out.append(cur)
    return out

