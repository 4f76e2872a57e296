"""CompressionConfig: one validated, serialisable description of a compression run.

Unset settings stay ``None`` until validation fills the method's defaults, so "the user asked for a group
size with a pruning method" can be told apart from "the default applies" and refused. Every refusal is a
one-line message naming the bad value; :meth:`CompressionConfig.build` turns it into a UsageError (exit 2).
The resolved config is saved in ``comptrust.json`` beside the weights and reloads with ``model_validate``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from comptrust.compress.methods import REGISTRY, Quantization, method
from comptrust.errors import UsageError

# derived from the method registry (compress/methods.py): a new method is its class there, nothing here
METHODS = tuple(REGISTRY)
QUANT_METHODS = tuple(n for n, m in REGISTRY.items() if m.family == "quantization")
PRUNE_METHODS = tuple(n for n, m in REGISTRY.items() if m.family == "pruning")
DATA_FREE = tuple(n for n, m in REGISTRY.items() if not m.needs_calibration)  # no calibration data

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128
DEFAULT_SPARSITY = 0.5
DEFAULT_N_CALIB = 128
DEFAULT_SEQ_LEN = 512
# AWQ searches n_grid scale exponents per mapping (llm-compressor's default: 20). On the 2-core CPU, for the
# embedded 135M model at W4 with 128 calibration samples, grid 20 took 862 s and grid 10 559 s; held-out
# perplexity 33.1 vs 35.0 (bench/results/compress_table.md). 10 is the affordable default; --awq-grid 20 for
# the library's setting.
DEFAULT_AWQ_GRID = 10
# Calibration samples per forward (compress/calibration.py, "Batching"). llm-compressor's default is 1; on the
# 2-core CPU (embedded model, whole compress call) GPTQ W4 164 s -> 101 s, AWQ W4 428 s -> 252 s, SparseGPT 2:4 142 s ->
# 119 s at 1 -> 16; held-out perplexity 37.5 -> 36.0, 35.0 -> 35.3, 126 -> 135
# (bench/results/calib_batch.md); the built-in set keeps 95.7% of its tokens at 16.
DEFAULT_CALIB_BATCH = 16

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_structure(structure: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M), meaning at most N nonzero weights in every M consecutive inputs."""
    if structure == "unstructured":
        return None
    m = _NM.match(structure)
    if not m:
        raise ValueError(f"--structure {structure!r}: use 'unstructured' or N:M such as 2:4 or 4:8")
    n, mm = int(m.group(1)), int(m.group(2))
    if n < 1 or n >= mm:
        raise ValueError(
            f"--structure {structure}: N:M keeps N nonzero weights in every M, so it needs 1 <= N < M"
        )
    return n, mm


class CompressionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    method: str  # a name in METHODS (the registry), checked by _known_method
    bits: int | None = None  # quantization: 2..8 (default 4)
    group_size: int | None = None  # quantization: weights per scale (default 128; 0 = one scale per output row)
    sparsity: float | None = None  # pruning: fraction of zeros, in (0, 1) (default 0.5; implied by N:M)
    structure: str | None = None  # pruning: "unstructured" (default) or "N:M"
    calibration: str | None = None  # None/"default": the built-in set; a file; or a Hub dataset id
    n_calib: int | None = None  # calibration samples (default 128)
    seq_len: int | None = None  # max tokens per calibration sample (default 512)
    calib_batch: int | None = None  # calibration samples per forward (default DEFAULT_CALIB_BATCH)
    seed: int = 0
    awq_grid: int | None = None  # AWQ grid points per mapping (default DEFAULT_AWQ_GRID)
    # GPTQ activation ordering (llm-compressor's actorder): quantize columns in order of decreasing activation
    # size. "group" is AutoGPTQ's desc_act (what the paper used); "weight" keeps groups contiguous. Default: off.
    actorder: Literal["group", "weight"] | None = None
    # method "recipe": an llm-compressor recipe file (compress/recipe.py); its content's sha256 is filled here and,
    # when given (a stored config), must still match the file
    recipe: str | None = None
    recipe_sha256: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"--method {v!r}: choose one of {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "CompressionConfig":
        m = self.method
        if m == "recipe" or self.recipe is not None or self.recipe_sha256 is not None:
            return self._check_recipe()
        fixed = method(m)
        fixed_bits = fixed.fixed_bits if isinstance(fixed, Quantization) else None
        if fixed_bits is not None:  # a preset scheme (W8A8, FP8_DYNAMIC): 8 bits, one scale per output channel
            if self.bits not in (None, fixed_bits):
                raise ValueError(f"--bits {self.bits} makes no sense with {m}, which is {fixed_bits}-bit by definition")
            if self.group_size not in (None, 0):
                raise ValueError(f"--group-size {self.group_size} makes no sense with {m}, whose weights have one "
                                 "scale per output channel")
            self.bits, self.group_size = fixed_bits, 0
        if m in QUANT_METHODS:
            if self.sparsity is not None:
                raise ValueError(f"--sparsity {self.sparsity} makes no sense with {m}, a quantization method")
            if self.structure is not None:
                raise ValueError(f"--structure {self.structure} makes no sense with {m}, a quantization method")
            if self.bits is None:
                self.bits = DEFAULT_BITS
            if not 2 <= self.bits <= 8:
                raise ValueError(f"--bits {self.bits} is outside 2..8")
            if self.group_size is None:
                self.group_size = DEFAULT_GROUP_SIZE
            if self.group_size < 0:
                raise ValueError(f"--group-size {self.group_size} must be >= 1 (or 0 for one scale per row)")
        else:
            if self.bits is not None:
                raise ValueError(f"--bits {self.bits} makes no sense with {m}, a pruning method")
            if self.group_size is not None:
                raise ValueError(f"--group-size {self.group_size} makes no sense with {m}, a pruning method")
            if self.structure is None:
                self.structure = "unstructured"
            self.structure = self.structure.strip().lower()
            nm = parse_structure(self.structure)
            if nm is not None:
                self.structure = f"{nm[0]}:{nm[1]}"
                implied = 1 - nm[0] / nm[1]
                if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                    raise ValueError(
                        f"--sparsity {self.sparsity} contradicts --structure {self.structure}, "
                        f"which fixes sparsity at {implied:g}; drop --sparsity"
                    )
                self.sparsity = implied
            if self.sparsity is None:
                self.sparsity = DEFAULT_SPARSITY
            if not 0 < self.sparsity < 1:
                raise ValueError(f"--sparsity {self.sparsity} is outside (0, 1)")
        if self.actorder is not None and m != "gptq":
            raise ValueError(f"--actorder {self.actorder} makes no sense with {m}; it only applies to gptq")
        if self.awq_grid is not None and m != "awq":
            raise ValueError(f"--awq-grid {self.awq_grid} makes no sense with {m}; it only applies to awq")
        if m == "awq":
            if self.awq_grid is None:
                self.awq_grid = DEFAULT_AWQ_GRID
            if self.awq_grid < 1:
                raise ValueError(f"--awq-grid {self.awq_grid} must be >= 1")
        if m in DATA_FREE:
            for name, val in (("calibration", self.calibration), ("n-calib", self.n_calib), ("seq-len", self.seq_len),
                              ("calib-batch", self.calib_batch)):
                if val is not None:
                    raise ValueError(f"--{name} {val} makes no sense with {m}, which uses no calibration data")
        else:
            self._calibration_sizes()
        return self

    def _check_recipe(self) -> "CompressionConfig":
        from comptrust.compress.recipe import load_recipe

        if self.method != "recipe":
            raise ValueError(f"--recipe makes no sense with --method {self.method}; give the recipe alone "
                             "(it says what to run)")
        if self.recipe is None:
            raise ValueError("method recipe needs --recipe FILE (an llm-compressor recipe)")
        for name, val in (("awq-grid", self.awq_grid), ("actorder", self.actorder)):
            if val is not None:
                raise ValueError(f"--{name} {val} makes no sense with --recipe; set it in the recipe")
        try:
            info = load_recipe(self.recipe)
        except UsageError as e:
            raise ValueError(str(e)) from None
        if self.recipe_sha256 is not None and self.recipe_sha256 != info.sha256:
            raise ValueError(f"--recipe {self.recipe} changed: its content's sha256 is {info.sha256[:12]}, "
                             f"not {self.recipe_sha256[:12]} as recorded")
        self.recipe_sha256 = info.sha256
        # what the recipe states; the same value given again (a stored config) is accepted, another refused
        for name, derived in (("bits", info.bits), ("group_size", info.group_size), ("sparsity", info.sparsity),
                              ("structure", info.structure)):
            given = getattr(self, name)
            if given is not None and given != derived:
                raise ValueError(f"--{name.replace('_', '-')} {given} makes no sense with --recipe "
                                 f"{self.recipe}; the recipe says what to run"
                                 + (f" ({name} {derived})" if derived is not None else ""))
            setattr(self, name, derived)
        self._calibration_sizes()
        return self

    def _calibration_sizes(self) -> None:
        """The calibration set's size for a method that reads one: defaults filled in, then checked."""
        if self.n_calib is None:
            self.n_calib = DEFAULT_N_CALIB
        if self.seq_len is None:
            self.seq_len = DEFAULT_SEQ_LEN
        if self.calib_batch is None:
            self.calib_batch = DEFAULT_CALIB_BATCH
        if self.calib_batch < 1:
            raise ValueError(f"--calib-batch {self.calib_batch} must be >= 1")
        if self.n_calib < 1:
            raise ValueError(f"--n-calib {self.n_calib} must be >= 1")
        if self.seq_len < 8:
            raise ValueError(f"--seq-len {self.seq_len} must be >= 8")

    # -- derived -----------------------------------------------------------------------------------------------
    @property
    def is_quantization(self) -> bool:
        return method(self.method).family == "quantization"

    @property
    def needs_calibration(self) -> bool:
        return method(self.method).needs_calibration

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.structure is None else parse_structure(self.structure)

    @property
    def symmetric(self) -> bool:
        # AWQ is defined with asymmetric (zero-point) groups; GPTQ and RTN use llm-compressor's symmetric presets
        m = method(self.method)
        return m.symmetric if isinstance(m, Quantization) else True

    def label(self) -> str:
        if self.method == "recipe":
            return f"recipe-{(self.recipe_sha256 or '')[:12]}"
        m = method(self.method)
        if isinstance(m, Quantization) and m.fixed_bits is not None:
            return self.method
        if self.is_quantization:
            g = "ch" if self.group_size == 0 else f"g{self.group_size}"
            return f"{self.method}-w{self.bits}-{g}"
        return f"{self.method}-{self.structure if self.nm else f'{self.sparsity:g}'}"

    @classmethod
    def build(cls, **kwargs: Any) -> "CompressionConfig":
        """Validate, turning the first problem into a one-line UsageError."""
        try:
            return cls(**kwargs)
        except ValidationError as e:
            err = e.errors()[0]
            msg = str(err.get("msg", e))
            msg = msg.removeprefix("Value error, ")
            loc = ".".join(str(x) for x in err.get("loc", ()))
            if err.get("type") not in ("value_error",) and loc:
                bad = err.get("input")
                msg = f"--{loc.replace('_', '-')} {bad!r}: {msg}"
            raise UsageError(msg) from None
