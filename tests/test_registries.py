"""The plug-in registries: engines (engine/__init__.py) and the Engine protocol every engine meets."""

from __future__ import annotations

import inspect

import pytest

from comptrust.engine import ALL_BACKENDS, BACKENDS, ENGINES, SERVED, Engine, engine_entry
from comptrust.errors import UsageError


def test_one_registry_feeds_every_backend_list():
    from comptrust.config import BACKENDS as CONFIG_BACKENDS
    from comptrust.engine.select import BACKENDS as SELECT_BACKENDS

    assert BACKENDS == ("auto", *ENGINES) and ALL_BACKENDS == (*BACKENDS, *SERVED)
    assert SELECT_BACKENDS == ALL_BACKENDS == CONFIG_BACKENDS
    with pytest.raises(UsageError, match="--backend tgi: expected one of auto, hf, vllm, llamacpp"):
        engine_entry("tgi")


@pytest.mark.parametrize("name", list(ENGINES) + list(SERVED))
def test_every_entry_loads_and_declares_the_protocol(name):
    target = engine_entry(name).load()  # imports the module, not vLLM / llama.cpp themselves
    if not engine_entry(name).weights:
        assert callable(target)  # a context manager over a server
        return
    params = inspect.signature(target.__init__).parameters
    assert {"device", "dtype", "chat"} <= set(params), name
    assert engine_entry(name).batch_size_arg in params, name
    for method in ("render", "generate"):
        assert callable(getattr(target, method, None)), (name, method)


def test_served_engine_meets_the_protocol_without_contacting_the_server():
    from comptrust.engine.openai_engine import OpenAIEngine

    for attr in ("device", "dtype", "chunk_size", "describe", "render", "generate", "fingerprint"):
        assert hasattr(OpenAIEngine, attr), attr
    assert OpenAIEngine.chunk_size > 0


@pytest.mark.model
def test_hf_engine_meets_the_protocol_and_describes_itself():
    from comptrust.engine import make_engine

    engine = make_engine(None, backend="hf", device="cpu")
    assert isinstance(engine, Engine)
    info = engine.describe()
    assert info["engine"] == "hf" and info["device"] == "cpu" and info["dtype"] == engine.dtype
    assert engine.chunk_size > 0 and engine.fingerprint
