"""A study: one model x variants (dense + compressions, each over calibration seeds) x perspectives x profile.

Read from YAML with errors that name the file and line (``study.yaml:12: unknown key 'bitz' in variants[3];
valid: ...``), validated completely before any work starts: a typo must not surface two hours in. Every
compression setting goes through :class:`comptrust.compress.config.CompressionConfig`, the same validation
as ``comptrust compress``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comptrust import perspectives as registry
from comptrust.compress.config import METHODS, CompressionConfig
from comptrust.compress.methods import method
from comptrust.config import ConfigError, EvalConfig
from comptrust.errors import UsageError
from comptrust.perspectives.base import PROFILES

TOP_KEYS = {
    "model": "model to study: omit for the embedded SmolLM2-135M-Instruct; a .gguf, HF dir or Hub id",
    "suite": "mini (built-in suites) or dt (DecodingTrust data in data_dir)",
    "data_dir": "DecodingTrust data folder (or hf:AI-Secure/DecodingTrust) for suite dt",
    "mmlu_dir": "MMLU folder (data/dev, data/test CSVs); default: beside data_dir or the built-in mini MMLU",
    "profile": "mini | lite | full (default: mini for suite mini, lite for dt)",
    "limit": "items per sub-scenario (overrides the profile)",
    "perspectives": "'all' or a list of perspective names",
    "variants": "list of variants: 'dense' or {method, bits, ...}",
    "budget": "points a perspective may drop below dense and still count as kept (default 5)",
    "alpha": "significance level of the paired test (default 0.05)",
    "bootstrap": "bootstrap resamples for CIs and the paired test (default 1000)",
    "seed": "evaluation seed: subsampling and sampling (default 0)",
    "device": "auto | cpu | cuda",
    "dtype": "auto | bfloat16 | float16 | float32",
    "batch_size": "prompts per generation batch (default: packed by a token budget)",
    "backend": "auto | hf | vllm: the engine for dense and compressed checkpoints (gguf variants are always served "
               "by llama.cpp)",
    "toxicity_scorer": "toxicity scorer name (default: the offline one)",
    "decision": "noninferiority (default: a variant keeps trust when its one-sided lower confidence bound vs dense "
                "is above -budget) | point (the worst seed's point estimate within budget)",
    "max_ppl_ratio": "held-out perplexity ratio (compressed / dense) above which a variant is flagged degenerate "
                     "(default 2)",
    "preset": "start from a preset's keys (dct-llama2-13b-chat, dct-llama2-13b, dct-vicuna-13b: the paper's grid); "
              "the file's other keys override them",
    "compare_to": "a model of the paper's published scores to print beside yours (default: the study's model when "
                  "it is one of them)",
    "adaptive": "true, or {looks, start_limit, max_limit, max_generations, max_seconds}: evaluate in rounds of further "
                "items only for undecided pairs (group-sequential; as --adaptive)",
}
# the other evaluation settings come from EvalConfig, with its descriptions: n, dt_quirks, original_scoring, raw and
# the per-perspective arguments (a key added to EvalConfig becomes a study key with no edit here)
STUDY_EVAL_KEYS = {k: d for k, d in EvalConfig.keys().items() if k not in TOP_KEYS}
TOP_KEYS.update(STUDY_EVAL_KEYS)
VARIANT_KEYS = {
    "name": "label in the report (default: built from the settings, e.g. gptq-w4)",
    "method": f"dense, gguf or one of {', '.join(METHODS)}",
    "bits": "quantization bits, 2..8",
    "group_size": "weights per quantization scale (default 128; 0 = per row)",
    "sparsity": "pruning: fraction of zero weights in (0, 1)",
    "structure": "pruning: unstructured or N:M (2:4, 4:8)",
    "calibration": "calibration data (default: the built-in set)",
    "n_calib": "calibration samples",
    "seq_len": "max tokens per calibration sample",
    "calib_batch": "calibration samples per forward (default 16; 1 = llm-compressor's one at a time)",
    "awq_grid": "AWQ grid points",
    "seeds": "calibration seeds, e.g. [0, 1, 2] (default [0])",
    "actorder": "gptq: activation ordering, group (AutoGPTQ's desc_act, as in the paper) or weight (default: off)",
    "quant": "gguf: llama.cpp quantization of the model's GGUF (Q8_0, Q6_K, Q4_K_M, ...); omit to serve it as is",
    "file": "gguf: a GGUF file to serve instead",
    "recipe": "an llm-compressor recipe file to run (method recipe, implied); known by its content's sha256",
}
GGUF = "gguf"
DEFAULT_VARIANTS: list[Any] = [
    "dense",
    {"method": "gptq", "bits": 8},
    {"method": "gptq", "bits": 4},
    {"method": "gptq", "bits": 3},
    {"method": "awq", "bits": 4},
    {"method": "magnitude", "structure": "2:4"},
    {"method": "sparsegpt", "structure": "2:4"},
    {"method": "wanda", "structure": "2:4"},
]
DENSE = "dense"
DECISIONS = ("noninferiority", "point")


@dataclass(frozen=True)
class Variant:
    """One row of the study: dense, or a compression config evaluated once per calibration seed."""

    name: str
    method: str  # "dense" or a compression method
    settings: dict[str, Any] = field(default_factory=dict)  # CompressionConfig fields (without seed)
    seeds: tuple[int, ...] = (0,)
    source: str | None = field(default=None, compare=False)  # gguf: the study's model (its GGUF is the source)

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    @property
    def is_gguf(self) -> bool:
        """Served by llama.cpp rather than loaded by the engine (see comptrust.compress.gguf)."""
        return self.method == GGUF

    def label(self, seed: int) -> str:
        if self.is_gguf:
            from comptrust.compress import gguf

            return gguf.label(self.settings)
        return self.config(seed).label()

    def config(self, seed: int) -> CompressionConfig:
        return CompressionConfig.build(method=self.method, seed=seed, **self.settings)

    def instance(self, seed: int | None) -> str:
        """The key of one evaluated model: 'dense', or '<name>@s<seed>' (built here only)."""
        return DENSE if self.is_dense else f"{self.name}@s{seed}"

    def instances(self) -> list[str]:
        """Keys of the variant's evaluated models: 'dense', or 'gptq-w4@s0', 'gptq-w4@s1', ..."""
        return [DENSE] if self.is_dense else [self.instance(s) for s in self.seeds]

    def bits(self) -> float:
        """Nominal bits per weight, for ordering by compression: 16 for dense, b for quantization,
        16 x (1 - sparsity) for pruning (what a sparse format could save, not what a dense save does)."""
        if self.is_dense:
            return 16.0
        if self.is_gguf:
            from comptrust.compress import gguf

            return gguf.nominal_bits(self.settings, self.source)
        cfg = self.config(self.seeds[0])
        return method(cfg.method).nominal_bits(cfg)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "method": self.method, "seeds": list(self.seeds)}
        if self.is_gguf:
            # bits: the llama.cpp type's nominal bits per weight (Q8_0 = 8.5), so gguf variants sit on the bits curve
            d.update(bits=self.bits(), group_size=None, sparsity=None, structure=None,
                     quant=self.settings.get("quant") or "as served")
        elif not self.is_dense:
            cfg = self.config(self.seeds[0])
            d.update(bits=cfg.bits, group_size=cfg.group_size, sparsity=cfg.sparsity, structure=cfg.structure)
        d["bits_per_weight"] = self.bits()
        return d

    def fingerprint(self, seed: int) -> str:
        """Changes whenever a setting that changes the checkpoint changes: a stored unit with another
        fingerprint is stale and redone. Hashed is the resolved CompressionConfig (defaults filled in), not what
        the study file wrote: when a default changes (say --calib-batch's), resuming an older --out redoes its
        units instead of keeping checkpoints made under the old default. gguf variants have no
        CompressionConfig; their settings are hashed as written."""
        if self.is_gguf or self.is_dense:
            settings: dict[str, Any] = dict(self.settings)
        else:
            settings = self.config(seed).model_dump(mode="json", exclude={"method", "seed"})
        if settings.get("recipe_sha256"):  # a recipe is known by its content, not by where the file lies
            settings.pop("recipe", None)
        body = json.dumps({"method": self.method, "settings": settings, "seed": seed}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass
class StudySpec:
    model: str | None = None
    suite: str = "mini"
    data_dir: str | None = None
    mmlu_dir: str | None = None
    profile: str | None = None
    limit: int | None = None
    perspectives: list[str] = field(default_factory=lambda: list(registry.REGISTRY))
    variants: list[Variant] = field(default_factory=list)
    budget: float = 5.0
    alpha: float = 0.05
    bootstrap: int = 1000
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    backend: str = "auto"
    toxicity_scorer: str | None = None
    decision: str = "noninferiority"
    max_ppl_ratio: float = 2.0
    compare_to: str | None = None
    adaptive: dict[str, int] | None = None
    # STUDY_EVAL_KEYS (checked equal by tests/test_config.py)
    n: int | None = None
    dt_quirks: bool = False
    original_scoring: bool = False
    raw: bool = False
    advglue_tasks: list[str] | None = None
    advglue_dev: bool | None = None
    mmlu_context_tokens: int | None = None
    context_tokenizer: str | None = None
    gen_kwargs: str | None = None
    source: str = "<default>"

    @property
    def resolved_profile(self) -> str:
        return self.profile or ("mini" if self.suite == "mini" else "lite")

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def eval_config(self) -> EvalConfig:
        """The evaluation settings of every unit: the same EvalConfig the CLI's evaluate builds ('auto' device
        and dtype: the engine decides)."""
        return EvalConfig(
            suite=self.suite, data_dir=self.data_dir, mmlu_dir=self.mmlu_dir, profile=self.profile, limit=self.limit,
            seed=self.seed, backend=self.backend, device=None if self.device == "auto" else self.device,
            dtype=None if self.dtype == "auto" else self.dtype, batch_size=self.batch_size,
            toxicity_scorer=self.toxicity_scorer, **{k: getattr(self, k) for k in STUDY_EVAL_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = [
            {"name": v.name, "method": v.method, **v.settings,
             **({} if v.is_dense or v.is_gguf else {"seeds": list(v.seeds)})}
            for v in self.variants
        ]
        return d


# ----------------------------------------------------------------------------------------------------------------
# parsing


class _Lines:
    """Line numbers of the YAML nodes, by path (("variants", 2, "bits") -> 14)."""

    def __init__(self, text: str):
        self.map: dict[tuple, int] = {}
        self._seen: set[int] = set()
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            node = None
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        """Each node is walked once: an alias (*a) is the same node object as its anchor, and following aliases
        again and again turns a 10-line "billion laughs" file into 9^9 paths (4.4 GB before the fix). A path
        through an alias therefore maps to the alias's line and no deeper; errors under it name that line."""
        self.map[path] = node.start_mark.line + 1
        if id(node) in self._seen:
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                self.map[path + (key, "<key>")] = k.start_mark.line + 1
                self._walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, path + (i,))

    def at(self, *path: Any) -> int | None:
        while path:
            if path in self.map:
                return self.map[path]
            path = path[:-1]
        return self.map.get(())


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 60, 60, 2, 4, 4


def _short(value: Any) -> str:
    """repr() for error messages, bounded: a value built from YAML aliases can be nested 9 levels of 9 copies deep
    (the plain repr would be gigabytes)."""
    text = _REPR.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


VARIANT_NAME_MAX = 120


def check_variant_name(name: str) -> str | None:
    """Why `name` cannot name a variant, or None. A variant's name becomes a folder under models/
    (models/<name>@s<seed>) and part of unit ids, so it must be one safe path component: refused rather than
    rewritten, so that what the report shows is what the user wrote."""
    if not name.strip():
        return "is empty"
    if name != name.strip():
        return "starts or ends with white space"
    if name in (".", ".."):
        return "is a relative folder reference"
    bad = sorted({c for c in name if c in "/\\:" or ord(c) < 32 or ord(c) == 127})
    if bad:
        return f"contains {', '.join(repr(c) for c in bad)} (a variant name is one folder name: no /, \\, : or control characters)"
    if name.startswith("."):
        return "starts with '.' (a hidden folder)"
    if len(name.encode("utf-8")) > VARIANT_NAME_MAX:
        return f"is longer than {VARIANT_NAME_MAX} bytes"
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a second
    `variants:` further down would drop the first list without a word."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":  # `<<: *base` merges
                    key = self.construct_object(k, deep=deep)
                    try:
                        first = seen.get(key)
                    except TypeError:
                        continue
                    if first is not None:
                        raise _DuplicateKey(key, first, k.start_mark.line + 1)
                    seen[key] = k.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.line = key, first, line


def _unknown(key: str, valid: dict[str, str], where: str) -> str:
    hint = difflib.get_close_matches(key, valid, n=1)
    did = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"unknown key '{key}' in {where}{did}; valid: {', '.join(valid)}"


def parse_spec(data: Any, source: str = "<default>", text: str | None = None, preset: str | None = None) -> StudySpec:
    """Validate a study (a mapping of study keys). preset: a preset whose keys the mapping's override (as the
    mapping's own ``preset:`` key does)."""
    from comptrust.study.presets import merge

    lines = _Lines(text) if text is not None else None
    data = merge(data, preset)

    def fail(msg: str, *path: Any) -> UsageError:
        line = lines.at(*path) if lines else None
        return UsageError(f"{source}:{line}: {msg}" if line else f"{source}: {msg}")

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail(f"a study is a mapping of keys ({', '.join(TOP_KEYS)}), not {type(data).__name__}")
    for k in data:
        if k not in TOP_KEYS:
            raise fail(_unknown(str(k), TOP_KEYS, "the study"), k, "<key>")
    spec = StudySpec(source=source)

    def typed(key: str, kinds: tuple[type, ...], what: str) -> Any:
        val = data.get(key)
        if val is not None and (not isinstance(val, kinds) or isinstance(val, bool) and bool not in kinds):
            raise fail(f"{key}: expected {what}, got {_short(val)}", key)
        return val

    spec.model = typed("model", (str,), "a model path or Hub id")
    m = spec.model
    if m and not m.startswith("openai:") and (m.startswith(("/", ".", "~")) or m.lower().endswith(".gguf")) \
            and not Path(m).expanduser().exists():  # a local path that is not there: say so now, not per unit
        raise fail(f"model: {m} does not exist (a .gguf file, a model directory, or a Hub id org/name)", "model")
    spec.suite = typed("suite", (str,), "mini or dt") or "mini"
    if spec.suite not in ("mini", "dt"):
        raise fail(f"suite: {spec.suite!r}; expected mini or dt", "suite")
    spec.data_dir = typed("data_dir", (str,), "a folder")
    if spec.suite == "dt" and not spec.data_dir:
        raise fail("suite dt needs data_dir (a DecodingTrust data folder or hf:AI-Secure/DecodingTrust)", "suite")
    spec.mmlu_dir = typed("mmlu_dir", (str,), "a folder")
    spec.profile = typed("profile", (str,), " | ".join(PROFILES))
    if spec.profile is not None and spec.profile not in PROFILES:
        raise fail(f"profile: {spec.profile!r}; expected one of {', '.join(PROFILES)}", "profile")
    spec.limit = typed("limit", (int,), "a positive integer")
    if spec.limit is not None and spec.limit <= 0:
        raise fail(f"limit: {spec.limit}; must be a positive number of items", "limit")
    for key, lo, hi in (("budget", 0, 100), ("alpha", 0, 1)):
        val = typed(key, (int, float), "a number")
        if val is not None:
            if not lo < val < hi:
                raise fail(f"{key}: {val} is outside ({lo}, {hi})", key)
            setattr(spec, key, float(val))
    for key, lo in (("bootstrap", 0), ("seed", 0), ("batch_size", 1)):
        val = typed(key, (int,), "an integer")
        if val is not None:
            if val < lo:
                raise fail(f"{key}: {val}; must be >= {lo}", key)
            setattr(spec, key, val)
    spec.device = typed("device", (str,), "auto, cpu or cuda") or "auto"
    spec.dtype = typed("dtype", (str,), "auto, bfloat16, float16 or float32") or "auto"
    spec.toxicity_scorer = typed("toxicity_scorer", (str,), "a scorer name")
    given = {k: data[k] for k in STUDY_EVAL_KEYS if data.get(k) is not None}
    try:
        EvalConfig.build(**given)
    except ConfigError as e:
        raise fail(str(e), e.key) from None
    for k, v in given.items():
        setattr(spec, k, v)
    spec.decision = typed("decision", (str,), "noninferiority or point") or "noninferiority"
    if spec.decision not in DECISIONS:
        raise fail(f"decision: {spec.decision!r}; expected one of {', '.join(DECISIONS)}", "decision")
    ratio = typed("max_ppl_ratio", (int, float), "a number")
    if ratio is not None:
        if not ratio > 1:
            raise fail(f"max_ppl_ratio: {ratio}; must be above 1 (compressed / dense perplexity)", "max_ppl_ratio")
        spec.max_ppl_ratio = float(ratio)
    spec.compare_to = typed("compare_to", (str,), "a published model name")
    if spec.compare_to is not None:
        from comptrust.study.published import models as published_models

        known = published_models()
        if spec.compare_to not in known:
            hint = difflib.get_close_matches(spec.compare_to, known, n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise fail(f"compare_to: unknown published model {spec.compare_to!r}{did}; known: {', '.join(known)}",
                       "compare_to")
    spec.adaptive = _adaptive(data.get("adaptive"), fail)
    from comptrust.engine import BACKENDS

    spec.backend = typed("backend", (str,), " | ".join(BACKENDS)) or "auto"
    if spec.backend not in BACKENDS:
        raise fail(f"backend: {spec.backend!r}; expected one of {', '.join(BACKENDS)}", "backend")

    persp = data.get("perspectives", "all")
    if isinstance(persp, str):
        persp = [p.strip() for p in persp.split(",")] if persp.strip() != "all" else list(registry.REGISTRY)
    if not isinstance(persp, list) or not persp:
        raise fail("perspectives: expected 'all' or a non-empty list of names", "perspectives")
    persp = [registry.canonical(n) if isinstance(n, str) else n for n in persp]  # MMLU, adv-demo: as on the CLI
    for i, name in enumerate(persp):
        if not isinstance(name, str):
            raise fail(f"perspectives[{i}]: expected a perspective name, got {_short(name)}; "
                       f"known: {', '.join(registry.REGISTRY)}", "perspectives", i)
        if name not in registry.REGISTRY:
            hint = difflib.get_close_matches(str(name), registry.REGISTRY, n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise fail(f"unknown perspective '{name}'{did}; known: {', '.join(registry.REGISTRY)}", "perspectives", i)
    spec.perspectives = list(dict.fromkeys(persp))

    raw_variants = data.get("variants", DEFAULT_VARIANTS)
    if not isinstance(raw_variants, list) or not raw_variants:
        raise fail("variants: expected a non-empty list ('dense', {method: gptq, bits: 4}, ...)", "variants")
    seen: dict[str, int] = {}
    for i, rv in enumerate(raw_variants):
        v = _variant(rv, i, fail, spec.model)
        why = check_variant_name(v.name)  # names built from settings (gguf file stems) too
        if why:
            raise fail(f"variants[{i}]: the name {v.name!r} {why}; give it a 'name'", "variants", i)
        if v.name in seen:
            raise fail(f"variants[{i}]: the name '{v.name}' is used twice (also variants[{seen[v.name]}]); "
                       "give one a 'name'", "variants", i)
        seen[v.name] = i
        spec.variants.append(v)
    if not any(v.is_dense for v in spec.variants):
        spec.variants.insert(0, Variant(DENSE, DENSE))  # deltas need the dense baseline
    spec.variants.sort(key=lambda v: not v.is_dense)  # dense first: compressed variants are compared with it
    return spec


# each an integer >= this; max_generations / max_seconds: no further round starts once that many were spent
ADAPTIVE_KEYS = {"looks": 1, "start_limit": 1, "max_limit": 1, "max_generations": 1, "max_seconds": 1}


def _adaptive(val: Any, fail: Any) -> dict[str, int] | None:
    """adaptive: true | false | {looks, start_limit, max_limit, max_generations} (comptrust.study.adaptive)."""
    if val is None or val is False:
        return None
    if val is True:
        return {}
    if not isinstance(val, dict):
        raise fail(f"adaptive: expected true or a mapping of {', '.join(ADAPTIVE_KEYS)}, got {val!r}", "adaptive")
    for k, x in val.items():
        if k not in ADAPTIVE_KEYS:
            raise fail(_unknown(str(k), dict.fromkeys(ADAPTIVE_KEYS, ""), "adaptive"), "adaptive", k, "<key>")
        if not isinstance(x, int) or isinstance(x, bool) or x < ADAPTIVE_KEYS[k]:
            raise fail(f"adaptive: {k}: expected an integer >= {ADAPTIVE_KEYS[k]}, got {x!r}", "adaptive", k)
    if "start_limit" in val and "max_limit" in val and val["start_limit"] > val["max_limit"]:
        raise fail(f"adaptive: start_limit {val['start_limit']} is above max_limit {val['max_limit']}", "adaptive")
    return dict(val)


def _variant(rv: Any, i: int, fail: Any, model: str | None = None) -> Variant:
    where = f"variants[{i}]"
    if isinstance(rv, str):
        rv = {"method": rv}
    if not isinstance(rv, dict):
        raise fail(f"{where}: expected 'dense' or a mapping like {{method: gptq, bits: 4}}, got {_short(rv)}",
                   "variants", i)
    for k in rv:
        if k not in VARIANT_KEYS:
            raise fail(_unknown(str(k), VARIANT_KEYS, where), "variants", i, k, "<key>")
    if "recipe" in rv and "method" not in rv:
        rv = {**rv, "method": "recipe"}
    method = rv.get("method")
    if "name" in rv:
        name = rv["name"]
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise fail(f"{where}: name: expected a text label, got {_short(name)}", "variants", i, "name")
        why = check_variant_name(str(name))
        if why:
            raise fail(f"{where}: the name {str(name)!r} {why}", "variants", i, "name")
        if str(name) == DENSE and method != DENSE:
            raise fail(f"{where}: the name 'dense' is reserved for the dense baseline; give this {method} variant "
                       "another name", "variants", i, "name")
    if method == DENSE:
        extra = [k for k in rv if k not in ("method", "name")]
        if extra:
            raise fail(f"{where}: dense takes no compression settings (got {', '.join(extra)})", "variants", i)
        return Variant(str(rv.get("name") or DENSE), DENSE)
    if method == GGUF:
        return _gguf_variant(rv, i, fail, model)
    if method not in METHODS:
        hint = difflib.get_close_matches(str(method), (DENSE, GGUF, *METHODS), n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise fail(f"{where}: unknown method {method!r}{did}; valid: {DENSE}, {GGUF}, {', '.join(METHODS)}",
                   "variants", i, "method")
    for k in ("quant", "file"):
        if k in rv:
            raise fail(f"{where}: {k} is a setting of gguf variants, not of {method}", "variants", i, k, "<key>")
    seeds = rv.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise fail(f"{where}: seeds: expected a list of non-negative integers, got {_short(seeds)}", "variants", i,
                   "seeds")
    settings = {k: v for k, v in rv.items() if k not in ("name", "method", "seeds")}
    for k, val in settings.items():  # every compression setting is one value; a list here may be an alias bomb
        if isinstance(val, (list, dict)):
            raise fail(f"{where}: {k}: expected a single value, got {_short(val)}", "variants", i, k)
    try:
        cfg = CompressionConfig.build(method=method, seed=seeds[0], **settings)
    except UsageError as e:
        bad = next((k for k in settings if k.replace("_", "-") in str(e)), "method")
        raise fail(f"{where}: {e}".replace("--", ""), "variants", i, bad) from None
    if cfg.recipe_sha256 is not None:  # keyed by the recipe's content (Variant.fingerprint)
        settings["recipe_sha256"] = cfg.recipe_sha256
    name = rv.get("name") or _auto_name(cfg)
    return Variant(str(name), method, settings, tuple(dict.fromkeys(seeds)))


def _gguf_variant(rv: dict[str, Any], i: int, fail: Any, model: str | None) -> Variant:
    from comptrust.compress import gguf

    where = f"variants[{i}]"
    if "seeds" in rv:
        raise fail(f"{where}: gguf variants take no seeds (llama.cpp quantization uses no calibration data)",
                   "variants", i, "seeds")
    settings = {k: v for k, v in rv.items() if k not in ("name", "method")}
    for k, val in settings.items():
        if isinstance(val, (list, dict)):
            raise fail(f"{where}: {k}: expected a single value, got {_short(val)}", "variants", i, k)
    try:
        gguf.check_settings(settings, model)
    except UsageError as e:
        bad = next((k for k in settings if str(e).startswith(k)), "method")
        raise fail(f"{where}: {e}", "variants", i, bad) from None
    if settings.get("quant"):
        settings["quant"] = str(settings["quant"]).upper()
    return Variant(str(rv.get("name") or gguf.auto_name(settings)), GGUF, settings, (0,), source=model)


def _auto_name(cfg: CompressionConfig) -> str:
    return method(cfg.method).auto_name(cfg)


def load_spec(path: Path | None, preset: str | None = None) -> StudySpec:
    """The study in `path`, or the default study when path is None; over the keys of `preset` when given."""
    if path is None:
        return parse_spec({}, f"<preset {preset}>" if preset else "<default study>", preset=preset)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"study file {path} does not exist (comptrust study --init {path} writes an example)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the study file {path}: {e}") from None
    try:
        loader = _UniqueKeyLoader(text)  # a SafeLoader that also refuses duplicate keys
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _DuplicateKey as e:
        raise UsageError(f"{path}:{e.line}: duplicate key {_short(e.key)} (first on line {e.first}); "
                         "a key may appear once in a mapping") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{path}{line}: malformed YAML: {problem}") from None
    return parse_spec(data, str(path), text, preset=preset)


EXAMPLE_PATH = Path(__file__).parent / "example.yaml"


def example_yaml() -> str:
    return EXAMPLE_PATH.read_text(encoding="utf-8")
