"""Prefill for the HF engine's own decode loops: prompts in, a DecodeState (KV cache, masks, first logits) out.

Prompts that share a prefix (engine/planning.py finds them) get it computed once and its K/V copied to every
prompt that uses it; the n samples of a prompt are copies of one prefill. Three shapes of cache come out: a
dynamic cache (the compact loop), a static cache with room for every new token (the static loop), or, for
shared-prefix decoding, the prompts' K/V once as a SharedPrefix plus a static cache for the generated tokens.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from comptrust.engine.planning import prefill_groups, shared_prefixes
from comptrust.types import GenParams

if TYPE_CHECKING:
    from comptrust.engine.hf import HFEngine

# dest_for(layer, like_k, like_v) -> (K, V): where a layer's prefilled K/V rows are written
DestFor = Callable[[int, Any, Any], tuple[Any, Any]]

# Prefill forwards on CUDA (planning.prefill_groups): at most CUDA_PREFILL_SLOTS cached slots (rows x (context +
# new tokens): the forward's own KV cache), at most CUDA_PREFILL_NEW new-token slots (what the matmuls compute;
# None: no bound of its own) and CUDA_PREFILL_WASTE of the new-token slots padding. The CPU keeps 8,192 slots and
# 20% padding. Larger forwards for rows continuing a shared prefix (32,768 slots, 16,384 new tokens) were
# measured on an H200 (bench/results/evaluate_gpu_h200_13b_prefill*.md): faster only where they ran after the
# defaults, slower in a same-process A/B, and they change greedy outputs (185 of 363 identical; other matmul
# shapes, other bf16 roundings), so the defaults stay; bench/evaluate_gpu.py --prefill-configs sets these.
CUDA_PREFILL_SLOTS = 16_384
CUDA_PREFILL_NEW: int | None = None
CUDA_PREFILL_WASTE = 0.5


@dataclass
class DecodeState:
    """What prefill hands a decode loop (tensors on the engine's device)."""

    cache: Any  # transformers DynamicCache or StaticCache holding the prompts' K/V (rows = prompts x n)
    mask: Any  # [rows, width] long: 1 where a cache slot is a real prompt token (left padding is 0)
    last: Any  # [rows] long: position of each row's last prompt token
    logits: Any  # [rows, vocab]: next-token logits after the prompt
    width: int  # cache columns the prompts fill (0 with a SharedPrefix: the cache then holds generated slots only)
    seqs: list[list[int]]  # the prompts' token ids, one per prompt (the sampling keys come from them)
    shared: Any = None  # shared-prefix decoding: the prompts' K/V once, as engine.prefix_attn.SharedPrefix
    prefix_lens: list[int] | None = None  # with shared: each prompt's length in tokens


def init_static_layer(lay, keys, values) -> None:
    """Give a transformers StaticLayer its K/V tensors (kept as given: the layer writes into them in place).

    Unlike StaticLayer.lazy_initialization, the tensors are not marked as static addresses for torch.compile:
    compiled code is specialised on such tensors, and every batch brings a new cache, so a compiled decode step
    recompiled for each batch (bench/results/throughput_h100_llama2-7b-random.md). As plain inputs they only
    make the batch and cache dimensions dynamic, once."""
    import torch

    lay.dtype, lay.device = keys.dtype, keys.device
    lay.batch_size, lay.num_heads = keys.shape[:2]
    lay.k_head_dim, lay.v_head_dim = keys.shape[-1], values.shape[-1]
    lay.keys, lay.values = keys, values
    lay.cumulative_length = torch.zeros((), dtype=torch.long, device=keys.device)
    lay.is_initialized = True



def prefill(eng: HFEngine, seqs: list[list[int]], params: GenParams, static: bool, shared: bool = False) -> DecodeState:
    """Shared-prefix prefill into a KV cache of len(seqs) * n rows, left-padded to the longest prompt.

    shared (static loop, n > 1): the prompts' K/V go to a cache of len(seqs) rows only, kept as the batch's
    SharedPrefix (prefix_attn.py); the static cache then holds just the rows' generated tokens."""
    if shared:
        return prefill_shared(eng, seqs, params)
    import torch
    from transformers import DynamicCache, StaticCache

    n = params.n
    rows = len(seqs) * n
    width = max(len(s) for s in seqs)
    # static: room for every new token, rounded up to 16 columns (SDPA's kernels want aligned masks)
    total = -(-(width + params.max_new_tokens) // 16) * 16 if static else width
    layers = eng.model.config.get_text_config(decoder=True).num_hidden_layers
    if static:
        cache = StaticCache(config=eng.model.config, max_cache_len=total)
    else:
        cache = DynamicCache(config=eng.model.config)
    dest: list = [None] * layers

    def dest_for(layer: int, like_k, like_v):
        if dest[layer] is None:
            h, d_k, d_v = like_k.shape[-3], like_k.shape[-1], like_v.shape[-1]
            if static:
                lay = cache.layers[layer]
                init_static_layer(lay, like_k.new_zeros((rows, h, total, d_k)), like_v.new_zeros((rows, h, total, d_v)))
                dest[layer] = (lay.keys, lay.values)
            else:
                dest[layer] = (like_k.new_zeros((rows, h, width, d_k)), like_v.new_zeros((rows, h, width, d_v)))
        return dest[layer]

    logits = prefill_rows(eng, seqs, dest_for, [(i * n, (i + 1) * n, width - len(s)) for i, s in enumerate(seqs)])
    if static:
        for lay in cache.layers:
            lay.cumulative_length.fill_(width)
    else:
        for layer, lay in enumerate(cache.layers):
            k, v = dest[layer]
            lay.dtype, lay.device = k.dtype, k.device
            lay.keys, lay.values, lay.is_initialized = k, v, True
    mask = torch.zeros((rows, width), dtype=torch.long, device=eng.device)
    for i, s in enumerate(seqs):
        mask[i * n : (i + 1) * n, width - len(s) :] = 1
    last = torch.tensor([len(s) - 1 for s in seqs for _ in range(n)], dtype=torch.long, device=eng.device)
    if n > 1:
        logits = logits.repeat_interleave(n, 0)
    return DecodeState(cache=cache, mask=mask, last=last, logits=logits, width=width, seqs=seqs)


def prefill_shared(eng: HFEngine, seqs: list[list[int]], params: GenParams) -> DecodeState:
    """Prefill for shared-prefix decoding: each prompt's K/V once ([prompts, heads, width, dim] per layer,
    left-padded), a static cache of rows x max_new_tokens slots for what the rows generate, and the
    SharedPrefix that tells decode attention which rows read which prompt."""
    import torch
    from transformers import StaticCache

    from comptrust.engine.prefix_attn import make_shared_prefix

    n = params.n
    prompts, rows = len(seqs), len(seqs) * n
    width = max(len(s) for s in seqs)
    cfg = eng.model.config.get_text_config(decoder=True)
    dest: list = [None] * cfg.num_hidden_layers

    def dest_for(layer: int, like_k, like_v):
        if dest[layer] is None:
            h = like_k.shape[-3]
            dest[layer] = (like_k.new_zeros((prompts, h, width, like_k.shape[-1])),
                           like_v.new_zeros((prompts, h, width, like_v.shape[-1])))
        return dest[layer]

    logits = prefill_rows(eng, seqs, dest_for, [(i, i + 1, width - len(s)) for i, s in enumerate(seqs)])
    pmask = torch.zeros((prompts, width), dtype=torch.uint8, device=eng.device)
    for i, s in enumerate(seqs):
        pmask[i, width - len(s) :] = 1
    total = -(-params.max_new_tokens // 16) * 16  # the rows' own slots, aligned as in prefill
    cache = StaticCache(config=eng.model.config, max_cache_len=total)
    k0, v0 = dest[0]
    for lay in cache.layers:
        init_static_layer(lay, k0.new_zeros((rows, k0.shape[1], total, k0.shape[3])),
                          v0.new_zeros((rows, v0.shape[1], total, v0.shape[3])))
    q_per_kv = cfg.num_attention_heads // k0.shape[1]
    sp = make_shared_prefix([d[0] for d in dest], [d[1] for d in dest], pmask,
                            [i for i in range(prompts) for _ in range(n)], q_per_kv, eng.device)
    last = torch.tensor([len(s) - 1 for s in seqs for _ in range(n)], dtype=torch.long, device=eng.device)
    return DecodeState(cache=cache, mask=torch.zeros((rows, 0), dtype=torch.long, device=eng.device), last=last,
                       logits=logits.repeat_interleave(n, 0), width=0, seqs=seqs, shared=sp,
                       prefix_lens=[len(s) for s in seqs])


def prefill_rows(eng: HFEngine, seqs: list[list[int]], dest_for: DestFor, targets: list[tuple[int, int, int]]):
    """The two prefill stages both prefill paths share: stage 1 computes each distinct shared prefix once (kept as
    KV pieces); stage 2 runs each prompt's own tokens on top of its prefix and writes every real token's K/V to
    its place in the destination (dest_for and targets as in forward_rows). Returns the last-token logits,
    one row per prompt."""
    plen = shared_prefixes(seqs) if eng.prefix_sharing else [0] * len(seqs)
    eng.set_attn(eng.attn or "sdpa")
    prefixes: dict[tuple, int] = {}
    for s, p in zip(seqs, plen):
        if p:
            prefixes.setdefault(tuple(s[:p]), len(prefixes))
    pieces: list = []
    if prefixes:
        pieces, _ = forward_rows(eng, [None] * len(prefixes), [list(k) for k in prefixes], keep=True)
    ctx = [pieces[prefixes[tuple(s[:p])]] if p else None for s, p in zip(seqs, plen)]
    _, logits = forward_rows(eng, ctx, [s[p:] for s, p in zip(seqs, plen)], dest_for=dest_for, targets=targets)
    return logits



def forward_rows(eng: HFEngine, ctx: list, toks: list[list[int]], keep: bool = False, dest_for=None, targets=None):
    """One prefill forward per sub-batch of rows: row r continues from ctx[r] (a KV piece: per layer
    (K, V) of shape [heads, P, dim], or None) with the tokens toks[r].

    keep: return each row's KV piece (ctx + new tokens). dest_for(layer, k, v) -> (K, V) and targets[r] =
    (first dest row, end dest row, first column): write each row's KV there instead. Returns (pieces,
    last-token logits [rows, vocab])."""
    import torch
    from transformers import DynamicCache

    m = eng.model
    on_cuda = eng.on_cuda
    ctx_lens = [0 if c is None else c[0][0].shape[1] for c in ctx]
    tok_lens = [len(t) for t in toks]
    # slots per prefill forward (its KV and activations are extra memory)
    if on_cuda:
        groups = prefill_groups(ctx_lens, tok_lens, CUDA_PREFILL_SLOTS, CUDA_PREFILL_WASTE, CUDA_PREFILL_NEW)
    else:
        groups = prefill_groups(ctx_lens, tok_lens, 8_192, 0.2)
    pieces: list = [None] * len(toks)
    logits_out = None
    pad = eng.tok.pad_token_id
    for g in groups:
        wc = max(ctx_lens[r] for r in g)
        ws = max(tok_lens[r] for r in g)
        b = len(g)
        ids = torch.full((b, ws), pad, dtype=torch.long)
        mask = torch.zeros((b, wc + ws), dtype=torch.long)
        pos = torch.zeros((b, ws), dtype=torch.long)
        for j, r in enumerate(g):
            t = tok_lens[r]
            ids[j, ws - t :] = torch.tensor(toks[r], dtype=torch.long)
            mask[j, wc - ctx_lens[r] : wc] = 1
            mask[j, wc + ws - t :] = 1
            pos[j, ws - t :] = torch.arange(ctx_lens[r], ctx_lens[r] + t)
        cache = DynamicCache(config=m.config)
        if wc:
            by_ctx: dict[int, list[int]] = defaultdict(list)  # rows continuing the same prefix piece
            for j, r in enumerate(g):
                if ctx[r] is not None:
                    by_ctx[id(ctx[r])].append(j)
            firsts = {key: ctx[g[js[0]]] for key, js in by_ctx.items()}
            for layer, lay in enumerate(cache.layers):
                k0, v0 = next(iter(firsts.values()))[layer]
                kk = k0.new_zeros((b, k0.shape[0], wc, k0.shape[2]))
                vv = v0.new_zeros((b, v0.shape[0], wc, v0.shape[2]))
                for key, js in by_ctx.items():
                    pk, pv = firsts[key][layer]
                    sel = torch.tensor(js, device=kk.device)
                    kk[sel, :, wc - pk.shape[1] :] = pk.unsqueeze(0)
                    vv[sel, :, wc - pv.shape[1] :] = pv.unsqueeze(0)
                lay.dtype, lay.device = kk.dtype, kk.device
                lay.keys, lay.values, lay.is_initialized = kk, vv, True
        ids, mask, pos = ids.to(eng.device), mask.to(eng.device), pos.to(eng.device)
        out = m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
        lg = out.logits[:, -1, :]
        if logits_out is None:
            logits_out = lg.new_empty((len(toks), lg.shape[-1]))
        logits_out[torch.tensor(g, device=lg.device)] = lg
        eng.counters["prefill_forwards"] += 1
        eng.counters["prefill_tokens"] += sum(tok_lens[r] for r in g)
        eng.counters["prefill_slots"] += b * ws
        if keep:
            for layer, lay in enumerate(cache.layers):
                K, V = lay.keys, lay.values
                for j, r in enumerate(g):
                    cl, t = ctx_lens[r], tok_lens[r]
                    if pieces[r] is None:
                        pieces[r] = []
                    pieces[r].append(
                        (torch.cat([K[j, :, wc - cl : wc], K[j, :, wc + ws - t :]], dim=1),
                         torch.cat([V[j, :, wc - cl : wc], V[j, :, wc + ws - t :]], dim=1))
                    )
        else:
            # every real token of every row (its prefix, then its own tokens) to its place in the batch
            # cache, for each of the row's n copies: one gather/scatter per layer
            sr, sc, dr, dc = [], [], [], []
            for j, r in enumerate(g):
                cl, t = ctx_lens[r], tok_lens[r]
                r0, r1, c0 = targets[r]
                src = list(range(wc - cl, wc)) + list(range(wc + ws - t, wc + ws))
                for row in range(r0, r1):
                    sr += [j] * len(src)
                    sc += src
                    dr += [row] * len(src)
                    dc += range(c0, c0 + cl + t)
            idx = [torch.tensor(x, dtype=torch.long, device=eng.device) for x in (sr, sc, dr, dc)]
            for layer, lay in enumerate(cache.layers):
                K, V = lay.keys, lay.values
                dk, dv = dest_for(layer, K, V)
                dk[idx[2], :, idx[3]] = K[idx[0], :, idx[1]]
                dv[idx[2], :, idx[3]] = V[idx[0], :, idx[1]]
        del cache, out
    return pieces, logits_out


def prefill_simple(eng: HFEngine, seqs: list[list[int]], params: GenParams) -> DecodeState:
    """Models whose cache is not plain full-attention KV (sliding windows, hybrids): transformers' own
    cache handles the prefill of the left-padded batch, every sample row prefilled."""
    from transformers import DynamicCache

    ids, mask = eng.left_pad(seqs)
    if params.n > 1:
        ids = ids.repeat_interleave(params.n, 0)
        mask = mask.repeat_interleave(params.n, 0)
    ids, mask = ids.to(eng.device), mask.to(eng.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=eng.model.config)
    if eng.attn is None and not eng.on_cuda:
        eng.set_attn("sdpa")
    logits = eng.model(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, :]
    eng.counters["prefill_forwards"] += 1
    eng.counters["prefill_tokens"] += int(mask.sum())
    eng.counters["prefill_slots"] += mask.numel()
    return DecodeState(cache=cache, mask=mask, last=pos[:, -1], logits=logits, width=ids.shape[1], seqs=seqs)
