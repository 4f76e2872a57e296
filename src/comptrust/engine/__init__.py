"""Generation engines: batch-first (prompts in, generations out, same order), plus the store-backed cache.

The engine registry lives here: :data:`ENGINES` maps each ``--backend`` name to its engine, in one place. A new
backend is one entry plus its module; ``make_engine``, ``engine.select.open_engine``, the CLI's and the study
file's backend checks and ``comptrust.config.BACKENDS`` all read the names from here. Entries are
``"module:Class"`` strings imported on use, so naming a backend never imports vLLM or torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from comptrust.engine.base import Engine, Generation
from comptrust.engine.cached import CachedEngine, GenerationStats

__all__ = ["Engine", "Generation", "CachedEngine", "GenerationStats", "BACKENDS", "ENGINES", "SERVED",
           "ALL_BACKENDS", "EngineEntry", "make_engine", "pick_backend", "engine_entry"]


@dataclass(frozen=True)
class EngineEntry:
    """One backend: where its engine class lives and how it takes the common knobs."""

    name: str
    target: str  # "module:Class" (or "module:function" for served backends: a context manager)
    batch_size_arg: str = "batch_size"  # the keyword that --batch-size becomes
    needs_cuda: bool = False  # auto picks it only on a CUDA device where it imports
    weights: bool = True  # loads weights in this process (False: the model is served by a server)

    def load(self) -> Any:
        mod, attr = self.target.split(":")
        return getattr(importlib.import_module(mod), attr)


# backends that load weights here (what a study's compressed checkpoints can use) ...
ENGINES: dict[str, EngineEntry] = {
    "hf": EngineEntry("hf", "comptrust.engine.hf:HFEngine"),
    "vllm": EngineEntry("vllm", "comptrust.engine.vllm_engine:VLLMEngine", batch_size_arg="max_num_seqs",
                        needs_cuda=True),
}
# ... and backends that serve a model file through a server started here (engine.select.open_engine)
SERVED: dict[str, EngineEntry] = {
    "llamacpp": EngineEntry("llamacpp", "comptrust.engine.llamacpp:gguf_engine", weights=False),
}
BACKENDS = ("auto", *ENGINES)  # --backend for weights (study files: gguf variants pick llamacpp themselves)
ALL_BACKENDS = (*BACKENDS, *SERVED)  # --backend of evaluate


def engine_entry(name: str) -> EngineEntry:
    from comptrust.errors import UsageError

    entry = ENGINES.get(name) or SERVED.get(name)
    if entry is None:
        raise UsageError(f"--backend {name}: expected one of {', '.join(ALL_BACKENDS)}")
    return entry


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

    backend: a name of :data:`ENGINES` ("hf": transformers, CPU or GPU; "vllm": CUDA, UsageError where vLLM is not
    installed) or "auto". Other keyword arguments go to the chosen engine (HFEngine: token_budget, loop,
    prefix_sharing, ...; VLLMEngine: gpu_memory_utilization, max_model_len, ...); those it does not take are
    ignored. The engine's `backend` attribute names the one chosen; engines without their own describe() get one
    (the resolved model's description plus engine, device and dtype), so every engine meets engine.base.Engine.
    """
    import inspect

    from comptrust.models.resolve import ResolvedModel, resolve

    model = model_ref if isinstance(model_ref, ResolvedModel) else resolve(model_ref)
    chosen = pick_backend(backend, device)
    entry = ENGINES[chosen]
    cls = entry.load()
    if batch_size:
        kwargs.setdefault(entry.batch_size_arg, batch_size)
    elif entry.batch_size_arg == "batch_size":
        kwargs["batch_size"] = batch_size
    accepted = set(inspect.signature(cls.__init__).parameters)
    engine = cls(model, device=device, dtype=dtype, chat=chat, **{k: v for k, v in kwargs.items() if k in accepted})
    engine.backend = chosen
    if not callable(getattr(engine, "describe", None)):
        engine.describe = lambda: model.describe() | {"engine": chosen, "device": engine.device, "dtype": engine.dtype}
    return engine
