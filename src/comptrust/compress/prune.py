"""Weight pruning: magnitude (here, in torch), SparseGPT and Wanda (through llm-compressor).

Structures: "unstructured" prunes the requested fraction of each output row; "N:M" keeps at most N nonzero
weights in every M consecutive input weights of a row (2:4 and 4:8 are both 50%). llm-compressor's
``mask_structure`` counts the other way ("2:4" there means 2 *zeros* per 4), so we pass "(M-N):M".

Why magnitude is ours: llm-compressor's MagnitudePruningModifier runs through the data-free pipeline in
oneshot, its masks are never applied, and it prunes nothing without a word (dependency-trials.md §5). Five
lines of torch do it, and the measured-sparsity check in api.py would catch such a no-op anyway.
All pruned weights are saved dense (what evaluation loads); a 2:4 model also gets a sparse-24-bitmask copy in
sparse-2of4/, written by comptrust (compress/sparse24.py: compressed-tensors 0.19 no longer writes sparse formats,
and vLLM dropped the format in v0.19.1).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from comptrust.compress.calibration import CalibrationSet
from comptrust.compress.checks import decoder_linears
from comptrust.errors import UsageError

if TYPE_CHECKING:
    from comptrust.compress.config import CompressionConfig


def check_widths(model: torch.nn.Module, cfg: CompressionConfig) -> None:
    nm = cfg.nm
    if nm is None:
        return
    bad = {n: m.in_features for n, m in decoder_linears(model).items() if m.in_features % nm[1]}
    if bad:
        name, width = next(iter(bad.items()))
        raise UsageError(
            f"--structure {cfg.structure}: input width {width} of {name} is not a multiple of {nm[1]}"
        )


@torch.no_grad()
def magnitude_prune_(w: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> None:
    """Zero the smallest-|w| weights in place: per output row (unstructured) or per M-block of a row (N:M)."""
    rows, cols = w.shape
    if nm is None:
        k = int(round(sparsity * cols))
        if k == 0:
            return
        idx = torch.topk(w.abs(), k, dim=1, largest=False).indices
        w.scatter_(1, idx, 0.0)
    else:
        n, m = nm
        blocks = w.view(rows, cols // m, m)
        idx = torch.topk(blocks.abs(), m - n, dim=2, largest=False).indices
        blocks.scatter_(2, idx, 0.0)


def prune(model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
          run: Callable[..., str]) -> dict[str, Any]:
    """Prune `model` in place with `run`, the method's own step (compress/methods.py:
    run(model, tokenizer, cfg, calib, info) -> recipe). Returns what to record."""
    check_widths(model, cfg)
    assert cfg.sparsity is not None and cfg.structure is not None
    nm = cfg.nm
    info: dict[str, Any] = {
        "sparsity_target": cfg.sparsity,
        "structure": cfg.structure,
        "structure_meaning": (
            f"at most {nm[0]} nonzero weights in every {nm[1]} consecutive input weights of a row"
            if nm
            else "the requested fraction of each output row's weights is zero"
        ),
        "ignored": ["lm_head"],
        "saved_as": "dense safetensors (zeros stored explicitly)"
        + (", and compressed-tensors sparse-24-bitmask in sparse-2of4/" if nm == (2, 4) else ""),
    }
    t0 = time.time()
    info["recipe"] = run(model, tokenizer, cfg, calib, info)
    info["library_time_s"] = round(time.time() - t0, 2)
    return info
