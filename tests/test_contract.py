"""One contract test over every registered perspective (lm-evaluation-harness's per-task contract idea)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comptrust import perspectives as registry
from comptrust.perspectives.base import EvalOptions
from comptrust.types import Record

NAMES = list(registry.REGISTRY)


class ConstantScorer:
    name = "constant"

    def score(self, texts):
        return [0.25 for _ in texts]


@pytest.fixture(scope="module")
def loaded_all():
    from tests.conftest import MINI

    opts = EvalOptions(data_dir=MINI, mmlu_dir=MINI / "mmlu", extra={"toxicity_scorer": ConstantScorer()})
    return opts, {n: registry.get(n).load(opts) for n in NAMES}


def test_all_nine_registered():
    assert NAMES == ["mmlu", "advglue", "ood", "adv_demo", "ethics", "fairness", "toxicity", "privacy", "stereotype"]
    assert set(registry.available()) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_declares_what_the_cli_and_report_show(name):
    # `comptrust perspectives`, --help and the report read these from the class: nothing else names a perspective
    cls = type(registry.get(name))
    assert cls.name == name
    assert cls.title.strip() and cls.short_title.strip() and cls.description.strip(), f"{name}: titles and description"
    assert "\n" not in cls.description and len(cls.description) < 240


@pytest.mark.parametrize("name", NAMES)
def test_mini_suite_loads_with_unique_ids_and_sane_params(name, loaded_all):
    _, loaded = loaded_all
    ld = loaded[name]
    assert ld.items, name
    ids = [it.id for it in ld.items]
    assert len(ids) == len(set(ids)), "item ids must be unique"
    for it in ld.items:
        p = it.prompt.params
        assert 1 <= p.max_new_tokens <= 512 and p.n >= 1 and 0 <= p.temperature <= 2
        assert (it.prompt.raw is not None) != bool(it.prompt.messages)
    assert len(ld.items) <= 150, "mini suites must stay small"


@pytest.mark.parametrize("name", NAMES)
def test_scores_stay_in_range_for_any_outputs(name, loaded_all):
    opts, loaded = loaded_all
    p = registry.get(name)
    rng = random.Random(0)
    pool = ["", "I agree.", "I disagree.", "yes", "no", "positive", "negative", "A", "B. because", "0", "3",
            "I'm sorry, I cannot help with that.", "wrong", "not wrong", "maybe", "4 : I don't know", "High",
            "john@example.com", "The answer is 2"]
    for trial in range(3):
        recs = []
        for it in loaded[name].items:
            outs = [rng.choice(pool) for _ in range(it.prompt.params.n)]
            recs.append(Record(item=it, outputs=outs, parsed=[p.parse(it, o, opts) for o in outs]))
        s = p.score(recs, opts, loaded[name])
        assert s.perspective == name
        assert s.score is None or 0 <= s.score <= 100, (name, s.score)
        assert s.refusal_rate is None or 0 <= s.refusal_rate <= 100, (name, s.refusal_rate)
        for k, v in s.subscores.items():
            assert 0 <= v <= 100, (name, k, v)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_parse_never_raises(name, loaded_all, text):
    opts, loaded = loaded_all
    p = registry.get(name)
    items = loaded[name].items
    for it in (items[0], items[len(items) // 2], items[-1]):
        got = p.parse(it, text, opts)
        assert isinstance(got.refused, bool)
