"""Dense copies of quantized checkpoints, for evaluation on the CPU.

A compressed-tensors checkpoint (packed int weights + scales) is the format vLLM and transformers serve, but
on the CPU transformers either dequantizes on every forward (compressed) or keeps quantization parameters
around after dequantizing; both ran slower than a plain dense model (dependency-trials.md §5: 130 and 136
tok/s vs 216 tok/s for a dense bf16 copy). So evaluation runs on a plain dense copy with the *same values*,
made once and cached under $COMPTRUST_HOME/models/evalcopy-<fingerprint>.

Pruned checkpoints are already plain dense safetensors and are returned unchanged.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from comptrust.errors import RuntimeFailure, UsageError
from comptrust.paths import models_cache

EVALCOPY_MARKER = "comptrust-evalcopy.json"
_QUANT_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight_global_scale")


def _quant_config(model_dir: Path) -> dict[str, Any] | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{model_dir}: cannot read config.json ({e})") from None
    q = cfg.get("quantization_config")
    return q if isinstance(q, dict) else None


def is_quantized_checkpoint(model_dir: Path) -> bool:
    q = _quant_config(model_dir)
    return bool(q and q.get("quant_method") == "compressed-tensors" and q.get("config_groups"))


def load_model(model_dir: Path, dtype: Any = "auto") -> Any:
    """Load any HF causal LM directory; compressed-tensors weights come back dequantized (dense values)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if is_quantized_checkpoint(model_dir):
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        # "You passed `quantization_config` ... the model already has one": intended, we only add dequantize
        warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)


def dense_copy(model_dir: Path, out: Path) -> None:
    """Write a plain (no quantization config, no scales) model with the dequantized values into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = load_model(model_dir)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(_QUANT_SUFFIXES)}
    dtype = next(iter(state.values())).dtype
    del model
    config = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeFailure(
            f"cannot make a dense copy of {model_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    plain.tie_weights()
    plain.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    for extra in ("comptrust.json", "generation_config.json"):
        if (model_dir / extra).is_file() and not (out / extra).exists():
            shutil.copy2(model_dir / extra, out / extra)


def evaluation_dir(model_dir: Path, fingerprint: str) -> Path:
    """The directory to evaluate: a cached dense copy for quantized checkpoints, else `model_dir` itself."""
    model_dir = Path(model_dir)
    if not is_quantized_checkpoint(model_dir):
        return model_dir
    dest = models_cache() / f"evalcopy-{fingerprint[:24]}"
    marker = dest / EVALCOPY_MARKER
    if marker.is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        dense_copy(model_dir, tmp)
        (tmp / EVALCOPY_MARKER).write_text(
            json.dumps({"source": str(model_dir.resolve()), "source_fingerprint": fingerprint}, indent=2)
        )
        if dest.exists() and not marker.is_file():  # left by a killed run: replace it
            shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:
            if not marker.is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same copy first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
