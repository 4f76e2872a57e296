"""The compression method registry: one class per method, declaring everything the rest of comptrust asks of it.

Why: adding a method used to touch a dozen ``if cfg.method == ...`` / ``is_quantization`` branches in seven
files (validation, the compress pipeline, saving, checks, the study's names and bits). Now each method is one
class here, and callers ask the registry:

  * ``family``             quantization | pruning (what the checks measure, how the output is saved)
  * ``needs_calibration``  whether it reads calibration data (rtn and magnitude do not)
  * ``nominal_bits(cfg)``  bits per weight for ordering by compression (b; 16 x (1 - sparsity) for pruning)
  * ``auto_name(cfg)``     the study's default variant name (gptq-w4, wanda-2of4, magnitude-50pct)
  * ``apply(...)``         compress a loaded model in place; returns what to record
  * ``save`` / ``checkpoint_format`` / ``served_as``: how the output is written and served (weights the engine
    loads, vs a GGUF that llama.cpp serves: the ``gguf`` study method, see comptrust.compress.gguf)
  * ``measure`` / ``verify``: the checks that prove the checkpoint is what it claims

llm-compressor stays behind quantize.py and prune.py (one module per library call, since its import paths move).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from comptrust.errors import RuntimeFailure

if TYPE_CHECKING:
    from comptrust.compress.calibration import CalibrationSet
    from comptrust.compress.config import CompressionConfig


class Method:
    """Base class of a compression method (registered by its ``name`` in :data:`REGISTRY`)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # "quantization" | "pruning"
    needs_calibration: ClassVar[bool] = True
    served_as: ClassVar[str] = "weights"  # loaded by the engine (hf / vllm); "gguf": served by llama.cpp
    checkpoint_format: ClassVar[str] = ""
    keeps_recipe: ClassVar[bool] = True  # writes llm-compressor's recipe.yaml beside the weights

    def nominal_bits(self, cfg: CompressionConfig) -> float:
        raise NotImplementedError

    def auto_name(self, cfg: CompressionConfig) -> str:
        raise NotImplementedError

    def apply(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None) -> dict[str, Any]:
        """Compress `model` in place; returns what to record (recipe, group sizes, timing, ...)."""
        raise NotImplementedError

    def save(self, model: Any, tokenizer: Any, out: Path, cfg: CompressionConfig) -> dict[str, Any]:
        """Write the checkpoint the engine loads (the tokenizer is saved beside it by the caller); returns what
        to record about extra copies (e.g. a 2:4 sparse one)."""
        model.save_pretrained(str(out))
        return {}

    def measure(self, reloaded: Any, cfg: CompressionConfig, info: dict[str, Any]) -> dict[str, Any]:
        """Family-specific checks on the reloaded checkpoint (sparsity and perplexity are measured for all)."""
        return {}

    def verify(self, cfg: CompressionConfig, measured: dict[str, Any]) -> None:
        """Refuse a checkpoint that is not what it claims (RuntimeFailure naming the method)."""


class Quantization(Method):
    family = "quantization"
    checkpoint_format = "compressed-tensors (pack-quantized)"
    symmetric: ClassVar[bool] = True  # llm-compressor's symmetric W*A16 presets; AWQ is asymmetric
    # a preset scheme with fixed bits and one scale per output channel (W8A8, FP8_DYNAMIC); None: --bits applies
    fixed_bits: ClassVar[int | None] = None

    def nominal_bits(self, cfg: CompressionConfig) -> float:
        return float(cfg.bits or 16)

    def auto_name(self, cfg: CompressionConfig) -> str:
        g = "" if cfg.group_size == 128 else ("-ch" if cfg.group_size == 0 else f"-g{cfg.group_size}")
        return f"{self.name}-w{cfg.bits}{g}"

    def apply(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None) -> dict[str, Any]:
        from comptrust.compress.quantize import quantize

        return quantize(model, tokenizer, cfg, calib, self.run)

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            groups: dict[str, Any], info: dict[str, Any]) -> str:
        """The llm-compressor call of this method on prepared quantization groups; returns the recipe."""
        raise NotImplementedError

    def save(self, model: Any, tokenizer: Any, out: Path, cfg: CompressionConfig) -> dict[str, Any]:
        model.save_pretrained(str(out), save_compressed=True)
        return {}

    def measure(self, reloaded: Any, cfg: CompressionConfig, info: dict[str, Any]) -> dict[str, Any]:
        from comptrust.compress import checks

        return {"levels": checks.levels(reloaded, info["group_size_by_layer"])}

    def verify(self, cfg: CompressionConfig, measured: dict[str, Any]) -> None:
        lv = measured["levels"]
        if lv["max"] > 2 ** (cfg.bits or 8):
            raise RuntimeFailure(
                f"{cfg.method}: up to {lv['max']} distinct values per group, more than 2^{cfg.bits}; "
                "the checkpoint is not quantized as requested"
            )


class GPTQ(Quantization):
    name = "gptq"

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            groups: dict[str, Any], info: dict[str, Any]) -> str:
        from llmcompressor.modifiers.gptq import GPTQModifier

        from comptrust.compress.quantize import run_oneshot

        return run_oneshot(model, tokenizer, GPTQModifier(config_groups=groups, ignore=["lm_head"]), calib)


class RTN(Quantization):
    name = "rtn"
    needs_calibration = False

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            groups: dict[str, Any], info: dict[str, Any]) -> str:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from comptrust.compress.quantize import run_oneshot

        return run_oneshot(model, tokenizer, QuantizationModifier(config_groups=groups, ignore=["lm_head"]), None)


class AWQ(Quantization):
    name = "awq"
    symmetric = False  # AWQ is defined with asymmetric (zero-point) groups

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            groups: dict[str, Any], info: dict[str, Any]) -> str:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        from comptrust.compress.quantize import awq_cpu_workaround, run_oneshot

        assert cfg.awq_grid is not None  # validation fills awq's default
        recipe = [AWQModifier(n_grid=cfg.awq_grid), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
        with awq_cpu_workaround() as patched:
            out = run_oneshot(model, tokenizer, recipe, calib)
        info["awq"] = {"n_grid": cfg.awq_grid, "cpu_pin_memory_workaround": patched}
        return out


class _PresetScheme(Quantization):
    """llm-compressor's preset schemes beyond weight-only: 8-bit weights (one scale per output channel) and 8-bit
    activations quantized dynamically per token at inference (vLLM's W8A8 INT8 / FP8 kernels).

    deviation: comptrust evaluates on the CPU through the same dense copy as the weight-only methods
    (models/evalcopy.py): the weights carry the quantized values, but the activations are NOT quantized there,
    so scores measure the weight quantization (and, for gptq-w8a8, SmoothQuant's rescaling), not the activation
    rounding that a W8A8/FP8 kernel adds when served."""

    fixed_bits = 8
    scheme: ClassVar[str] = ""  # compressed-tensors preset name
    weight_type: ClassVar[str] = "int"

    def auto_name(self, cfg: CompressionConfig) -> str:
        return self.name

    def scheme_record(self) -> dict[str, Any]:
        return {"type": self.weight_type, "bits": 8, "symmetric": True, "strategy": "channel", "preset": self.scheme,
                "activations": f"{self.weight_type}8, dynamic per token when served; not quantized in comptrust's "
                               "CPU evaluation (deviation)"}


class GPTQW8A8(_PresetScheme):
    name = "gptq-w8a8"
    checkpoint_format = "compressed-tensors (int-quantized, W8A8)"
    scheme = "W8A8"
    smoothing_strength: ClassVar[float] = 0.8  # llm-compressor's W8A8 example

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            groups: dict[str, Any], info: dict[str, Any]) -> str:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        from comptrust.compress.quantize import run_oneshot

        info["scheme"] = self.scheme_record()
        info["smoothquant"] = {"smoothing_strength": self.smoothing_strength}
        recipe = [SmoothQuantModifier(smoothing_strength=self.smoothing_strength),
                  GPTQModifier(scheme=self.scheme, targets=["Linear"], ignore=["lm_head"])]
        return run_oneshot(model, tokenizer, recipe, calib)


class FP8Dynamic(_PresetScheme):
    name = "fp8-dynamic"
    checkpoint_format = "compressed-tensors (float-quantized, FP8_DYNAMIC)"
    needs_calibration = False  # weight scales from min/max; activation scales computed at inference
    scheme = "FP8_DYNAMIC"
    weight_type = "float"

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            groups: dict[str, Any], info: dict[str, Any]) -> str:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from comptrust.compress.quantize import run_oneshot

        info["scheme"] = self.scheme_record()
        return run_oneshot(model, tokenizer, QuantizationModifier(scheme=self.scheme, targets=["Linear"],
                                                                  ignore=["lm_head"]), None)


class Pruning(Method):
    family = "pruning"
    checkpoint_format = "dense safetensors"

    def nominal_bits(self, cfg: CompressionConfig) -> float:
        """16 x (1 - sparsity): what a sparse format could save, not what a dense save does."""
        return 16.0 * (1 - (cfg.sparsity or 0.0))

    def auto_name(self, cfg: CompressionConfig) -> str:
        if cfg.nm:
            return f"{self.name}-{cfg.nm[0]}of{cfg.nm[1]}"
        return f"{self.name}-{round(100 * (cfg.sparsity or 0))}pct"

    def apply(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None) -> dict[str, Any]:
        from comptrust.compress.prune import prune

        return prune(model, tokenizer, cfg, calib, self.run)

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            info: dict[str, Any]) -> str:
        """Prune in place; returns the recipe (or a description of what ran)."""
        raise NotImplementedError

    def measure(self, reloaded: Any, cfg: CompressionConfig, info: dict[str, Any]) -> dict[str, Any]:
        from comptrust.compress import checks

        return {"nm": checks.nm_pattern(reloaded, *cfg.nm)} if cfg.nm is not None else {}

    def verify(self, cfg: CompressionConfig, measured: dict[str, Any]) -> None:
        verify_sparsity(cfg, measured)

    def save(self, model: Any, tokenizer: Any, out: Path, cfg: CompressionConfig) -> dict[str, Any]:
        """Dense safetensors (what evaluation loads); a 2:4 model also gets a compressed-tensors sparse-24-bitmask
        copy in out/sparse-2of4 (compress/sparse24.py; what reads it is said there)."""
        model.save_pretrained(str(out))
        if cfg.nm == (2, 4):
            from comptrust.compress.sparse24 import SPARSE_DIR, write_sparse24

            return {"sparse_2of4": write_sparse24(model, tokenizer, out / SPARSE_DIR)}
        return {}


def verify_sparsity(cfg: CompressionConfig, measured: dict[str, Any]) -> None:
    """Refuse a pruned checkpoint whose measured sparsity or N:M pattern falls short of what it claims."""
    sp = measured["sparsity"]
    target = cfg.sparsity or 0.0
    if sp["min_layer"] < target - LAYER_SLACK or sp["total"] < target - TOTAL_SLACK:
        worst = min(sp["per_layer"], key=sp["per_layer"].get)
        raise RuntimeFailure(
            f"{cfg.method}: measured sparsity {sp['per_layer'][worst]:.4f} in {worst} is below the requested "
            f"{target:g} (total {sp['total']:.4f}); the pruning did not take effect"
        )
    nm = measured.get("nm")
    if nm is not None and not nm["valid"]:
        raise RuntimeFailure(
            f"{cfg.method}: {nm['violations']} groups violate {nm['structure']} "
            f"(e.g. in {', '.join(nm['layers_with_violations'][:2])})"
        )


# allowed shortfall of measured sparsity below the target (rounding per row / per block in the libraries);
# a pruning step that did not happen (measured ~0) is far outside it
LAYER_SLACK = 0.01
TOTAL_SLACK = 0.005


class Magnitude(Pruning):
    name = "magnitude"
    needs_calibration = False
    keeps_recipe = False  # ours, in torch: no llm-compressor recipe to keep

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            info: dict[str, Any]) -> str:
        from comptrust.compress.checks import decoder_linears
        from comptrust.compress.prune import magnitude_prune_

        nm = cfg.nm
        assert cfg.sparsity is not None
        for mod in decoder_linears(model).values():
            magnitude_prune_(mod.weight.data, cfg.sparsity, nm)
        return f"comptrust magnitude pruning: smallest |w| per {'M-block' if nm else 'row'}"


class _LLMCompressorPruning(Pruning):
    modifier: ClassVar[str] = ""  # class name in llmcompressor.modifiers.pruning

    def run(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None,
            info: dict[str, Any]) -> str:
        from comptrust.compress.checks import decoder_linears
        from comptrust.compress.quantize import _quiet_llmcompressor, run_oneshot

        _quiet_llmcompressor()
        import llmcompressor.modifiers.pruning as pruning

        nm = cfg.nm
        mask = f"{nm[1] - nm[0]}:{nm[1]}" if nm else "0:0"
        # Target the decoder Linears by name: with targets=["Linear"], llm-compressor 0.14 names the head
        # "lm_head." when matching `ignore`, so ignore=["lm_head"] misses it and the head (and, when tied,
        # the input embeddings) get pruned too.
        targets = sorted(decoder_linears(model))
        recipe = getattr(pruning, self.modifier)(sparsity=cfg.sparsity, mask_structure=mask, targets=targets,
                                                 ignore=["re:.*lm_head"])
        info["llmcompressor_mask_structure"] = mask
        return run_oneshot(model, tokenizer, recipe, calib)


class SparseGPT(_LLMCompressorPruning):
    name = "sparsegpt"
    modifier = "SparseGPTModifier"


class Wanda(_LLMCompressorPruning):
    name = "wanda"
    modifier = "WandaPruningModifier"


class RecipeMethod(Method):
    """An llm-compressor recipe file (compress/recipe.py): validated before any model loads, known by its content.

    Whatever the recipe states (quantization and/or pruning) runs in one oneshot, always with calibration data
    (a data-free recipe ignores it). The checks that do not depend on knowing the scheme per layer apply: finite,
    head and embeddings untouched, perplexity; the stated sparsity and N:M structure are verified too."""

    name = "recipe"
    family = "recipe"
    checkpoint_format = "compressed-tensors (as the recipe states)"

    def nominal_bits(self, cfg: CompressionConfig) -> float:
        """The stated weight bits, else 16 x (1 - stated sparsity), else 16 (unknown: ordered with dense)."""
        if cfg.bits:
            return float(cfg.bits)
        return 16.0 * (1 - (cfg.sparsity or 0.0))

    def auto_name(self, cfg: CompressionConfig) -> str:
        import re

        stem = re.sub(r"[^a-z0-9._-]+", "-", Path(cfg.recipe or "recipe").stem.lower()).strip("-.") or "file"
        return f"recipe-{stem}"

    def apply(self, model: Any, tokenizer: Any, cfg: CompressionConfig, calib: CalibrationSet | None) -> dict[str, Any]:
        import time

        from comptrust.compress.quantize import run_oneshot
        from comptrust.compress.recipe import load_recipe

        info: dict[str, Any] = {"recipe_file": cfg.recipe, "recipe_sha256": cfg.recipe_sha256}
        rec = load_recipe(cfg.recipe or "")
        if rec.sha256 != cfg.recipe_sha256:
            raise RuntimeFailure(f"recipe {cfg.recipe} changed while compressing (sha256 {rec.sha256[:12]})")
        info["recipe_modifiers"] = rec.modifiers
        info["recipe_states"] = {"bits": rec.bits, "group_size": rec.group_size, "sparsity": rec.sparsity,
                                 "structure": rec.structure}
        if rec.structure and rec.structure != "unstructured":
            from comptrust.compress.prune import check_widths

            check_widths(model, cfg)
        t0 = time.time()
        info["recipe"] = run_oneshot(model, tokenizer, rec.text, calib)
        info["library_time_s"] = round(time.time() - t0, 2)
        info["ignored"] = ["lm_head"]
        return info

    def save(self, model: Any, tokenizer: Any, out: Path, cfg: CompressionConfig) -> dict[str, Any]:
        model.save_pretrained(str(out), save_compressed=True)
        return {}

    def measure(self, reloaded: Any, cfg: CompressionConfig, info: dict[str, Any]) -> dict[str, Any]:
        from comptrust.compress import checks

        return {"nm": checks.nm_pattern(reloaded, *cfg.nm)} if cfg.nm is not None else {}

    def verify(self, cfg: CompressionConfig, measured: dict[str, Any]) -> None:
        if cfg.sparsity is not None:
            verify_sparsity(cfg, measured)


# name -> method, in the order the CLI lists them (quantization first)
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (GPTQ(), AWQ(), RTN(), GPTQW8A8(), FP8Dynamic(), Magnitude(), SparseGPT(), Wanda(), RecipeMethod())
}


def method(name: str) -> Method:
    """The registered method `name` (config validation has already refused unknown names)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise RuntimeFailure(f"{name} is not a registered compression method") from None
