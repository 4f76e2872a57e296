"""Generation engines: batch-first (prompts in, generations out, same order), plus the store-backed cache."""

from __future__ import annotations

from typing import Any

from comptrust.engine.base import Engine, Generation
from comptrust.engine.cached import CachedEngine, GenerationStats

__all__ = ["Engine", "Generation", "CachedEngine", "GenerationStats", "BACKENDS", "make_engine", "pick_backend"]

BACKENDS = ("auto", "hf", "vllm")


def pick_backend(backend: str | None, device: str | None = None) -> str:
    """auto: vLLM where it is installed and a CUDA device is used, else the HF engine."""
    from comptrust.errors import UsageError

    backend = backend or "auto"
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device not in (None, "", "auto") and not str(device).startswith("cuda"):
        return "hf"
    from comptrust.engine.vllm_engine import vllm_available

    return "vllm" if vllm_available() else "hf"


def make_engine(
    model_ref: Any,
    backend: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    chat: bool | None = None,
    **kwargs: Any,
) -> Any:
    """An Engine for `model_ref` (a ResolvedModel, or any --model value: resolved here).

    backend: "hf" (transformers; CPU or GPU), "vllm" (CUDA; UsageError where vLLM is not installed) or "auto".
    Other keyword arguments go to the chosen engine (HFEngine: token_budget, loop, prefix_sharing, ...;
    VLLMEngine: gpu_memory_utilization, max_model_len, ...); those the other engine does not take are ignored.
    The engine's `backend` attribute names the one chosen.
    """
    import inspect

    from comptrust.models.resolve import ResolvedModel, resolve

    model = model_ref if isinstance(model_ref, ResolvedModel) else resolve(model_ref)
    chosen = pick_backend(backend, device)
    if chosen == "vllm":
        from comptrust.engine.vllm_engine import VLLMEngine as cls

        if batch_size:
            kwargs.setdefault("max_num_seqs", batch_size)
    else:
        from comptrust.engine.hf import HFEngine as cls

        kwargs["batch_size"] = batch_size
    accepted = set(inspect.signature(cls.__init__).parameters)
    engine = cls(model, device=device, dtype=dtype, chat=chat, **{k: v for k, v in kwargs.items() if k in accepted})
    engine.backend = chosen
    return engine
