"""EvalConfig: everything that decides an evaluation run, validated once and fingerprinted once.

Why one object: the CLI's ``evaluate``, the study file and the Python API used to each assemble the run knobs
themselves, and the study had lost four of them (``n``, ``dt_quirks``, ``original_scoring``, ``raw``). Now all
three build an :class:`EvalConfig`; a key one of them does not know is refused (``extra="forbid"``), a bad value
is a one-line error naming the key, and :meth:`EvalConfig.fingerprint` is what scores.json records and what a
study unit's fingerprint is made from, so a setting that changes scores always invalidates stored results.

Per-perspective settings (toxicity scorer, AdvGLUE tasks, ...) are declared by each perspective, in its module,
as a typed ``Args`` model (``perspectives.base.PerspectiveArgs``); EvalConfig inherits them all, so they are
validated, described and fingerprinted like the rest. :data:`PERSPECTIVE_ARGS` (derived) maps each to its
perspective; they reach the perspective through ``EvalOptions.extra`` under the same name, and a unit's
fingerprint covers only its own perspective's ones.

Layer: above perspectives (it builds their ``EvalOptions``), below evaluate/study/api/cli.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator

from comptrust.errors import UsageError
from comptrust.perspectives.advglue import AdvGlue, AdvGlueArgs
from comptrust.perspectives.mmlu import MMLU, MMLUArgs
from comptrust.perspectives.privacy import Privacy, PrivacyArgs
from comptrust.perspectives.toxicity import Toxicity, ToxicityArgs

SUITES = ("mini", "dt")
PROFILES = ("mini", "lite", "full")  # the same tuple as perspectives.base.PROFILES (checked by a test)
BACKENDS = ("auto", "hf", "vllm", "llamacpp")  # engine.select.BACKENDS (checked by a test)

# the perspectives that declare settings: EvalConfig inherits their Args (tests/test_config.py checks that every
# registered perspective's Args is here)
WITH_ARGS = (Toxicity, AdvGlue, MMLU, Privacy)
# config field -> the perspective that reads it (from EvalOptions.extra, under the field's name)
PERSPECTIVE_ARGS: dict[str, str] = {k: p.name for p in WITH_ARGS for k in p.Args.model_fields}
# the engine's knobs: they change outputs only through the engine, whose fingerprint (part of every cache key
# and of every stored score) already names them, so they stay out of EvalConfig.fingerprint
ENGINE_KEYS = ("backend", "device", "dtype", "batch_size")


class ConfigError(UsageError):
    """A bad EvalConfig value; ``key`` names the field (the study file uses it to find the line)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class EvalConfig(ToxicityArgs, AdvGlueArgs, MMLUArgs, PrivacyArgs):
    """What to run: data, profile, sampling, fidelity switches, engine knobs and per-perspective arguments.

    Build it with :meth:`build` (one-line errors) or the constructor (pydantic's ValidationError). Frozen:
    a run's config does not change under it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    suite: str = Field("mini", description="mini (built-in suites) or dt (DecodingTrust data in data_dir)")
    data_dir: str | None = Field(None, description="DecodingTrust data folder (or hf:AI-Secure/DecodingTrust) for suite dt")
    mmlu_dir: str | None = Field(None, description="MMLU folder with dev/ and test/ CSVs (default: beside data_dir), or hf:cais/mmlu")
    profile: str | None = Field(None, description="mini | lite | full (default: mini for suite mini, lite for dt)")
    limit: int | None = Field(None, description="items per sub-scenario (deterministic subsample)")
    n: int | None = Field(None, description="samples per prompt where the protocol samples (overrides the profile)")
    seed: int = Field(0, description="evaluation seed: subsampling and sampled decoding")
    dt_quirks: bool = Field(False, description="reproduce the reference harness's prompt-building quirks")
    original_scoring: bool = Field(False, description="DecodingTrust's original score rules instead of the patched ones")
    raw: bool = Field(False, description="raw-text prompts (no chat template), for base models")
    backend: str = Field("auto", description="auto | hf | vllm | llamacpp")
    device: str | None = Field(None, description="auto | cpu | cuda | cuda:N")
    dtype: str | None = Field(None, description="auto | bfloat16 | float16 | float32")
    batch_size: int | None = Field(None, description="max prompts per generation batch (default: packed by a token budget)")
    # per-perspective arguments: inherited from each perspective's Args (PERSPECTIVE_ARGS)
    # off-protocol decoding (comptrust.genkwargs); part of the fingerprint, and scores are marked not DecodingTrust
    gen_kwargs: str | None = Field(None, description="off-protocol decoding for every prompt, e.g. "
                                   "'temperature=0.7,max_new_tokens=64' (not DecodingTrust: outputs are marked)")

    # -- validation: messages say what is wrong with the value; build() puts the key in front ------------------
    @field_validator("data_dir", "mmlu_dir", mode="before")
    @classmethod
    def _path_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("suite")
    @classmethod
    def _suite(cls, v: str) -> str:
        if v not in SUITES:
            raise ValueError("expected mini or dt")
        return v

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str | None) -> str | None:
        if v is not None and v not in PROFILES:
            raise ValueError(f"expected one of {', '.join(PROFILES)}")
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"expected one of {', '.join(BACKENDS)}")
        return v

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be a positive number of items")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be a positive number of samples")
        return v

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("gen_kwargs")
    @classmethod
    def _gen_kwargs(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from comptrust.genkwargs import canonical

        try:
            return canonical(v)
        except UsageError as e:  # its message starts with the flag and value; keep only why
            raise ValueError(str(e).split(": ", 1)[-1]) from None

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, flags: bool = False, **kwargs: Any) -> "EvalConfig":
        """Validate ``kwargs``; the first problem becomes a one-line :class:`ConfigError` naming the key.

        flags: name keys as command-line options (``--batch-size 0: must be positive``) instead of as keys
        (``batch_size 0: must be positive``).
        """
        try:
            return cls(**kwargs)
        except ValidationError as e:
            raise _config_error(e, flags) from None

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Every key with its one-line description (for study-file help and 'valid:' lists)."""
        fields = cls.model_fields  # the inherited per-perspective ones last, as before
        order = [k for k in fields if k not in PERSPECTIVE_ARGS] + [k for k in fields if k in PERSPECTIVE_ARGS]
        return {k: fields[k].description or "" for k in order}

    # -- derived --------------------------------------------------------------------------------------------
    @property
    def resolved_profile(self) -> str:
        return self.profile or ("mini" if self.suite == "mini" else "lite")

    def perspective_args(self, perspective: str | None = None) -> dict[str, Any]:
        """The per-perspective arguments that are set (those of one perspective when named)."""
        return {k: getattr(self, k) for k, p in PERSPECTIVE_ARGS.items()
                if getattr(self, k) is not None and (perspective is None or p == perspective)}

    def unused_args(self, perspectives: list[str]) -> list[str]:
        """Per-perspective arguments that are set although their perspective is not run."""
        return [k for k, p in PERSPECTIVE_ARGS.items() if getattr(self, k) is not None and p not in perspectives]

    def decisive(self, perspective: str | None = None) -> dict[str, Any]:
        """The settings that decide the scores for a given model: everything but the engine's knobs (and, for
        one perspective, the other perspectives' arguments). The profile is resolved, so leaving it to its
        default and naming the default are the same run."""
        d = self.model_dump(exclude=set(ENGINE_KEYS) | set(PERSPECTIVE_ARGS))
        d["profile"] = self.resolved_profile
        d["args"] = self.perspective_args(perspective)
        return d

    def fingerprint(self, perspective: str | None = None) -> str:
        """16 hex digits over :meth:`decisive`: equal for runs whose scores must be equal (same model)."""
        body = json.dumps(self.decisive(perspective), sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_options(self) -> Any:
        """The perspectives' EvalOptions: data folders resolved (a missing folder is a UsageError here)."""
        from comptrust.data_sources import dt_dir, mini_dir
        from comptrust.data_sources import mmlu_dir as find_mmlu
        from comptrust.perspectives.base import EvalOptions

        root = mini_dir() if self.suite == "mini" else dt_dir(self.data_dir)
        opts = EvalOptions(
            data_dir=root,
            profile=self.resolved_profile,
            limit=self.limit,
            n=self.n,
            seed=self.seed,
            dt_quirks=self.dt_quirks,
            original_scoring=self.original_scoring,
            mmlu_dir=find_mmlu(self.mmlu_dir, root),
        )
        opts.extra.update(self.perspective_args())
        if self.gen_kwargs:
            opts.extra["gen_kwargs"] = self.gen_kwargs  # a string: EvalOptions.public() records it
        return opts

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of engine.select.open_engine ('auto' device/dtype mean: the engine decides)."""
        return {
            "backend": self.backend,
            "device": None if self.device in (None, "auto") else self.device,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "chat": False if self.raw else None,
        }


_TYPE_WORDS = {
    "int_type": "an integer",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list of strings",
    "int_parsing": "an integer",
}


def _config_error(e: ValidationError, flags: bool) -> ConfigError:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    key = loc[0] if loc else None
    if err.get("type") == "extra_forbidden" and key:
        valid = list(EvalConfig.keys())
        hint = difflib.get_close_matches(key, valid, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        return ConfigError(f"unknown key '{key}'{did}; valid: {', '.join(valid)}", key)
    name = (f"--{key.replace('_', '-')}" if flags else key) if key else "config"
    if len(loc) > 1:
        name += "[" + "][".join(loc[1:]) + "]"
    bad = err.get("input")
    shown = bad if isinstance(bad, str) else json.dumps(bad, default=str)
    if err.get("type") == "value_error":
        return ConfigError(f"{name} {shown}: {str(err.get('msg', '')).removeprefix('Value error, ')}", key)
    want = _TYPE_WORDS.get(str(err.get("type")), str(err.get("msg", "invalid value")))
    return ConfigError(f"{name}: expected {want}, got {bad!r}", key)
