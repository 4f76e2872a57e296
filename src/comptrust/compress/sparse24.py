"""A 2:4-pruned model in compressed-tensors' ``sparse-24-bitmask`` format (the layout of its Sparse24 compressor).

Written beside the dense checkpoint, in ``<checkpoint>/sparse-2of4/`` (config.json, tokenizer, one safetensors
file); comptrust itself keeps evaluating the dense copy in ``<checkpoint>/``. Per pruned Linear ``<name>``:

  * ``<name>.compressed``  the kept values, rows x (cols / 2), in the weight's dtype: per group of 4 consecutive
    inputs of a row, the 2 of largest magnitude, in column order
  * ``<name>.bitmask``     uint8, rows x ceil(cols / 8): where those values go (bit c % 8 of byte c // 8 of a row
    is set for a kept column c; numpy's little-endian packbits, compressed_tensors.utils.pack_bitmasks)
  * ``<name>.shape``       the dense shape, int64, as a column [[rows], [cols]]

and config.json's ``quantization_config`` is ``{quant_method: compressed-tensors, sparsity_config:
{format: sparse-24-bitmask, sparsity_structure: "2:4", ...}}``, built from compressed-tensors' own
Sparse24BitMaskConfig. Every other tensor (embeddings, norms, the head) is stored as is.

Why comptrust writes it itself: compressed-tensors 0.19 (the version llm-compressor 0.14 requires) still defines
the config but dropped the sparse compressors that wrote and read the tensors; the layout above is the one its
Sparse24BitMaskCompressor used. :func:`read_sparse24` reads it back with compressed-tensors' ``unpack_bitmasks``.
Who serves it: vLLM read it with 2:4 kernels from 0.7 and removed Sparse24 support in v0.19.1, so the [vllm]
extra's vLLM does not load it (README, "Compressing").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from comptrust.compress.checks import decoder_linears
from comptrust.errors import RuntimeFailure

SPARSE_DIR = "sparse-2of4"
FORMAT = "sparse-24-bitmask"
WEIGHTS_FILE = "model.safetensors"


def bytemask_24(w: torch.Tensor) -> torch.Tensor:
    """The positions kept per group of 4 inputs of a row: the 2 of largest |w| (a group with fewer than 2
    nonzeros keeps some zeros, which store as 0). Refuses a weight that is not 2:4 sparse."""
    rows, cols = w.shape
    if cols % 4:
        raise RuntimeFailure(f"2:4 sparse format: input width {cols} is not a multiple of 4")
    groups = w.reshape(rows, cols // 4, 4)
    if int(((groups != 0).sum(-1) > 2).sum()):
        raise RuntimeFailure("2:4 sparse format: a group of 4 weights has more than 2 nonzeros")
    idx = groups.abs().float().topk(2, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def compress_24(w: torch.Tensor) -> dict[str, torch.Tensor]:
    from compressed_tensors.utils import pack_bitmasks

    w = w.detach().cpu().contiguous()
    mask = bytemask_24(w)
    rows, cols = w.shape
    return {
        "compressed": w[mask].reshape(rows, cols // 2).contiguous(),
        "bitmask": pack_bitmasks(mask).contiguous(),
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
    }


def decompress_24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.utils import unpack_bitmasks

    dense_shape = [int(x) for x in shape.flatten().tolist()]
    mask = unpack_bitmasks(bitmask, dense_shape)
    out = torch.zeros(dense_shape, dtype=compressed.dtype)
    out[mask] = compressed.flatten()
    return out


def sparsity_config(global_sparsity: float) -> dict[str, Any]:
    from compressed_tensors.config import Sparse24BitMaskConfig

    cfg = Sparse24BitMaskConfig(global_sparsity=global_sparsity, sparsity_structure="2:4", targets=["Linear"],
                                ignore=["lm_head"])
    return cfg.model_dump()


def write_sparse24(model: torch.nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Write `model` (2:4-pruned decoder Linears) into `out` in the sparse-24-bitmask format; returns a record."""
    from importlib import metadata

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    linears = decoder_linears(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings: stored once, as save_pretrained does
    tensors: dict[str, torch.Tensor] = {}
    zeros = total = 0
    for name, t in state.items():
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and mod in linears:
            for part, val in compress_24(t).items():
                tensors[f"{mod}.{part}"] = val
            zeros += int((t == 0).sum())
            total += t.numel()
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": metadata.version("compressed-tensors"),
        "sparsity_config": sparsity_config(zeros / total if total else 0.0),
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    size = (out / WEIGHTS_FILE).stat().st_size
    return {"dir": SPARSE_DIR, "format": FORMAT, "layers": len(linears), "global_sparsity": zeros / total if total
            else 0.0, "weights_bytes": size, "note": "comptrust evaluates the dense checkpoint beside it; vLLM "
            "removed Sparse24 support in v0.19.1"}


def read_sparse24(d: Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a sparse-24-bitmask folder (every compressed Linear decompressed)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(d) / "config.json").read_text())
    fmt = (cfg.get("quantization_config") or {}).get("sparsity_config", {}).get("format")
    if fmt != FORMAT:
        raise RuntimeFailure(f"{d}: config.json names sparsity format {fmt!r}, not {FORMAT}")
    raw = load_file(str(Path(d) / WEIGHTS_FILE))
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith(".compressed"):
            mod = name.removesuffix(".compressed")
            out[f"{mod}.weight"] = decompress_24(t, raw[f"{mod}.bitmask"], raw[f"{mod}.shape"])
        elif not name.endswith((".bitmask", ".shape")):
            out[name] = t
    return out
