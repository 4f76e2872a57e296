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

This module holds HFEngine (loading, batch limits, the generate() driver) and the device and dtype choice; its
parts live beside it: engine/prompts.py (tokenizer, rendering, fingerprint), engine/planning.py (shared
prefixes, batch plans), engine/prefill.py (prefill into a DecodeState), engine/decode.py (the compact and static
loops), engine/sampling.py (counter-based sampling) and engine/attention.py (comptrust's attention function).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

from comptrust.engine.attention import ATTN_NAME, check_engine_env, register_attention
from comptrust.engine.base import Generation
from comptrust.engine.decode import decode_compact, decode_static
from comptrust.engine.planning import plan_batches
from comptrust.engine.prefill import prefill, prefill_simple
from comptrust.engine.prompts import encode_prompt, fingerprint_for, load_tokenizer, render_prompt
from comptrust.engine.sampling import M31, row_seed
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
# first (one compile with dynamic batch and cache sizes, see init_static_layer). Those figures predate the fused
# Triton kernels and shared-prefix decoding, which the compiled step does without (one K/V copy per row, SDPA
# attention, no fused kernels: _shared_decode_for, fuse_elementwise). On an H200, 13B random Llama-2, toxicity
# n = 25 x 150 tokens (72 prompts, bench/results/evaluate_gpu_h200_13b_compile*.md), eager 12,620-13,126 decode
# tok/s (450 rows a batch), compiled 8,687-9,054 (257 rows: the per-row K/V copies fill the token budget), plus
# 57-88 s of compiling; and two compiled runs of the same prompts did not give the same samples (eager: identical).
# So "auto" (the default) leaves it off, for every workload size: compiling never pays where the n = 25
# perspectives, most of a full profile's decode, lose shared-prefix decoding.
COMPILE_MODES = ("auto", "on", "off")

CPU_TOKEN_BUDGET = 48_000
CPU_MAX_ROWS = 128
# on a GPU the rows of a decode batch are sized by measured free memory (HFEngine._limits), not a constant:
GPU_KV_SHARE = 0.5  # of the free memory for the batch's KV cache (compaction copies up to half of it again)
GPU_ROW_SHARE = 0.2  # of the free memory for per-row decode buffers (logits, sampling, activations, graph pools)


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



PREFIX_SHARING_MIN_PARAMS = 1_000_000_000  # CUDA: shared-prefix prefill on from this size (HFEngine.__init__)

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
        # shared-prefix prefill (a prefix common to several prompts computed once per batch) pays where prefill is
        # compute-bound: on the CPU (2-3x fewer prefill FLOPs on DecodingTrust + MMLU prompts), and on a GPU for
        # multi-billion-parameter models: Llama-2-13B on an H200, through evaluate, the DecodingTrust mix 10.95 s ->
        # 8.95 s, toxicity n=25 26.4 s -> 24.2 s (bench/results/evaluate_gpu_h200_13b.md), full-profile MMLU 55.1 s
        # -> 29.2 s (evaluate_gpu_h200_mmlu.md). For a small model it lost on an H100 (SmolLM2-135M: 5.2 s vs
        # 3.0 s; smaller prefill forwards, more copies). Default (None): on, except on CUDA for models under
        # PREFIX_SHARING_MIN_PARAMS parameters; decided when the weights are loaded.
        self.prefix_sharing: bool | None = (None if self.device.startswith("cuda") else True) if prefix_sharing is None \
            else prefix_sharing
        self.cuda_graphs = cuda_graphs
        self.shared_decode = shared_decode
        # compact loop: K/V written in place into preallocated room (engine/kvcache.py) instead of transformers'
        # torch.cat per step; False restores the cat (same outputs, a benchmark and test switch)
        self.kv_in_place = True
        self.compile = compile or os.environ.get("COMPTRUST_COMPILE", "auto")
        if self.compile not in COMPILE_MODES:
            what = "compile setting" if compile else "COMPTRUST_COMPILE"
            raise UsageError(f"{what}={self.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
        check_engine_env()
        self._decode_fwd: Callable[..., Any] | None = None
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
        if self.prefix_sharing is None:  # CUDA default: by model size (see __init__)
            self.prefix_sharing = sum(p.numel() for p in self.model.parameters()) >= PREFIX_SHARING_MIN_PARAMS
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
                    state = prefill(self, seqs, params, static=loop == "static",
                                          shared=loop == "static" and self._shared_decode_for(params))
                else:
                    state = prefill_simple(self, seqs, params)
                self._sync()
                t1 = time.perf_counter()
                if loop == "static":
                    rows = decode_static(self, state, params)
                else:
                    rows = decode_compact(self, state, params)
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

    def sample_keys(self, seqs: list[list[int]], params: GenParams):
        """The (low, high) 31-bit halves of every output row's sampling key (None, None for greedy)."""
        import torch

        if params.greedy:
            return None, None
        keys = [row_seed(params.seed, s, j) for s in seqs for j in range(params.n)]
        t = torch.tensor(keys, dtype=torch.long, device=self.device)
        return t & M31, (t >> 31) & M31

    def set_attn(self, impl: str) -> None:
        if self.model.config._attn_implementation != impl:
            self.model.set_attn_implementation(impl)

    # -- transformers' generate() ----------------------------------------------------------------------------
    def left_pad(self, seqs: list[list[int]]):
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

        ids, mask = self.left_pad(seqs)
        width = ids.shape[1]
        pad = self.tok.pad_token_id
        self.set_attn(self.attn or self._base_attn)
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
