"""EvalConfig: one validated run config for the CLI, the study file and the Python API; one fingerprint."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from comptrust.config import BACKENDS, ENGINE_KEYS, PERSPECTIVE_ARGS, PROFILES, ConfigError, EvalConfig
from comptrust.errors import UsageError


def test_tuples_match_their_owners():
    from comptrust.engine.select import BACKENDS as SELECT_BACKENDS
    from comptrust.perspectives import REGISTRY
    from comptrust.perspectives.base import PROFILES as BASE_PROFILES

    assert PROFILES == BASE_PROFILES
    assert BACKENDS == SELECT_BACKENDS
    assert set(PERSPECTIVE_ARGS.values()) <= set(REGISTRY)


@pytest.mark.parametrize(
    "kwargs, flags, message",
    [
        ({"limt": 2}, False, "unknown key 'limt' (did you mean 'limit'?); valid: suite, data_dir,"),
        ({"limit": 0}, True, "--limit 0: must be a positive number of items"),
        ({"limit": 0}, False, "limit 0: must be a positive number of items"),
        ({"n": -1}, True, "--n -1: must be a positive number of samples"),
        ({"suite": "dtt"}, True, "--suite dtt: expected mini or dt"),
        ({"profile": "huge"}, True, "--profile huge: expected one of mini, lite, full"),
        ({"batch_size": 0}, True, "--batch-size 0: must be positive"),
        ({"backend": "tgi"}, True, "--backend tgi: expected one of auto, hf, vllm, llamacpp"),
        ({"limit": "5"}, False, "limit: expected an integer, got '5'"),
        ({"dt_quirks": "yes"}, False, "dt_quirks: expected true or false, got 'yes'"),
        ({"advglue_tasks": ["rte", 3]}, False, "advglue_tasks[1]: expected a string, got 3"),
        ({"seed": -1}, False, "seed -1: must be >= 0"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(kwargs, flags, message):
    with pytest.raises(ConfigError) as e:
        EvalConfig.build(flags=flags, **kwargs)
    assert isinstance(e.value, UsageError)  # exit 2 through cli.main
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.key == next(iter(kwargs))


def test_frozen_and_unknown_keys_refused_by_the_constructor_too():
    cfg = EvalConfig(limit=2)
    with pytest.raises(ValidationError):
        cfg.limit = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        EvalConfig(bogus=1)  # type: ignore[call-arg]


def test_fingerprint_covers_what_decides_scores_and_nothing_else():
    base = EvalConfig.build(limit=4)
    fp = base.fingerprint()
    assert len(fp) == 16 and fp == EvalConfig.build(limit=4).fingerprint()
    # the profile is resolved: the default and naming it are one run
    assert EvalConfig.build(limit=4, profile="mini").fingerprint() == fp
    # every decisive setting moves it
    for change in ({"limit": 5}, {"n": 2}, {"seed": 1}, {"dt_quirks": True}, {"original_scoring": True},
                   {"raw": True}, {"profile": "full"}, {"toxicity_scorer": "lexicon"}, {"advglue_tasks": ["rte"]}):
        assert EvalConfig.build(**{"limit": 4, **change}).fingerprint() != fp, change
    # the engine's knobs do not: the engine fingerprint in every cache key and score names them
    for change in ({"device": "cpu"}, {"dtype": "float32"}, {"batch_size": 8}, {"backend": "hf"}):
        assert EvalConfig.build(**{"limit": 4, **change}).fingerprint() == fp, change
    assert set(ENGINE_KEYS) <= set(EvalConfig.model_fields)


def test_per_perspective_fingerprint_ignores_other_perspectives_arguments():
    a = EvalConfig.build(toxicity_scorer="lexicon")
    b = EvalConfig.build(toxicity_scorer="offline")
    assert a.fingerprint("stereotype") == b.fingerprint("stereotype")
    assert a.fingerprint("toxicity") != b.fingerprint("toxicity")
    assert a.unused_args(["stereotype"]) == ["toxicity_scorer"] and a.unused_args(["toxicity"]) == []


def test_to_options_carries_every_setting_to_the_perspectives(mini_data):
    cfg = EvalConfig.build(limit=3, n=2, seed=5, dt_quirks=True, original_scoring=True, toxicity_scorer="lexicon",
                           advglue_tasks=["rte"], mmlu_context_tokens=100)
    o = cfg.to_options()
    assert (o.data_dir, o.profile, o.limit, o.n, o.seed, o.dt_quirks, o.original_scoring) == (
        mini_data, "mini", 3, 2, 5, True, True)
    assert o.extra == {"toxicity_scorer": "lexicon", "advglue_tasks": ["rte"], "mmlu_context_tokens": 100}
    # ... and they reach scores.json's options (they used to stay out of public())
    pub = o.public()
    assert pub["toxicity_scorer"] == "lexicon" and pub["advglue_tasks"] == ["rte"] and pub["mmlu_context_tokens"] == 100
    assert cfg.engine_kwargs() == {"backend": "auto", "device": None, "dtype": None, "batch_size": None, "chat": None}
    assert EvalConfig.build(raw=True, device="auto").engine_kwargs()["chat"] is False


def test_study_keys_come_from_eval_config(tmp_path):
    from comptrust.study.plan import eval_fingerprint
    from comptrust.study.spec import STUDY_EVAL_KEYS, TOP_KEYS, StudySpec, load_spec, parse_spec

    fields = {f.name for f in dataclasses.fields(StudySpec)}
    assert set(STUDY_EVAL_KEYS) <= fields
    assert {"n", "dt_quirks", "original_scoring", "raw"} <= set(TOP_KEYS)
    # every EvalConfig key is a study key
    assert set(EvalConfig.model_fields) <= set(TOP_KEYS)
    spec = parse_spec({"n": 3, "dt_quirks": True, "original_scoring": True, "raw": True, "variants": ["dense"],
                       "perspectives": ["ethics"]})
    cfg = spec.eval_config()
    assert (cfg.n, cfg.dt_quirks, cfg.original_scoring, cfg.raw) == (3, True, True, True)
    plain = parse_spec({"variants": ["dense"], "perspectives": ["ethics"]})
    dense = plain.variants[0]
    assert eval_fingerprint(spec, dense, None, "ethics") != eval_fingerprint(plain, dense, None, "ethics")
    # round trip through study.json keeps them
    again = parse_spec({k: v for k, v in spec.to_dict().items() if k != "source"})
    assert again.eval_config() == cfg
    # a bad value names the file and line
    f = tmp_path / "s.yaml"
    f.write_text("variants: [dense]\nn: 0\n")
    with pytest.raises(UsageError, match=r"s.yaml:2: n 0: must be a positive number of samples"):
        load_spec(f)
    f.write_text("variants: [dense]\nraw: maybe\n")
    with pytest.raises(UsageError, match=r"s.yaml:2: raw: expected true or false, got 'maybe'"):
        load_spec(f)


def test_perspective_base_declares_what_callers_use():
    import inspect

    from comptrust import perspectives as registry
    from comptrust.perspectives.base import Perspective

    base = inspect.signature(Perspective.parse).parameters
    for name in registry.REGISTRY:
        p = registry.get(name)
        assert list(inspect.signature(type(p).parse).parameters) == list(base), name
        assert isinstance(p.lite_limit, int) and p.lite_limit > 0


def test_every_perspectives_args_are_run_config_keys():
    # a perspective declares its settings in its own module (Args); the run config inherits them all, so a new
    # perspective's setting is a study key, an API keyword and fingerprinted without touching this module's body
    from comptrust import perspectives as registry
    from comptrust.perspectives.base import PerspectiveArgs

    for name in registry.REGISTRY:
        args = type(registry.get(name)).Args
        assert issubclass(args, PerspectiveArgs)
        assert args is PerspectiveArgs or issubclass(EvalConfig, args), f"{name}: EvalConfig must inherit {args.__name__}"
        for key, field in args.model_fields.items():
            assert PERSPECTIVE_ARGS[key] == name
            assert key.startswith(name.split("_")[0]) or key == "context_tokenizer", f"{key}: prefix it with {name}"
            assert field.description and field.description.startswith(f"{name}:")
            assert EvalConfig.keys()[key] == field.description
    # a value a perspective's Args refuses is refused by the run config, naming the key
    with pytest.raises(ConfigError, match=r"^mmlu_context_tokens 0: must be positive$"):
        EvalConfig.build(mmlu_context_tokens=0)
