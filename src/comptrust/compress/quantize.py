"""Weight quantization through llm-compressor: GPTQ, AWQ and round-to-nearest (RTN).

The shared llm-compressor machinery lives here (the one oneshot runner, quantization groups, the AWQ CPU
workaround); each method's own modifier call is in its class in compress/methods.py (import paths move between
releases: AWQModifier went from ``modifiers.awq`` to ``modifiers.transform.awq``).

What comptrust adds on top of the library:
  - group sizes per input width: a group must divide the layer's input width, and llm-compressor refuses
    otherwise (SmolLM2's 576 % 128 != 0). We use gcd(width, requested): the largest size dividing both, so
    576 -> 64 and 1536 -> 128 for --group-size 128, and the sizes stay powers of two that serving kernels
    support. The size used per width is returned and recorded.
  - a fresh llm-compressor session per call (its session is process-global otherwise)
  - the AWQ CPU workaround (:func:`awq_cpu_workaround`), in this one place
Schemes: GPTQ and RTN symmetric int groups (llm-compressor's W*A16 presets), AWQ asymmetric (W*A16_ASYM);
lm_head stays dense.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from comptrust.compress.calibration import CalibrationSet
from comptrust.compress.checks import decoder_linears
from comptrust.logs import attach_loguru

if TYPE_CHECKING:
    from comptrust.compress.config import CompressionConfig


def _quiet_llmcompressor() -> None:
    # llm-compressor logs every module at INFO (and METRIC, level 38) to stdout through loguru; read at import
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")


def group_size_for(width: int, requested: int) -> int:
    """Largest group size dividing both the input width and the requested size (0 = per channel stays 0)."""
    return 0 if requested == 0 else math.gcd(width, requested)


def group_sizes(model: torch.nn.Module, requested: int) -> dict[str, int]:
    """Layer name -> group size actually used (0 = one scale per output row)."""
    return {name: group_size_for(mod.in_features, requested) for name, mod in decoder_linears(model).items()}


def by_width(model: torch.nn.Module, sizes: dict[str, int]) -> dict[str, int]:
    lin = decoder_linears(model)
    return {str(lin[n].in_features): g for n, g in sorted(sizes.items(), key=lambda kv: lin[kv[0]].in_features)}


def _config_groups(sizes: dict[str, int], bits: int, symmetric: bool, actorder: str | None = None) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups: dict[str, Any] = {}
    for g in sorted(set(sizes.values())):
        targets = sorted(n for n, s in sizes.items() if s == g)
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=symmetric,
            strategy="channel" if g == 0 else "group",
            group_size=None if g == 0 else g,
            actorder=actorder,
        )
        groups[f"group_{len(groups)}"] = QuantizationScheme(targets=targets, weights=args)
    return groups


def run_oneshot(model: Any, tokenizer: Any, recipe: Any, calib: CalibrationSet | None) -> str:
    """One llm-compressor oneshot in a fresh session; returns the recipe as YAML (for the record)."""
    _quiet_llmcompressor()
    from llmcompressor import oneshot
    from llmcompressor.core import create_session

    attach_loguru()  # llm-compressor's import removed every loguru sink: its lines go to the run's log again

    kwargs: dict[str, Any] = {}
    if calib is not None:
        import datasets

        ds = datasets.Dataset.from_dict(
            {"input_ids": calib.input_ids, "attention_mask": [[1] * len(x) for x in calib.input_ids]}
        )
        # our sampler already chose and ordered the samples (seeded); the library must not reshuffle them
        kwargs = dict(
            dataset=ds,
            num_calibration_samples=calib.n,
            max_seq_length=calib.seq_len,
            shuffle_calibration_samples=False,
            # batches already cut to equal lengths (calibration.batch_order): the truncating collator cuts nothing
            batch_size=calib.batch,
        )
    with create_session() as session:
        oneshot(model=model, processor=tokenizer, recipe=recipe, **kwargs)
        try:
            return session.get_serialized_recipe() or str(recipe)
        except Exception:  # the recipe record is informative only
            return str(recipe)


@contextmanager
def awq_cpu_workaround() -> Iterator[bool]:
    """Make llm-compressor 0.14's AWQ run without an accelerator. Yields whether the patch is active.

    Before each mapping's grid search, AWQ pins its cached activations in page-locked host memory
    (``IntermediatesCache.pin_memory``, called from ``AWQModifier._apply_smoothing``) to speed host->GPU
    copies. On a machine with no accelerator torch raises "Cannot access accelerator device when none is
    available". Pinning never changes values, so on CPU we skip it, for the duration of one oneshot only.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def quantize(model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
             run: Callable[..., str]) -> dict[str, Any]:
    """Quantize `model` in place with `run`, the method's llm-compressor call (compress/methods.py:
    run(model, tokenizer, cfg, calib, groups, info) -> recipe). Returns what to record: recipe, group sizes per
    layer and per width, timing."""
    _quiet_llmcompressor()
    assert cfg.bits is not None and cfg.group_size is not None
    sizes = group_sizes(model, cfg.group_size)
    groups = _config_groups(sizes, cfg.bits, cfg.symmetric, cfg.actorder)
    info: dict[str, Any] = {
        "scheme": {
            "type": "int",
            "bits": cfg.bits,
            "symmetric": cfg.symmetric,
            "strategy": "channel" if cfg.group_size == 0 else "group",
            "activations": "unquantized (A16)",
        },
        "group_size_requested": cfg.group_size,
        "group_size_by_width": by_width(model, sizes),
        "group_size_by_layer": sizes,
        "ignored": ["lm_head"],
    }
    t0 = time.time()
    info["recipe"] = run(model, tokenizer, cfg, calib, groups, info)
    info["library_time_s"] = round(time.time() - t0, 2)
    return info
