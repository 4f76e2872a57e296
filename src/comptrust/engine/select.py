"""One door to every generation backend: a --model value and a --backend name in, an engine and its info out.

    with open_engine(model, backend="auto") as (engine, info):
        evaluate(engine, info, names, opts, out)

  * ``openai:<base-url>#<name>`` models go to the OpenAI-compatible client (the server is someone else's);
  * ``--backend llamacpp`` serves a GGUF file (the embedded model's when --model is omitted) with a llama.cpp
    server that starts here and stops when the block ends;
  * everything else is resolved (Hub id, directory, GGUF dequantized for transformers) and loaded by the HF
    engine or vLLM (``auto``: vLLM where it is installed and the device is CUDA).

A context manager because two of the backends hold something to release: a server process, an HTTP pool.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from comptrust.engine import ALL_BACKENDS, SERVED
from comptrust.errors import UsageError

OPENAI_PREFIX = "openai:"
BACKENDS = ALL_BACKENDS  # the engine registry's names (engine/__init__.py); llamacpp: served, not loaded here


def gguf_source(model: str | None) -> Path:
    """The GGUF file a llama.cpp backend serves: --model when it is one, the embedded model's when omitted."""
    from comptrust.models.resolve import gguf_file

    return gguf_file(model, "--backend llamacpp serves GGUF files; --model {spec} is not a .gguf file",
                     "--model {spec}: no such GGUF file")


@contextlib.contextmanager
def open_engine(
    model: str | None,
    backend: str | None = "auto",
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    chat: bool | None = None,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Yield (engine, info): info is what evaluate() stores as the model's description."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if model and model.startswith(OPENAI_PREFIX):
        if backend != "auto":
            raise UsageError(f"--backend {backend} does not apply to a served model ({model}); leave it out")
        from comptrust.engine.openai_engine import OpenAIEngine

        engine = OpenAIEngine.from_spec(model, **({} if chat is None else {"chat": chat}))
        try:
            yield engine, engine.describe()
        finally:
            engine.close()
        return
    if backend in SERVED:  # a context manager that starts the server and yields an engine on it
        with SERVED[backend].load()(gguf_source(model)) as engine:
            yield engine, engine.describe()
        return
    from comptrust.engine import make_engine
    from comptrust.models import resolve

    resolved = resolve(model)
    engine = make_engine(resolved, backend=backend, device=device, dtype=dtype, batch_size=batch_size, chat=chat)
    info = engine.describe()
    try:
        yield engine, info
    finally:
        del engine
        gc.collect()
