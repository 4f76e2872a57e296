"""Weight pruning: magnitude (here, in torch), SparseGPT and Wanda (through llm-compressor).

Structures: "unstructured" prunes the requested fraction of each output row; "N:M" keeps at most N nonzero
weights in every M consecutive input weights of a row (2:4 and 4:8 are both 50%). llm-compressor's
``mask_structure`` counts the other way ("2:4" there means 2 *zeros* per 4), so we pass "(M-N):M".

Why magnitude is ours: llm-compressor's MagnitudePruningModifier runs through the data-free pipeline in
oneshot, its masks are never applied, and it prunes nothing without a word (dependency-trials.md §5). Five
lines of torch do it, and the measured-sparsity check in api.py would catch such a no-op anyway.
All pruned weights are saved dense (compressed-tensors 0.19 no longer writes sparse formats).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from comptrust.compress.calibration import CalibrationSet
from comptrust.compress.checks import decoder_linears
from comptrust.compress.config import CompressionConfig
from comptrust.compress.quantize import _quiet_llmcompressor, run_oneshot
from comptrust.errors import RuntimeFailure, UsageError


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


def prune(model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None) -> dict[str, Any]:
    """Prune `model` in place. Returns what to record."""
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
        "saved_as": "dense safetensors (zeros stored explicitly)",
    }
    t0 = time.time()
    if cfg.method == "magnitude":
        for mod in decoder_linears(model).values():
            magnitude_prune_(mod.weight.data, cfg.sparsity, nm)
        info["recipe"] = f"comptrust magnitude pruning: smallest |w| per {'M-block' if nm else 'row'}"
    elif cfg.method in ("sparsegpt", "wanda"):
        _quiet_llmcompressor()
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        cls = SparseGPTModifier if cfg.method == "sparsegpt" else WandaPruningModifier
        mask = f"{nm[1] - nm[0]}:{nm[1]}" if nm else "0:0"
        # Target the decoder Linears by name: with targets=["Linear"], llm-compressor 0.14 names the head
        # "lm_head." when matching `ignore`, so ignore=["lm_head"] misses it and the head (and, when tied,
        # the input embeddings) get pruned too.
        targets = sorted(decoder_linears(model))
        recipe = cls(sparsity=cfg.sparsity, mask_structure=mask, targets=targets, ignore=["re:.*lm_head"])
        info["llmcompressor_mask_structure"] = mask
        info["recipe"] = run_oneshot(model, tokenizer, recipe, calib)
    else:  # pragma: no cover
        raise RuntimeFailure(f"{cfg.method} is not a pruning method")
    info["library_time_s"] = round(time.time() - t0, 2)
    return info
