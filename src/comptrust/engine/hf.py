"""Batched generation with Hugging Face transformers.

Unlike the reference harness (one generate() call per prompt, batch size 1, per-token log-softmax
bookkeeping), prompts are grouped by decoding parameters and planned into batches sized by a token budget
(rows x (prompt + new tokens)); inside a batch:

* prefill is shared: prompts that start with the same tokens (a system prompt, MMLU's five demonstrations of a
  subject, AdvGLUE's few-shot turns) get that prefix computed once and its KV cache copied to every prompt that
  uses it; the n samples of a prompt are copies of one prefill, never n prefills;
* prefill runs in sub-batches of similar length (little padding), decode in one batch per plan entry;
* decoding is either the "compact" loop (dynamic cache; rows that reach EOS leave the batch: best where the
  machine is compute-bound, i.e. the CPU) or the "static" loop (static KV cache, all bookkeeping on the device,
  one CUDA-graph replay per token on a GPU, finished rows compacted away in halves);
* sampling draws from a counter-based generator keyed by (seed, prompt tokens, sample index, step), so a
  prompt's samples depend neither on its batch mates nor on how the loop is run.

Greedy outputs equal model.generate()'s (tests compare the two); loop="hf" runs model.generate() itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

from comptrust.engine.base import Generation
from comptrust.errors import RuntimeFailure, UsageError
from comptrust.models.resolve import ResolvedModel
from comptrust.types import GenParams, Prompt

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float32", "float16")
LOOPS = ("auto", "compact", "static", "hf")
# torch.compile of the static loop's decode step (CUDA only, opt-in: COMPTRUST_COMPILE=on). It fuses the norms,
# rotary embedding, activation and residual adds that otherwise run as ~900 small kernels per Llama-2-7B step
# (12.3 -> 9.3 ms at 64 rows on an H100). Measured end to end on an H100: 7B at 64 rows x 160+128 tokens 4,137 ->
# 5,130 tok/s, 13B 2,582 -> 3,031, the 7B DecodingTrust mix 15.5 -> 13.3 s; each costs ~1 minute of compiling
# first (one compile with dynamic batch and cache sizes, see init_static_layer), so "auto" (the default) leaves
# it off: it pays for full-profile runs, not for mini suites.
COMPILE_MODES = ("auto", "on", "off")
ATTN_NAME = "comptrust_sdpa"  # SDPA whose one-token decode step reads grouped KV heads without copying them

CPU_TOKEN_BUDGET = 48_000
CPU_MAX_ROWS = 128
# on a GPU the rows of a decode batch are sized by measured free memory (HFEngine._limits), not a constant:
GPU_KV_SHARE = 0.5  # of the free memory for the batch's KV cache (compaction copies up to half of it again)
GPU_ROW_SHARE = 0.2  # of the free memory for per-row decode buffers (logits, sampling, activations, graph pools)
MIN_SHARED_PREFIX = 16  # tokens; shorter common prefixes are recomputed (a forward call costs more than they save)


def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: expected cpu, cuda or cuda:N")
    return device


def pick_dtype(dtype: str | None, device: str) -> str:
    """bf16 on GPU; on the CPU bf16 as well where the CPU has native bf16 (measured 2.3x faster than fp32 on
    an avx512_bf16 machine, same preferences), fp32 otherwise."""
    if dtype not in (None, "", "auto"):
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def quiet_transformers() -> None:
    """Our own progress bar reports progress; transformers' per-load bars and advisories are noise here."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


# -- prompts (shared with the vLLM backend: same text, same tokens, same cache keys) --------------------------
def load_tokenizer(model: ResolvedModel, chat: bool | None):
    """The model's tokenizer, left-padding, a pad token; and whether prompts get its chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model.path))
    except Exception as e:
        raise UsageError(f"cannot load the tokenizer of {model.path}: {type(e).__name__}: {e}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    use_chat = bool(tok.chat_template) if chat is None else chat
    if use_chat and not tok.chat_template:
        raise UsageError(f"{model.name} has no chat template; evaluate it in raw-text mode (--raw)")
    return tok, use_chat


def render_prompt(tok, chat: bool, prompt: Prompt) -> str:
    """The exact text the model sees: the chat template, or for raw-text mode (base models) the turns
    separated by blank lines with the assistant's turn left open; raw prompts (MMLU) as they are."""
    if prompt.raw is not None:
        return prompt.raw
    msgs = [{"role": m.role, "content": m.content} for m in prompt.messages]
    if chat:  # the model folder's template is untrusted code: sandboxed and bounded (engine/chat_template.py)
        from comptrust.engine.chat_template import render_chat

        return render_chat(tok, msgs, getattr(tok, "name_or_path", "the model"))
    return "\n\n".join(m["content"] for m in msgs) + "\n"


def encode_prompt(tok, chat: bool, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt: the chat template carries its own special tokens; raw text gets the
    tokenizer's (BOS)."""
    return tok(render_prompt(tok, chat, prompt), add_special_tokens=prompt.raw is not None)["input_ids"]


def fingerprint_for(model: ResolvedModel, dtype: str, chat: bool) -> str:
    """What changes outputs besides the weights: dtype and the prompt rendering mode. Part of every cache key."""
    return f"{model.fingerprint}:{dtype}:{'chat' if chat else 'raw'}"


# -- planning (pure functions, tested without a model) --------------------------------------------------------
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


def prefill_groups(ctx_lens: Sequence[int], tok_lens: Sequence[int], max_tokens: int, max_waste: float) -> list[list[int]]:
    """Sub-batches for one prefill forward each: similar new-token counts (padding is computed like real
    tokens, so at most max_waste of a sub-batch's new-token slots are padding), at most max_tokens slots."""
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
            if rows * (ws + wc) > max_tokens or waste > max_waste:
                out.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += tok_lens[i]
    if cur:
        out.append(cur)
    return out


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


# -- counter-based sampling -----------------------------------------------------------------------------------
M31 = 0x7FFF_FFFF


def _mix31(x):
    """A 31-bit integer hash (xorshift-multiply; no product exceeds 2**61, so int64 never overflows)."""
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & M31
    x = x ^ (x >> 15)
    x = (x * 0x297A2D39) & M31
    x = x ^ (x >> 16)
    return x


def row_seed(seed: int, tokens: Sequence[int], j: int) -> int:
    """The sampling key of output row j of a prompt: depends on nothing but (seed, prompt tokens, j)."""
    digest = hashlib.sha256(repr((seed, list(tokens), j)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x3FFF_FFFF_FFFF_FFFF


def counter_uniform(seed_lo, seed_hi, step, token_ids):
    """Uniforms in (0, 1), float64, one per (row, candidate token), from (row key, step, token id) alone."""
    import torch

    if not isinstance(step, torch.Tensor):
        step = torch.tensor(step, dtype=torch.long, device=token_ids.device)
    s = _mix31((step * 0x9E37 + 0x1234567) & M31)
    h = _mix31((token_ids ^ s) & M31)
    h = _mix31(h ^ seed_hi[:, None])
    h = _mix31(h ^ seed_lo[:, None])
    return (h.double() + 0.5) / float(1 << 31)


def sample_next(logits, params: GenParams, top_k: int | None, seed_lo, seed_hi, step):
    """Next tokens: argmax for greedy; else temperature, then top-k (the model's generation config, 50 by
    default as in transformers and the reference harness), then top-p, then one draw per row by the Gumbel-max
    trick with counter_uniform noise. Runs on the device, no host sync: it can be captured in a CUDA graph."""
    import torch

    if params.greedy:
        return logits.argmax(-1)
    x = logits.float() / params.temperature
    k = min(top_k or x.shape[-1], x.shape[-1])
    vals, idx = torch.topk(x, k, dim=-1)
    probs = torch.softmax(vals, dim=-1)
    logp = torch.log_softmax(vals, dim=-1)
    if params.top_p < 1.0:
        cut = (probs.cumsum(-1) - probs) > params.top_p  # keep the smallest prefix whose mass reaches top_p
        logp = logp.masked_fill(cut, float("-inf"))
    u = counter_uniform(seed_lo, seed_hi, step, idx)
    choice = (logp.double() - torch.log(-torch.log(u))).argmax(-1)
    return idx.gather(-1, choice[:, None]).squeeze(-1)


# -- attention ----------------------------------------------------------------------------------------------
_ATTN_REGISTERED = False


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


PREFIX_KWARG = "comptrust_prefix"  # the static loop's SharedPrefix, passed through model(...) to the attention


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


def register_attention() -> None:
    global _ATTN_REGISTERED
    if _ATTN_REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _gqa_sdpa)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _ATTN_REGISTERED = True


class HFEngine:
    """Tokenizer loads at once (needed to render prompts for cache keys); the model loads on first use.

    batch_size caps the output rows of a batch (None: 128 on the CPU; on a GPU as many as a fifth of the free
    memory holds in per-row decode buffers); token_budget caps rows x (prompt + new tokens), or with shared-prefix
    decoding prompts x prompt + rows x new tokens (None: 48k on the CPU; on a GPU what half of the free memory
    holds in KV cache). shared_decode: the static loop keeps one copy of a prompt's K/V for its n sample rows and
    reads it once per decode step for all of them (engine/prefix_attn.py); None = on wherever it applies (n > 1,
    the static loop, comptrust's attention, no torch.compile), False = every row holds its own copy.
    loop: "auto" (static on CUDA for plain decoder models, else compact), "compact", "static" or "hf".
    preloaded: an already built model (benchmarks with random weights); its ResolvedModel still names the
    tokenizer directory and the fingerprint.
    """

    def __init__(
        self,
        model: ResolvedModel,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
        token_budget: int | None = None,
        chat: bool | None = None,
        threads: int | None = None,
        attn: str | None = None,
        loop: str = "auto",
        prefix_sharing: bool | None = None,
        cuda_graphs: bool = True,
        preloaded: Any = None,
        ignore_eos: bool = False,
        compile: str | None = None,
        shared_decode: bool | None = None,
    ):
        self.resolved = model
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        if batch_size is not None and batch_size <= 0:
            raise UsageError(f"batch size {batch_size}: must be positive")
        if token_budget is not None and token_budget <= 0:
            raise UsageError(f"token budget {token_budget}: must be positive")
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.threads = threads
        self.attn = attn
        if loop not in LOOPS:
            raise UsageError(f"engine loop {loop!r}: expected one of {', '.join(LOOPS)}")
        self.loop = loop
        # shared-prefix prefill pays where prefill is compute-bound (the CPU: 2-3x fewer prefill FLOPs on
        # DecodingTrust + MMLU prompts); on an H100 it measured no better (Llama-2-7B: 15.4 s vs 16.5 s for 600
        # items) or worse (SmolLM2-135M: 5.2 s vs 3.0 s): smaller prefill forwards, more copies. Default: CPU only.
        # But on full-profile MMLU (20 questions per subject, 13B on an H200) it halved the run, 55.1 s -> 29.2 s
        # (bench/results/evaluate_gpu_h200_mmlu.md): with many prompts per shared prefix it pays on a GPU too.
        self.prefix_sharing = (not self.device.startswith("cuda")) if prefix_sharing is None else prefix_sharing
        self.cuda_graphs = cuda_graphs
        self.shared_decode = shared_decode
        self.compile = compile or os.environ.get("COMPTRUST_COMPILE", "auto")
        if self.compile not in COMPILE_MODES:
            what = "compile setting" if compile else "COMPTRUST_COMPILE"
            raise UsageError(f"{what}={self.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
        check_engine_env()
        self._decode_fwd = None
        self.ignore_eos = ignore_eos  # benchmarks with random weights: fixed output lengths
        self._preloaded = preloaded
        self.top_k: int | None = None
        self.counters: dict[str, float] = defaultdict(float)
        self.notes: list[str] = []
        # optional progress hook from inside a batch: on_step(prompts_in_batch, steps_done, max_new_tokens) after
        # decode steps, so a progress bar can move (and estimate) while one long batch decodes
        self.on_step: Callable[[int, int, int], None] | None = None
        quiet_transformers()
        self.load_seconds = 0.0
        self.tok, self.chat = load_tokenizer(model, chat)
        self._model = None
        self.fingerprint = fingerprint_for(model, self.dtype, self.chat)
        # prompts per generate() call that CachedEngine should send (it commits each call's results): on a GPU a
        # chunk must be large enough to fill the batches the token budget allows
        self.chunk_size = 1024 if self.on_cuda else 128

    # -- rendering -------------------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tok, self.chat, prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tok, self.chat, prompt)

    # -- model -----------------------------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            self._load()
        return self._model

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.time()
        if not self.on_cuda or self.threads:
            from comptrust.cpu import cpu_threads  # OMP_NUM_THREADS (a test worker's share) wins over all cores

            torch.set_num_threads(self.threads or cpu_threads())
        register_attention()
        path = self.resolved.path
        # the model's own attention (model.generate(), the reference loop): eager on the CPU, where it is 2.4x
        # faster than transformers' SDPA for batched decoding with left padding (32 prompts x 40 tokens, bf16,
        # SmolLM2: eager 7.7 s, sdpa 18.3 s); SDPA on GPU. Our loops set their own per phase.
        impl = self.attn or ("sdpa" if self.on_cuda else "eager")
        if self._preloaded is not None:
            m = self._preloaded
            self._preloaded = None
        else:
            kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype), "attn_implementation": impl}
            try:
                from comptrust.models.evalcopy import evaluation_dir  # quantized checkpoints -> dense copy

                path = evaluation_dir(path, self.resolved.fingerprint)
            except ImportError:
                pass
            try:
                m, loading = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
            except Exception as e:
                msg = " ".join(str(e).split())
                if "ignore_mismatched_sizes" in msg:  # transformers points at a report it logged, which is hidden
                    msg = "the weights' shapes do not match config.json"
                raise UsageError(f"cannot load model weights from {path}: {type(e).__name__}: {msg[:300]}") from None
            missing = [k for k in loading.get("missing_keys", []) if not k.endswith("lm_head.weight")]
            if missing:  # transformers would fill them with random values and say so only in a hidden warning
                raise UsageError(f"cannot load model weights from {path}: config.json declares weights the files do not "
                                 f"hold ({len(missing)} missing, e.g. {missing[0]}); the config does not match the weights")
        m.to(self.device)
        m.eval()
        if m.config._attn_implementation != impl:
            m.set_attn_implementation(impl)
        self._base_attn = impl
        self._model = m
        gc = m.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tok.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in eos:
            eos.append(self.tok.eos_token_id)
        self.eos_ids = [] if self.ignore_eos else eos
        self.top_k = gc.top_k if gc.top_k is not None else 50  # transformers' default, used by the reference
        self._plain = self._is_plain_decoder(m)
        self.load_seconds = time.time() - t0

    @staticmethod
    def _is_plain_decoder(m) -> bool:
        """Every layer a full-attention KV layer (no sliding windows, no recurrent state): our own prefill
        (shared prefixes, copied KV rows) and the static loop are exact only for those."""
        try:
            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer

            cache = DynamicCache(config=m.config)
            return len(cache.layers) > 0 and all(type(layer) is DynamicLayer for layer in cache.layers)
        except Exception:
            return False

    def _limits(self, params: GenParams) -> tuple[int, int]:
        """(token budget, max rows) for decode batches. On a GPU both come from the memory free now (weights
        loaded): an H200 holding a 13B model has ~110 GB left, room for hundreds of rows, where a constant cap
        sized for smaller cards (64 rows) would leave most of it idle."""
        if not self.on_cuda:
            return self.token_budget or CPU_TOKEN_BUDGET, self.batch_size or CPU_MAX_ROWS
        if self.token_budget and self.batch_size:
            return self.token_budget, self.batch_size
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        # memory PyTorch's allocator keeps cached from earlier batches is free for this one too: counting it keeps
        # the batches of a run from shrinking after its first (measured: 13B unshared 109 instead of ~250 rows)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = self.token_budget or max(4096, int(GPU_KV_SHARE * free / max(self._kv_bytes_per_token(), 1)))
        rows = self.batch_size or max(64, int(GPU_ROW_SHARE * free / self._row_bytes(params)))
        return budget, rows

    def _row_bytes(self, params: GenParams) -> int:
        """Decode working memory per batch row besides its KV cache: the logits row in bf16 and float32 with the
        sampler's temporaries (about four vocabulary-sized float32 rows), the step's activations (hidden states,
        the MLP's intermediate), the output and bookkeeping buffers; doubled for the CUDA graph's private pool."""
        cfg = self.model.config.get_text_config(decoder=True)
        vocab = cfg.vocab_size
        hidden = cfg.hidden_size
        inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
        return 2 * (vocab * (2 + 4 * 4) + hidden * 2 * 8 + inter * 2 * 3 + params.max_new_tokens * 8 * 2)

    def _kv_bytes_per_token(self) -> int:
        cfg = self.model.config.get_text_config(decoder=True)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        size = 2 if self.dtype in ("bfloat16", "float16") else 4
        return 2 * cfg.num_hidden_layers * heads * head_dim * size

    def _loop_for(self) -> str:
        if self.loop != "auto":
            return self.loop
        return "static" if (self.on_cuda and self._plain) else "compact"

    # -- generation ------------------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Prompt], progress: Callable[[int, int], None] | None = None
    ) -> list[Generation]:
        self.model  # noqa: B018 -- load the weights (lazily) before the first batch: sets eos_ids and top_k
        enc = [self.encode(p) for p in prompts]
        groups: dict[GenParams, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            groups[p.params].append(i)
        out: list[Generation | None] = [None] * len(prompts)
        for params, idx in groups.items():
            budget, rows = self._limits(params)
            share = self.prefix_sharing and self._plain and self.loop != "hf"
            plan = plan_batches([enc[i] for i in idx], params.n, params.max_new_tokens, budget, rows, share,
                                shared_decode=self._shared_decode_for(params))
            for b in plan:
                batch = [idx[j] for j in b]
                gens = self._generate_batch([enc[i] for i in batch], params)
                for i, g in zip(batch, gens):
                    out[i] = g
                if progress:
                    progress(len(batch), sum(sum(g.n_tokens) for g in gens))
        return out  # type: ignore[return-value]

    def _shared_decode_for(self, params: GenParams) -> bool:
        """Whether a batch with these parameters decodes with one K/V copy per prompt (prefix_attn.py): only
        with n > 1 samples (else there is nothing to share), in the static loop of a plain decoder, through
        comptrust's attention function (another implementation would ignore the shared prefix), and not under
        torch.compile (the compiled step keeps the ordinary cache)."""
        if self.shared_decode is False or params.n < 2:
            return False
        if self._loop_for() != "static" or not self._plain:
            return False
        if self.attn not in (None, ATTN_NAME):
            return False
        return self.compile != "on"

    def _generate_batch(self, seqs: list[list[int]], params: GenParams) -> list[Generation]:
        import torch

        loop = self._loop_for()
        if loop == "hf":
            return self._generate_hf(seqs, params)
        if loop == "static" and not self._plain:
            loop = "compact"
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                if self._plain:
                    state = self._prefill(seqs, params, static=loop == "static",
                                          shared=loop == "static" and self._shared_decode_for(params))
                else:
                    state = self._prefill_simple(seqs, params)
                self._sync()
                t1 = time.perf_counter()
                if loop == "static":
                    rows = self._decode_static(state, params)
                else:
                    rows = self._decode_compact(state, params)
                self._sync()
                self.counters["prefill_seconds"] += t1 - t0
                self.counters["decode_seconds"] += time.perf_counter() - t1
                self.counters["batches"] += 1
        except torch.OutOfMemoryError as e:  # type: ignore[attr-defined]
            raise RuntimeFailure(
                f"out of memory generating a batch of {len(seqs)} x n={params.n}; lower --batch-size"
            ) from e
        return self._to_generations(rows, len(seqs), params.n)

    def _sync(self) -> None:
        if self.on_cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def _to_generations(self, rows: list[list[int]], n_prompts: int, n: int) -> list[Generation]:
        eos = set(self.eos_ids)
        gens = []
        for b in range(n_prompts):
            texts, counts = [], []
            for r in rows[b * n : (b + 1) * n]:
                k = next((k for k, t in enumerate(r) if t in eos), len(r))
                texts.append(self.tok.decode(r[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False))
                counts.append(k)
            self.counters["new_tokens"] += sum(counts)
            gens.append(Generation(tuple(texts), tuple(counts)))
        return gens

    def _seeds(self, seqs: list[list[int]], params: GenParams):
        import torch

        if params.greedy:
            return None, None
        keys = [row_seed(params.seed, s, j) for s in seqs for j in range(params.n)]
        t = torch.tensor(keys, dtype=torch.long, device=self.device)
        return t & M31, (t >> 31) & M31

    def _set_attn(self, impl: str) -> None:
        if self.model.config._attn_implementation != impl:
            self.model.set_attn_implementation(impl)

    # -- prefill ---------------------------------------------------------------------------------------------
    def _prefill(self, seqs: list[list[int]], params: GenParams, static: bool, shared: bool = False) -> dict:
        """Shared-prefix prefill into a KV cache of len(seqs) * n rows, left-padded to the longest prompt.

        shared (static loop, n > 1): the prompts' K/V go to a cache of len(seqs) rows only, kept as the batch's
        SharedPrefix (prefix_attn.py); the static cache then holds just the rows' generated tokens."""
        if shared:
            return self._prefill_shared(seqs, params)
        import torch
        from transformers import DynamicCache, StaticCache

        n = params.n
        plen = shared_prefixes(seqs) if self.prefix_sharing else [0] * len(seqs)
        self._set_attn(self.attn or "sdpa")
        # stage 1: each distinct shared prefix once
        prefixes: dict[tuple, int] = {}
        for s, p in zip(seqs, plen):
            if p:
                prefixes.setdefault(tuple(s[:p]), len(prefixes))
        pieces: list = []
        if prefixes:
            keys = list(prefixes)
            pieces, _ = self._forward_rows([None] * len(keys), [list(k) for k in keys], keep=True)
        # stage 2: each prompt's own tokens on top of its prefix, written into the batch cache
        rows = len(seqs) * n
        width = max(len(s) for s in seqs)
        # static: room for every new token, rounded up to 16 columns (SDPA's kernels want aligned masks)
        total = -(-(width + params.max_new_tokens) // 16) * 16 if static else width
        layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        if static:
            cache = StaticCache(config=self.model.config, max_cache_len=total)
        else:
            cache = DynamicCache(config=self.model.config)
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

        ctx = [pieces[prefixes[tuple(s[:p])]] if p else None for s, p in zip(seqs, plen)]
        targets = [(i * n, (i + 1) * n, width - len(s)) for i, s in enumerate(seqs)]
        _, logits = self._forward_rows(ctx, [s[p:] for s, p in zip(seqs, plen)], dest_for=dest_for, targets=targets)
        del pieces
        if static:
            for lay in cache.layers:
                lay.cumulative_length.fill_(width)
        else:
            for layer, lay in enumerate(cache.layers):
                k, v = dest[layer]
                lay.dtype, lay.device = k.dtype, k.device
                lay.keys, lay.values, lay.is_initialized = k, v, True
        mask = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            mask[i * n : (i + 1) * n, width - len(s) :] = 1
        last = torch.tensor([len(s) - 1 for s in seqs for _ in range(n)], dtype=torch.long, device=self.device)
        if n > 1:
            logits = logits.repeat_interleave(n, 0)
        return {"cache": cache, "mask": mask, "last": last, "logits": logits, "width": width, "seqs": seqs}

    def _prefill_shared(self, seqs: list[list[int]], params: GenParams) -> dict:
        """Prefill for shared-prefix decoding: each prompt's K/V once ([prompts, heads, width, dim] per layer,
        left-padded), a static cache of rows x max_new_tokens slots for what the rows generate, and the
        SharedPrefix that tells decode attention which rows read which prompt."""
        import torch
        from transformers import StaticCache

        from comptrust.engine.prefix_attn import make_shared_prefix

        n = params.n
        plen = shared_prefixes(seqs) if self.prefix_sharing else [0] * len(seqs)
        self._set_attn(self.attn or "sdpa")
        prefixes: dict[tuple, int] = {}
        for s, p in zip(seqs, plen):
            if p:
                prefixes.setdefault(tuple(s[:p]), len(prefixes))
        pieces: list = []
        if prefixes:
            pieces, _ = self._forward_rows([None] * len(prefixes), [list(k) for k in prefixes], keep=True)
        prompts, rows = len(seqs), len(seqs) * n
        width = max(len(s) for s in seqs)
        cfg = self.model.config.get_text_config(decoder=True)
        dest: list = [None] * cfg.num_hidden_layers

        def dest_for(layer: int, like_k, like_v):
            if dest[layer] is None:
                h = like_k.shape[-3]
                dest[layer] = (like_k.new_zeros((prompts, h, width, like_k.shape[-1])),
                               like_v.new_zeros((prompts, h, width, like_v.shape[-1])))
            return dest[layer]

        ctx = [pieces[prefixes[tuple(s[:p])]] if p else None for s, p in zip(seqs, plen)]
        targets = [(i, i + 1, width - len(s)) for i, s in enumerate(seqs)]
        _, logits = self._forward_rows(ctx, [s[p:] for s, p in zip(seqs, plen)], dest_for=dest_for, targets=targets)
        del pieces
        pmask = torch.zeros((prompts, width), dtype=torch.uint8, device=self.device)
        for i, s in enumerate(seqs):
            pmask[i, width - len(s) :] = 1
        total = -(-params.max_new_tokens // 16) * 16  # the rows' own slots, aligned as in _prefill
        cache = StaticCache(config=self.model.config, max_cache_len=total)
        k0, v0 = dest[0]
        for lay in cache.layers:
            init_static_layer(lay, k0.new_zeros((rows, k0.shape[1], total, k0.shape[3])),
                              v0.new_zeros((rows, v0.shape[1], total, v0.shape[3])))
        q_per_kv = cfg.num_attention_heads // k0.shape[1]
        sp = make_shared_prefix([d[0] for d in dest], [d[1] for d in dest], pmask,
                                [i for i in range(prompts) for _ in range(n)], q_per_kv, self.device)
        last = torch.tensor([len(s) - 1 for s in seqs for _ in range(n)], dtype=torch.long, device=self.device)
        return {"cache": cache, "mask": torch.zeros((rows, 0), dtype=torch.long, device=self.device), "last": last,
                "logits": logits.repeat_interleave(n, 0), "width": 0, "seqs": seqs, "shared": sp,
                "prefix_lens": [len(s) for s in seqs]}

    def _forward_rows(self, ctx: list, toks: list[list[int]], keep: bool = False, dest_for=None, targets=None):
        """One prefill forward per sub-batch of rows: row r continues from ctx[r] (a KV piece: per layer
        (K, V) of shape [heads, P, dim], or None) with the tokens toks[r].

        keep: return each row's KV piece (ctx + new tokens). dest_for(layer, k, v) -> (K, V) and targets[r] =
        (first dest row, end dest row, first column): write each row's KV there instead. Returns (pieces,
        last-token logits [rows, vocab])."""
        import torch
        from transformers import DynamicCache

        m = self.model
        on_cuda = self.on_cuda
        ctx_lens = [0 if c is None else c[0][0].shape[1] for c in ctx]
        tok_lens = [len(t) for t in toks]
        max_tokens = 16_384 if on_cuda else 8_192  # slots per prefill forward (its KV and activations are extra memory)
        groups = prefill_groups(ctx_lens, tok_lens, max_tokens, 0.5 if on_cuda else 0.2)
        pieces: list = [None] * len(toks)
        logits_out = None
        pad = self.tok.pad_token_id
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
            ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
            out = m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
            lg = out.logits[:, -1, :]
            if logits_out is None:
                logits_out = lg.new_empty((len(toks), lg.shape[-1]))
            logits_out[torch.tensor(g, device=lg.device)] = lg
            self.counters["prefill_forwards"] += 1
            self.counters["prefill_tokens"] += sum(tok_lens[r] for r in g)
            self.counters["prefill_slots"] += b * ws
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
                idx = [torch.tensor(x, dtype=torch.long, device=self.device) for x in (sr, sc, dr, dc)]
                for layer, lay in enumerate(cache.layers):
                    K, V = lay.keys, lay.values
                    dk, dv = dest_for(layer, K, V)
                    dk[idx[2], :, idx[3]] = K[idx[0], :, idx[1]]
                    dv[idx[2], :, idx[3]] = V[idx[0], :, idx[1]]
            del cache, out
        return pieces, logits_out

    def _prefill_simple(self, seqs: list[list[int]], params: GenParams) -> dict:
        """Models whose cache is not plain full-attention KV (sliding windows, hybrids): transformers' own
        cache handles the prefill of the left-padded batch, every sample row prefilled."""
        from transformers import DynamicCache

        ids, mask = self._left_pad(seqs)
        if params.n > 1:
            ids = ids.repeat_interleave(params.n, 0)
            mask = mask.repeat_interleave(params.n, 0)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        if self.attn is None and not self.on_cuda:
            self._set_attn("sdpa")
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        self.counters["prefill_forwards"] += 1
        self.counters["prefill_tokens"] += int(mask.sum())
        self.counters["prefill_slots"] += mask.numel()
        return {"cache": cache, "mask": mask, "last": pos[:, -1], "logits": logits, "width": ids.shape[1], "seqs": seqs}

    # -- decode: compact -------------------------------------------------------------------------------------
    def _decode_compact(self, st: dict, params: GenParams) -> list[list[int]]:
        """Our own decode loop on a dynamic cache: rows that reach EOS leave the batch (their KV cache rows are
        dropped), so a batch costs what its live rows cost; with model.generate() finished rows keep being
        computed until the longest one ends."""
        import torch

        cache, mask, last, logits = st["cache"], st["mask"], st["last"], st["logits"]
        rows = mask.shape[0]
        seed_lo, seed_hi = self._seeds(st["seqs"], params)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        outs: list[list[int]] = [[] for _ in range(rows)]
        alive = torch.arange(rows, device=self.device)
        # one-token decode steps: SDPA reading grouped KV heads in place. On the CPU (SmolLM2, bf16, 2 threads,
        # 64-128 rows, 300-1000 cached tokens) 1.4-1.6x faster than eager attention and 2.9-3.8x faster than
        # transformers' SDPA, which copies K and V per query head whenever a mask is given
        self._set_attn(self.attn or ATTN_NAME)
        for step in range(params.max_new_tokens):
            nxt = sample_next(logits, params, self.top_k, seed_lo, seed_hi, step)
            done = torch.isin(nxt, eos) if len(self.eos_ids) else torch.zeros_like(nxt, dtype=torch.bool)
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
            logits = self.model(
                input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1, :]
            self.counters["decode_steps"] += 1
            self.counters["decode_row_steps"] += int(nxt.shape[0])
            self.counters["decode_kv_slots"] += int(mask.numel())
            if self.on_step is not None:
                self.on_step(len(st["seqs"]), step + 1, params.max_new_tokens)
        return outs

    # -- decode: static (CUDA graphs) ------------------------------------------------------------------------
    def _decode_static(self, st: dict, params: GenParams) -> list[list[int]]:
        """Static KV cache of width prompt + max_new_tokens; one step = (mark the new cache column visible,
        forward one token per row, pick the next token, record it, update finished flags): device work only,
        captured once per batch shape as a CUDA graph on a GPU. The host looks every `check` steps whether all
        rows are done, and halves the batch (new cache, new graph) once half of its rows are finished."""
        import torch

        cache, mask2, last, logits, width = st["cache"], st["mask"], st["last"], st["logits"], st["width"]
        rows, total, max_new = mask2.shape[0], cache.layers[0].keys.shape[2], params.max_new_tokens
        dev = self.device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        seed_lo, seed_hi = self._seeds(st["seqs"], params)
        eos = torch.tensor(self.eos_ids or [-1], dtype=torch.long, device=dev)
        s = {
            "mask": torch.zeros((rows, 1, 1, total), dtype=torch.bool, device=dev),
            "pos": last[:, None].clone(),
            "out": torch.full((rows, max_new), pad, dtype=torch.long, device=dev),
            "finished": torch.zeros(rows, dtype=torch.bool, device=dev),
            "step": torch.zeros((), dtype=torch.long, device=dev),
            "seed_lo": seed_lo,
            "seed_hi": seed_hi,
            "rowmap": torch.arange(rows, device=dev),
            "cache": cache,
            "kv_seen": torch.zeros((), dtype=torch.long, device=dev),  # visible K/V slots summed over steps
            "shared": st.get("shared"),  # shared-prefix decoding: the prompts' K/V, read once per group of rows
        }
        if s["shared"] is not None:
            # K/V slots a step reads besides the rows' own: each live prompt once (kv_prefix); and what the rows
            # would read with a copy each (kv_prefix_rows), for the counters that compare the two
            s["prefix_lens"] = torch.tensor(st["prefix_lens"], dtype=torch.long, device=dev)
            s["kv_rows"] = torch.zeros((), dtype=torch.long, device=dev)
            self._prefix_counts(s)
        s["mask"][:, 0, 0, :width] = mask2.bool()
        ar = torch.arange(total, device=dev)
        out_all = torch.full((rows, max_new), pad, dtype=torch.long, device=dev)
        nxt = sample_next(logits, params, self.top_k, seed_lo, seed_hi, s["step"])
        s["out"][:, 0] = nxt
        s["finished"] |= torch.isin(nxt, eos)
        s["ids"] = nxt[:, None].clone()
        s["step"] += 1
        self._set_attn(self.attn or ATTN_NAME)
        model, top_k = self._decode_forward(), self.top_k
        pad_t = torch.tensor(pad, dtype=torch.long, device=dev)
        if model is not self.model:  # compiled: batch rows and cache width are dynamic from the first compile on
            self._mark_dynamic(s)

        def step_fn(s=s):
            s["pos"].add_(1)
            col = s["cache"].layers[0].cumulative_length
            s["mask"].logical_or_((ar == col).view(1, 1, 1, total))
            kw = {}
            if s["shared"] is not None:
                own = s["mask"].sum()
                s["kv_seen"].add_(own + s["kv_prefix"])
                s["kv_rows"].add_(own + s["kv_prefix_rows"])
                kw[PREFIX_KWARG] = s["shared"]
            else:
                s["kv_seen"].add_(s["mask"].sum())
            lg = model(
                input_ids=s["ids"], attention_mask=s["mask"], position_ids=s["pos"],
                past_key_values=s["cache"], use_cache=True, **kw,
            ).logits[:, -1, :]
            nx = sample_next(lg, params, top_k, s["seed_lo"], s["seed_hi"], s["step"])
            nx = torch.where(s["finished"], pad_t, nx)
            s["out"].scatter_(1, s["step"].view(1, 1).expand(nx.shape[0], 1), nx[:, None])
            s["finished"].logical_or_(torch.isin(nx, eos))
            s["ids"].copy_(nx[:, None])
            s["step"].add_(1)

        use_graphs = self.on_cuda and self.cuda_graphs
        check = 8
        graph = None
        done_steps = 1
        while done_steps < max_new:
            cur = s["out"].shape[0]
            if graph is None and use_graphs and max_new - done_steps > 2:
                graph = self._capture(step_fn)
                done_steps += 1  # the capture's warm-up ran one real step
                self.counters["decode_steps"] += 1
                self.counters["decode_row_steps"] += cur
                if graph is None:
                    use_graphs = False
                continue
            if graph is not None:
                graph.replay()
            else:
                step_fn()
            done_steps += 1
            self.counters["decode_steps"] += 1
            self.counters["decode_row_steps"] += cur
            if self.on_step is not None and done_steps % check == 0:  # host-side, between graph replays
                self.on_step(len(st["seqs"]), done_steps, max_new)
            if done_steps % check == 0 and done_steps < max_new and self.eos_ids:
                alive = int((~s["finished"]).sum())
                if alive == 0:
                    break
                if alive <= cur // 2 and cur >= 8 and max_new - done_steps >= 16:
                    out_all[s["rowmap"]] = s["out"]
                    keep = (~s["finished"]).nonzero().squeeze(1)
                    self._compact_static(s, keep, total)
                    if model is not self.model:
                        self._mark_dynamic(s)
                    graph = None  # recapture for the new shape
                    self.counters["compactions"] += 1
        out_all[s["rowmap"]] = s["out"]
        if self.on_cuda:
            torch.cuda.synchronize(dev)
        self.counters["decode_kv_slots"] += int(s["kv_seen"])  # the slots a row can see, not the padded width
        if s["shared"] is not None:  # with one copy per row the same steps would have read this many
            self.counters["decode_kv_slots_unshared"] += int(s["kv_rows"])
            self.counters["shared_decode_batches"] += 1
        else:
            self.counters["decode_kv_slots_unshared"] += int(s["kv_seen"])
        return out_all.cpu().tolist()

    @staticmethod
    def _prefix_counts(s: dict) -> None:
        """Prefix slots one decode step reads: each prompt that still has a live row once (shared), and once per
        row (what an unshared cache would read)."""
        import torch

        grp = s["shared"].group
        lens = s["prefix_lens"]
        s["kv_prefix_rows"] = lens[grp].sum()
        s["kv_prefix"] = lens[torch.unique(grp)].sum()

    @staticmethod
    def _mark_dynamic(s: dict) -> None:
        import torch

        mark = torch._dynamo.maybe_mark_dynamic
        for t, dims in ((s["ids"], (0,)), (s["pos"], (0,)), (s["mask"], (0, 3))):
            for d in dims:
                mark(t, d)
        for lay in s["cache"].layers:
            for t in (lay.keys, lay.values):
                mark(t, 0)
                mark(t, 2)

    def _decode_forward(self):
        """The model, or its forward under torch.compile (default mode) where self.compile says so."""
        if self._decode_fwd is not None:
            return self._decode_fwd
        if self.compile != "on":
            self._decode_fwd = self.model
            return self._decode_fwd
        import torch

        # COMPTRUST_COMPILE_BACKEND: tests trace with "eager" (dynamo's guards and recompiles, no code generation)
        compiled = torch.compile(self.model.forward, backend=os.environ.get("COMPTRUST_COMPILE_BACKEND", "inductor"))
        model = self.model

        def forward(**kw):
            if self._decode_fwd is model:
                return model(**kw)
            try:
                return compiled(**kw)
            except Exception as e:  # compiling failed (that happens before the compiled code runs): run eagerly
                msg = f"torch.compile of the decode step failed ({type(e).__name__}: {str(e)[:200]}); decoding eagerly"
                log.warning(msg)
                self.notes.append(msg)
                self._decode_fwd = model
                return model(**kw)

        self._decode_fwd = forward
        self.notes.append("decode step compiled with torch.compile")
        return forward

    def _compact_static(self, s: dict, keep, total: int) -> None:
        from transformers import StaticCache

        old = s["cache"]
        new = StaticCache(config=self.model.config, max_cache_len=total)
        for lo, ln in zip(old.layers, new.layers):
            init_static_layer(ln, lo.keys[keep], lo.values[keep])
            ln.cumulative_length.copy_(lo.cumulative_length)
        s["cache"] = new
        for k in ("mask", "pos", "out", "finished", "ids", "rowmap"):
            s[k] = s[k][keep].contiguous()
        if s.get("shared") is not None:
            from comptrust.engine.prefix_attn import select_rows

            s["shared"] = select_rows(s["shared"], keep)
            self._prefix_counts(s)
        if s["seed_lo"] is not None:
            s["seed_lo"], s["seed_hi"] = s["seed_lo"][keep].contiguous(), s["seed_hi"][keep].contiguous()

    def _capture(self, step_fn):
        """Run one real step on a side stream (warm-up), then capture the next as a CUDA graph. None (and
        graphs off for this engine) if capture fails: the eager loop then carries on from the same state."""
        import torch

        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step_fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        # each graph gets its own private memory pool (freed with the graph at the end of its batch); a pool
        # shared through graph_pool_handle() hit an allocator assert in torch 2.11 (use_count > 0)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step_fn()
        except Exception as e:  # e.g. an op that syncs with the host
            torch.cuda.synchronize(self.device)
            msg = f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); decoding without graphs"
            log.warning(msg)
            self.notes.append(msg)
            self.cuda_graphs = False
            return None
        self.counters["graph_captures"] += 1
        return graph

    # -- transformers' generate() ----------------------------------------------------------------------------
    def _left_pad(self, seqs: list[list[int]]):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        return ids, mask

    def _generate_hf(self, seqs: list[list[int]], params: GenParams) -> list[Generation]:
        """transformers' own generate(): the reference for our loops (tests compare them)."""
        import torch

        ids, mask = self._left_pad(seqs)
        width = ids.shape[1]
        pad = self.tok.pad_token_id
        self._set_attn(self.attn or self._base_attn)
        kw: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            pad_token_id=pad,
            eos_token_id=self.eos_ids or None,
        )
        if params.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            # sampled outputs are reproducible for the same seed and the same batch
            digest = hashlib.sha256(repr((params.seed, seqs[0])).encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
        if not self.eos_ids:
            kw["min_new_tokens"] = params.max_new_tokens
        try:
            with torch.no_grad():
                res = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw
                )
        except torch.OutOfMemoryError as e:  # type: ignore[attr-defined]
            raise RuntimeFailure(f"out of memory generating a batch of {len(seqs)} x n={params.n}; lower --batch-size") from e
        new = res[:, width:].cpu().tolist()
        steps = res.shape[1] - width
        self.counters["prefill_forwards"] += 1
        self.counters["prefill_tokens"] += int(mask.sum())
        self.counters["prefill_slots"] += mask.numel()
        self.counters["decode_steps"] += max(steps - 1, 0)
        self.counters["decode_row_steps"] += max(steps - 1, 0) * res.shape[0]
        self.counters["decode_kv_slots"] += sum(res.shape[0] * (width + k) for k in range(1, steps))
        return self._to_generations(new, len(seqs), params.n)
