"""Compression: GPTQ / AWQ / RTN quantization and magnitude / SparseGPT / Wanda pruning, with measured checks.

Public API:
    compress(model_spec, cfg, out) -> Path      write a checked checkpoint + comptrust.json
    CompressionConfig                           validated settings (CompressionConfig.build -> UsageError)
    evaluation_dir(model_dir, fingerprint)      dense copy of a quantized checkpoint for fast CPU evaluation
llm-compressor is imported lazily (only when a method runs), so importing this package is cheap.
"""

from comptrust.compress.config import METHODS, CompressionConfig


def compress(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy wrapper, see api.compress
    from comptrust.compress.api import compress as _compress

    return _compress(*args, **kwargs)


def evaluation_dir(*args, **kwargs):  # noqa: ANN002, ANN003
    from comptrust.models.evalcopy import evaluation_dir as _evaluation_dir

    return _evaluation_dir(*args, **kwargs)


__all__ = ["METHODS", "CompressionConfig", "compress", "evaluation_dir"]
