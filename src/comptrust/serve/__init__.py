"""Serving models behind an OpenAI-compatible endpoint: a managed llama.cpp server for GGUF files (and their
re-quantizations), evaluated through comptrust.engine.openai_engine.OpenAIEngine. Needs the `serve` extra
(llama-cpp-python[server]), built from source by pip."""

from comptrust.serve.llamacpp import LlamaCppServer, gguf_engine, quantize_gguf

__all__ = ["LlamaCppServer", "gguf_engine", "quantize_gguf"]
