"""The HF engine's own decode loops, run on a DecodeState from engine/prefill.py; each returns the token ids of
every output row (prompts x n, in order).

* compact: a dynamic cache; rows that reach EOS leave the batch at once (their KV rows are dropped), so a batch
  costs what its live rows cost. Best where the machine is compute-bound (the CPU).
* static: a static cache and device-only bookkeeping (StaticStep), one CUDA-graph replay per token on a GPU;
  the host looks every few steps whether rows finished and halves the batch once half of them have.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from comptrust.engine.attention import ATTN_NAME, PREFIX_KWARG
from comptrust.engine.prefill import DecodeState, init_static_layer
from comptrust.engine.sampling import sample_next
from comptrust.types import GenParams

if TYPE_CHECKING:
    from comptrust.engine.hf import HFEngine

log = logging.getLogger("comptrust.engine.hf")  # the engine's messages keep their logger name

CHECK_EVERY = 8  # static loop: decode steps between the host's looks at the finished flags


def decode_compact(eng: HFEngine, st: DecodeState, params: GenParams) -> list[list[int]]:
    """Our own decode loop on a dynamic cache: rows that reach EOS leave the batch (their KV cache rows are
    dropped), so a batch costs what its live rows cost; with model.generate() finished rows keep being
    computed until the longest one ends."""
    import torch

    cache, mask, last, logits = st.cache, st.mask, st.last, st.logits
    rows = mask.shape[0]
    seed_lo, seed_hi = eng.sample_keys(st.seqs, params)
    eos = torch.tensor(eng.eos_ids, dtype=torch.long, device=eng.device)
    outs: list[list[int]] = [[] for _ in range(rows)]
    alive = torch.arange(rows, device=eng.device)
    if eng.kv_in_place:  # each step writes its K/V into preallocated room instead of torch.cat (engine/kvcache.py)
        from comptrust.engine.kvcache import give_room

        give_room(cache, params.max_new_tokens)
    # one-token decode steps: SDPA reading grouped KV heads in place. On the CPU (SmolLM2, bf16, 2 threads,
    # 64-128 rows, 300-1000 cached tokens) 1.4-1.6x faster than eager attention and 2.9-3.8x faster than
    # transformers' SDPA, which copies K and V per query head whenever a mask is given
    eng.set_attn(eng.attn or ATTN_NAME)
    for step in range(params.max_new_tokens):
        nxt = sample_next(logits, params, eng.top_k, seed_lo, seed_hi, step)
        done = torch.isin(nxt, eos) if len(eng.eos_ids) else torch.zeros_like(nxt, dtype=torch.bool)
        for r, t in zip(alive.tolist(), nxt.tolist()):
            outs[r].append(t)
        if step == params.max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, nxt, mask, last = alive[keep], nxt[keep], mask[keep], last[keep]
            if seed_lo is not None:
                seed_lo, seed_hi = seed_lo[keep], seed_hi[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last = last + 1
        logits = eng.model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
            past_key_values=cache, use_cache=True,
        ).logits[:, -1, :]
        eng.counters["decode_steps"] += 1
        eng.counters["decode_row_steps"] += int(nxt.shape[0])
        eng.counters["decode_kv_slots"] += int(mask.numel())
        if eng.on_step is not None:
            eng.on_step(len(st.seqs), step + 1, params.max_new_tokens)
    return outs


@dataclass
class StaticStep:
    """The static loop's device state: what one decode step reads and updates in place (a CUDA graph replays
    the step on these very tensors; compaction replaces them with their live rows and the graph is recaptured)."""

    mask: Any  # [rows, 1, 1, total] bool: visible cache slots (prompt tokens, then each generated column)
    pos: Any  # [rows, 1] long: position of the token being fed
    out: Any  # [rows, max_new] long: tokens generated so far (pad after EOS)
    finished: Any  # [rows] bool: the row has produced EOS
    step: Any  # () long: the index of the next token
    seed_lo: Any  # [rows] sampling keys (None for greedy)
    seed_hi: Any
    rowmap: Any  # [rows] long: each live row's row in the batch's output
    cache: Any  # transformers StaticCache
    kv_seen: Any  # () long: visible K/V slots summed over steps (a counter)
    shared: Any = None  # shared-prefix decoding: engine.prefix_attn.SharedPrefix, read once per group of rows
    ids: Any = None  # [rows, 1] long: the token fed to the next step
    # shared-prefix decoding only: each prompt's length, and the counters that compare shared with per-row copies
    prefix_lens: Any = None
    kv_rows: Any = None  # () long: slots a step would read with one copy per row, summed over steps
    kv_prefix: Any = None  # () long: prefix slots one step reads (each live prompt once)
    kv_prefix_rows: Any = None  # () long: prefix slots one step would read with one copy per row

    def select(self, keep) -> None:
        """Keep only the rows `keep` (the cache is replaced separately, by compact_static)."""
        self.mask, self.pos, self.out = self.mask[keep].contiguous(), self.pos[keep].contiguous(), self.out[keep].contiguous()
        self.finished, self.ids = self.finished[keep].contiguous(), self.ids[keep].contiguous()
        self.rowmap = self.rowmap[keep].contiguous()
        if self.seed_lo is not None:
            self.seed_lo, self.seed_hi = self.seed_lo[keep].contiguous(), self.seed_hi[keep].contiguous()


def decode_static(eng: HFEngine, st: DecodeState, params: GenParams) -> list[list[int]]:
    """Static KV cache of width prompt + max_new_tokens; one step = (mark the new cache column visible,
    forward one token per row, pick the next token, record it, update finished flags): device work only,
    captured once per batch shape as a CUDA graph on a GPU. The host looks every CHECK_EVERY steps whether all
    rows are done, and halves the batch (new cache, new graph) once half of its rows are finished."""
    import torch

    cache, mask2, last, logits, width = st.cache, st.mask, st.last, st.logits, st.width
    rows, total, max_new = mask2.shape[0], cache.layers[0].keys.shape[2], params.max_new_tokens
    dev = eng.device
    pad = eng.tok.pad_token_id if eng.tok.pad_token_id is not None else 0
    seed_lo, seed_hi = eng.sample_keys(st.seqs, params)
    eos = torch.tensor(eng.eos_ids or [-1], dtype=torch.long, device=dev)
    s = StaticStep(
        mask=torch.zeros((rows, 1, 1, total), dtype=torch.bool, device=dev),
        pos=last[:, None].clone(),
        out=torch.full((rows, max_new), pad, dtype=torch.long, device=dev),
        finished=torch.zeros(rows, dtype=torch.bool, device=dev),
        step=torch.zeros((), dtype=torch.long, device=dev),
        seed_lo=seed_lo,
        seed_hi=seed_hi,
        rowmap=torch.arange(rows, device=dev),
        cache=cache,
        kv_seen=torch.zeros((), dtype=torch.long, device=dev),
        shared=st.shared,
    )
    if s.shared is not None:
        s.prefix_lens = torch.tensor(st.prefix_lens, dtype=torch.long, device=dev)
        s.kv_rows = torch.zeros((), dtype=torch.long, device=dev)
        prefix_counts(s)
    s.mask[:, 0, 0, :width] = mask2.bool()
    ar = torch.arange(total, device=dev)
    out_all = torch.full((rows, max_new), pad, dtype=torch.long, device=dev)
    nxt = sample_next(logits, params, eng.top_k, seed_lo, seed_hi, s.step)
    s.out[:, 0] = nxt
    s.finished |= torch.isin(nxt, eos)
    s.ids = nxt[:, None].clone()
    s.step += 1
    eng.set_attn(eng.attn or ATTN_NAME)
    if eng.on_cuda and eng.compile != "on":
        fuse_elementwise(eng)
    model, top_k = decode_forward(eng), eng.top_k
    pad_t = torch.tensor(pad, dtype=torch.long, device=dev)
    if model is not eng.model:  # compiled: batch rows and cache width are dynamic from the first compile on
        mark_dynamic(s)

    def step_fn(s: StaticStep = s) -> None:
        s.pos.add_(1)
        col = s.cache.layers[0].cumulative_length
        s.mask.logical_or_((ar == col).view(1, 1, 1, total))
        kw = {}
        if s.shared is not None:
            own = s.mask.sum()
            s.kv_seen.add_(own + s.kv_prefix)
            s.kv_rows.add_(own + s.kv_prefix_rows)
            kw[PREFIX_KWARG] = s.shared
        else:
            s.kv_seen.add_(s.mask.sum())
        lg = model(
            input_ids=s.ids, attention_mask=s.mask, position_ids=s.pos,
            past_key_values=s.cache, use_cache=True, **kw,
        ).logits[:, -1, :]
        nx = sample_next(lg, params, top_k, s.seed_lo, s.seed_hi, s.step)
        nx = torch.where(s.finished, pad_t, nx)
        s.out.scatter_(1, s.step.view(1, 1).expand(nx.shape[0], 1), nx[:, None])
        s.finished.logical_or_(torch.isin(nx, eos))
        s.ids.copy_(nx[:, None])
        s.step.add_(1)

    use_graphs = eng.on_cuda and eng.cuda_graphs
    graph = None
    done_steps = 1
    while done_steps < max_new:
        cur = s.out.shape[0]
        warm_up = graph is None and use_graphs and max_new - done_steps > 2
        if warm_up:
            graph = capture(eng, step_fn)  # its warm-up runs one real step
            use_graphs = graph is not None
        elif graph is not None:
            graph.replay()
        else:
            step_fn()
        done_steps += 1
        eng.counters["decode_steps"] += 1
        eng.counters["decode_row_steps"] += cur
        if warm_up:
            continue
        if eng.on_step is not None and done_steps % CHECK_EVERY == 0:  # host-side, between graph replays
            eng.on_step(len(st.seqs), done_steps, max_new)
        if done_steps % CHECK_EVERY == 0 and done_steps < max_new and eng.eos_ids:
            alive = int((~s.finished).sum())
            if alive == 0:
                break
            if alive <= cur // 2 and cur >= 8 and max_new - done_steps >= 16:
                out_all[s.rowmap] = s.out
                keep = (~s.finished).nonzero().squeeze(1)
                compact_static(eng, s, keep, total)
                if model is not eng.model:
                    mark_dynamic(s)
                graph = None  # recapture for the new shape
                eng.counters["compactions"] += 1
    out_all[s.rowmap] = s.out
    if eng.on_cuda:
        torch.cuda.synchronize(dev)
    eng.counters["decode_kv_slots"] += int(s.kv_seen)  # the slots a row can see, not the padded width
    if s.shared is not None:  # with one copy per row the same steps would have read this many
        eng.counters["decode_kv_slots_unshared"] += int(s.kv_rows)
        eng.counters["shared_decode_batches"] += 1
    else:
        eng.counters["decode_kv_slots_unshared"] += int(s.kv_seen)
    return out_all.cpu().tolist()


def fuse_elementwise(eng: HFEngine) -> None:
    """The decode step's RMSNorm, rotary and SiLU * up as fused Triton kernels with the same bits
    (engine/triton_fused.py), once per model; the engine's notes say what was fused."""
    if getattr(eng.model, "_comptrust_fused", None) is not None:
        return
    from comptrust.engine import triton_fused

    counts = triton_fused.install(eng.model)
    eng.model._comptrust_fused = counts
    if any(counts.values()):  # install ran the self-check on the model's device: this reads its cached result
        p = next(eng.model.parameters())
        checked = triton_fused.self_check(p.device, p.dtype)
        eng.notes.append("decode step: fused kernels for " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                         + f" (bit-identical on this GPU: {', '.join(k for k, v in checked.items() if v) or 'none'})")


def prefix_counts(s: StaticStep) -> None:
    """Prefix slots one decode step reads: each prompt that still has a live row once (shared), and once per
    row (what an unshared cache would read)."""
    import torch

    grp = s.shared.group
    lens = s.prefix_lens
    s.kv_prefix_rows = lens[grp].sum()
    s.kv_prefix = lens[torch.unique(grp)].sum()


def mark_dynamic(s: StaticStep) -> None:
    import torch

    mark = torch._dynamo.maybe_mark_dynamic
    for t, dims in ((s.ids, (0,)), (s.pos, (0,)), (s.mask, (0, 3))):
        for d in dims:
            mark(t, d)
    for lay in s.cache.layers:
        for t in (lay.keys, lay.values):
            mark(t, 0)
            mark(t, 2)


def compact_static(eng: HFEngine, s: StaticStep, keep, total: int) -> None:
    """Keep only the rows `keep`: a new static cache holding their K/V, and their rows of every step tensor."""
    from transformers import StaticCache

    old = s.cache
    new = StaticCache(config=eng.model.config, max_cache_len=total)
    for lo, ln in zip(old.layers, new.layers):
        init_static_layer(ln, lo.keys[keep], lo.values[keep])
        ln.cumulative_length.copy_(lo.cumulative_length)
    s.cache = new
    s.select(keep)
    if s.shared is not None:
        from comptrust.engine.prefix_attn import select_rows

        s.shared = select_rows(s.shared, keep)
        prefix_counts(s)


def decode_forward(eng: HFEngine) -> Callable[..., Any]:
    """The model, or its forward under torch.compile (default mode) where eng.compile says so."""
    if eng._decode_fwd is not None:
        return eng._decode_fwd
    if eng.compile != "on":
        eng._decode_fwd = eng.model
        return eng._decode_fwd
    import torch

    # COMPTRUST_COMPILE_BACKEND: tests trace with "eager" (dynamo's guards and recompiles, no code generation)
    compiled = torch.compile(eng.model.forward, backend=os.environ.get("COMPTRUST_COMPILE_BACKEND", "inductor"))
    model = eng.model

    def forward(**kw):
        if eng._decode_fwd is model:
            return model(**kw)
        try:
            return compiled(**kw)
        except Exception as e:  # compiling failed (that happens before the compiled code runs): run eagerly
            msg = f"torch.compile of the decode step failed ({type(e).__name__}: {str(e)[:200]}); decoding eagerly"
            log.warning(msg)
            eng.notes.append(msg)
            eng._decode_fwd = model
            return model(**kw)

    eng._decode_fwd = forward
    eng.notes.append("decode step compiled with torch.compile")
    return forward


def capture(eng: HFEngine, step_fn: Callable[[], None]):
    """Run one real step on a side stream (warm-up), then capture the next as a CUDA graph. None (and
    graphs off for this engine) if capture fails: the eager loop then carries on from the same state."""
    import torch

    stream = torch.cuda.Stream(device=eng.device)
    stream.wait_stream(torch.cuda.current_stream(eng.device))
    with torch.cuda.stream(stream):
        step_fn()
    torch.cuda.current_stream(eng.device).wait_stream(stream)
    # each graph gets its own private memory pool (freed with the graph at the end of its batch); a pool
    # shared through graph_pool_handle() hit an allocator assert in torch 2.11 (use_count > 0)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step_fn()
    except Exception as e:  # e.g. an op that syncs with the host
        torch.cuda.synchronize(eng.device)
        msg = f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); decoding without graphs"
        log.warning(msg)
        eng.notes.append(msg)
        eng.cuda_graphs = False
        return None
    eng.counters["graph_captures"] += 1
    return graph
