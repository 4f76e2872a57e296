"""Measured proof that a compressed model is what it claims to be.

Run on the *saved and reloaded* checkpoint (quantized weights dequantized), so the numbers describe what
users get, not what was in memory before saving:
  - sparsity: exact zeros per pruned Linear weight and in total (a pruning method that silently did nothing,
    like llm-compressor's MagnitudePruningModifier in oneshot, shows up as ~0)
  - N:M validity: every run of M consecutive input weights of a row has at most N nonzeros
  - levels: distinct dequantized values per quantization group (at most 2^bits)
  - perplexity on a fixed held-out text (data/heldout.txt, written for comptrust) before and after
  - finiteness: NaN/inf anywhere refuses the save
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from comptrust.errors import RuntimeFailure

HELDOUT_FILE = Path(__file__).parent / "data" / "heldout.txt"
PPL_MAX_TOKENS = 1024


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers compression targets: every Linear except the output head (which stays dense)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head") and name != "lm_head"
    }


def _weight(mod: torch.nn.Module) -> torch.Tensor:
    w = getattr(mod, "weight", None)
    if w is None:
        raise RuntimeFailure(f"{type(mod).__name__} has no dense weight; reload the checkpoint decompressed")
    return w.detach()


def assert_finite(model: torch.nn.Module) -> None:
    """Refuse NaN/inf in any parameter or buffer (weights, scales, zero points)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if t.element_size() == 1:  # float8 (fp8-dynamic's weights): torch has no isfinite for it; check as float
            t = t.float()
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise RuntimeFailure(f"compressed weights contain NaN or inf ({bad} values in {name}); refusing to save")


def sparsity(model: torch.nn.Module) -> dict[str, Any]:
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for name, mod in decoder_linears(model).items():
        w = _weight(mod)
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros += z
        total += w.numel()
    vals = list(per_layer.values())
    return {
        "total": zeros / total if total else 0.0,
        "min_layer": min(vals) if vals else 0.0,
        "max_layer": max(vals) if vals else 0.0,
        "n_weights": total,
        "per_layer": per_layer,
    }


def nm_pattern(model: torch.nn.Module, n: int, m: int) -> dict[str, Any]:
    """Count groups of M consecutive inputs per output row with more than N nonzeros (violations)."""
    groups = bad = 0
    bad_layers: list[str] = []
    for name, mod in decoder_linears(model).items():
        w = _weight(mod)
        if w.shape[1] % m:
            bad_layers.append(name)
            continue
        nnz = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        groups += nnz.numel()
        b = int((nnz > n).sum())
        bad += b
        if b:
            bad_layers.append(name)
    return {
        "structure": f"{n}:{m}",
        "groups": groups,
        "violations": bad,
        "valid": bad == 0 and not bad_layers,
        "layers_with_violations": bad_layers[:20],
    }


def dense_parts_digest(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of the weights compression must leave alone: input embeddings and the output head."""
    out: dict[str, str] = {}
    for label, mod in (("embed_tokens", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        w = getattr(mod, "weight", None)
        if w is not None:
            t = w.detach().contiguous().float().cpu()
            out[label] = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    return out


def _levels_per_group(w: torch.Tensor, group: int) -> torch.Tensor:
    """Distinct values in each group of `group` consecutive inputs of each row (vectorised: sort, count steps)."""
    g = w.reshape(-1, group).float()
    s, _ = torch.sort(g, dim=1)
    return (s[:, 1:] != s[:, :-1]).sum(1) + 1


def levels(model: torch.nn.Module, group_by_layer: dict[str, int]) -> dict[str, Any]:
    """group_by_layer: layer name -> group size used (the row length for per-channel)."""
    per_layer: dict[str, int] = {}
    mean_sum = n_groups = 0.0
    for name, mod in decoder_linears(model).items():
        if name not in group_by_layer:
            continue
        w = _weight(mod)
        g = group_by_layer[name] or w.shape[1]
        lv = _levels_per_group(w, g)
        per_layer[name] = int(lv.max())
        mean_sum += float(lv.sum())
        n_groups += lv.numel()
    return {
        "max": max(per_layer.values()) if per_layer else 0,
        "mean": mean_sum / n_groups if n_groups else 0.0,
        "n_groups": int(n_groups),
        "per_layer_max": per_layer,
    }


def heldout_text() -> str:
    return HELDOUT_FILE.read_text(encoding="utf-8")


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, text: str | None = None, max_tokens: int = PPL_MAX_TOKENS) -> dict[str, Any]:
    text = heldout_text() if text is None else text
    limit = min(max_tokens, getattr(model.config, "max_position_embeddings", max_tokens) or max_tokens)
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
    model.eval()
    out = model(input_ids=ids, labels=ids)
    loss = float(out.loss)
    return {
        "ppl": math.exp(loss) if loss < 700 else float("inf"),
        "tokens": int(ids.shape[1]),
        "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
    }


@torch.no_grad()
def sample_generation(model: Any, tokenizer: Any, prompt: str = "What is the capital of France?", max_new_tokens: int = 24) -> str:
    """A short greedy generation: proof that the reloaded checkpoint runs end to end."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
