"""Generation with vLLM (optional extra `comptrust[vllm]`, CUDA only).

Same contract as the HF engine: the prompt text comes from the same renderer and the same tokenizer, and is
handed to vLLM as token ids, so both backends see identical inputs; the fingerprint has the same form
(weights : dtype : chat|raw), so cache keys are shared between them; outputs are cut at the first EOS and
decoded by the same tokenizer call. vLLM adds continuous batching, paged KV cache, prefix caching, CUDA graphs
and its own kernels; it also loads compressed-tensors checkpoints (GPTQ / AWQ / W8A8 made by llm-compressor)
natively, without the dense copy the HF engine evaluates on the CPU.

Sampling: one seed per request, derived like the HF engine's row keys from (seed, prompt tokens); the n samples
of a prompt come from SamplingParams.n. vLLM's random streams differ from the HF engine's, so sampled outputs
differ between backends (greedy ones agree up to kernel numerics).
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any, Callable, Sequence

from comptrust.engine.base import Generation
from comptrust.engine.hf import pick_dtype, quiet_transformers
from comptrust.engine.prompts import encode_prompt, fingerprint_for, load_tokenizer, render_prompt
from comptrust.engine.sampling import row_seed
from comptrust.errors import RuntimeFailure, UsageError
from comptrust.models.resolve import ResolvedModel
from comptrust.types import GenParams, Prompt

INSTALL_HINT = "pip install 'comptrust[vllm]' on a machine with a CUDA GPU"


def vllm_available() -> bool:
    """vLLM importable and a CUDA device present (vLLM's CPU build is not supported here)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def is_compressed_checkpoint(path) -> bool:
    try:
        from comptrust.models.evalcopy import is_quantized_checkpoint

        return is_quantized_checkpoint(path)
    except Exception:
        return False


class VLLMEngine:
    """Tokenizer loads at once (prompts must render for cache keys before anything is generated); vLLM and the
    weights load on first use."""

    def __init__(
        self,
        model: ResolvedModel,
        device: str | None = None,
        dtype: str | None = None,
        chat: bool | None = None,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        ignore_eos: bool = False,
    ):
        if importlib.util.find_spec("vllm") is None:
            raise UsageError(f"--backend vllm: vLLM is not installed ({INSTALL_HINT})")
        if device not in (None, "", "auto") and not str(device).startswith("cuda"):
            raise UsageError(f"--backend vllm runs on CUDA GPUs only, not --device {device}; use --backend hf")
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except Exception:
            has_cuda = False
        if not has_cuda:
            raise UsageError("--backend vllm: no CUDA device is available; use --backend hf")
        self.resolved = model
        self.device = device if device not in (None, "", "auto") else "cuda"
        self.dtype = pick_dtype(dtype, "cuda")
        self.compressed = is_compressed_checkpoint(model.path)
        quiet_transformers()
        self.tok, self.chat = load_tokenizer(model, chat)
        self.fingerprint = fingerprint_for(model, self.dtype, self.chat)
        self.llm_kwargs: dict[str, Any] = dict(
            model=str(model.path),
            tokenizer=str(model.path),
            dtype=self.dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            seed=0,
        )
        if max_model_len:
            self.llm_kwargs["max_model_len"] = max_model_len
        if max_num_seqs:
            self.llm_kwargs["max_num_seqs"] = max_num_seqs
        if self.device not in ("cuda", "cuda:0"):  # vLLM takes its GPUs from CUDA_VISIBLE_DEVICES
            n = self.device.split(":")[-1]
            raise UsageError(f"--backend vllm uses the visible GPUs: run with CUDA_VISIBLE_DEVICES={n} and --device cuda")
        self.ignore_eos = ignore_eos
        self.chunk_size = 4096  # prompts per generate() call CachedEngine should send (vLLM schedules them itself)
        self._llm = None
        self.load_seconds = 0.0
        self.counters: dict[str, float] = {}
        self.notes: list[str] = []
        self.eos_ids: list[int] = []
        self.top_k: int | None = None

    # -- rendering -------------------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tok, self.chat, prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tok, self.chat, prompt)

    # -- model -----------------------------------------------------------------------------------------------
    @property
    def llm(self):
        if self._llm is None:
            self._load()
        return self._llm

    def _load(self) -> None:
        t0 = time.time()
        try:
            from vllm import LLM
        except Exception as e:  # installed but broken (CUDA / torch mismatch)
            raise UsageError(f"--backend vllm: cannot import vLLM ({type(e).__name__}: {str(e)[:200]}); {INSTALL_HINT}") from None
        try:
            self._llm = LLM(**self.llm_kwargs)
        except Exception as e:
            raise UsageError(f"vLLM cannot load {self.resolved.path}: {type(e).__name__}: {str(e)[:300]}") from None
        try:
            from transformers import GenerationConfig

            gc = GenerationConfig.from_pretrained(str(self.resolved.path))
        except Exception:
            gc = None
        eos = gc.eos_token_id if gc is not None and gc.eos_token_id is not None else self.tok.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in eos:
            eos.append(self.tok.eos_token_id)
        self.eos_ids = [] if self.ignore_eos else eos
        self.top_k = gc.top_k if gc is not None and gc.top_k is not None else 50  # as the HF engine / reference
        self.load_seconds = time.time() - t0

    def sampling_params(self, params: GenParams, tokens: Sequence[int]):
        """vLLM SamplingParams equivalent to the HF engine's decoding of one prompt."""
        from vllm import SamplingParams

        kw: dict[str, Any] = dict(
            n=params.n,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(self.eos_ids),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=True,
            detokenize=False,  # we decode with the same call as the HF engine
        )
        if self.ignore_eos:
            kw["min_tokens"] = params.max_new_tokens
        if params.greedy:
            kw.update(temperature=0.0, top_p=1.0, top_k=-1)
        else:
            kw.update(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=self.top_k if self.top_k else -1,
                seed=row_seed(params.seed, tokens, 0) & 0x7FFF_FFFF,
            )
        return SamplingParams(**kw)

    # -- generation ------------------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Prompt], progress: Callable[[int, int], None] | None = None
    ) -> list[Generation]:
        llm = self.llm
        enc = [self.encode(p) for p in prompts]
        sps = [self.sampling_params(p.params, e) for p, e in zip(prompts, enc)]
        try:
            outs = llm.generate([{"prompt_token_ids": e} for e in enc], sps, use_tqdm=False)
        except Exception as e:
            if "out of memory" in str(e).lower():
                raise RuntimeFailure(f"vLLM ran out of memory: {str(e)[:200]}; lower gpu_memory_utilization") from e
            raise
        eos = set(self.eos_ids)
        gens: list[Generation] = []
        total = 0
        for o in outs:
            texts, counts = [], []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                k = next((k for k, t in enumerate(ids) if t in eos), len(ids))
                texts.append(self.tok.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False))
                counts.append(k)
            total += sum(counts)
            gens.append(Generation(tuple(texts), tuple(counts)))
        self.counters["new_tokens"] = self.counters.get("new_tokens", 0) + total
        if progress:
            progress(len(prompts), total)
        return gens
