"""Random study files: every value of every key, of every type, ends in a StudySpec or one UsageError line,
never another exception (issue 21: `perspectives: [[mmlu]]` was a TypeError traceback)."""

from __future__ import annotations

import random

import pytest

from comptrust.errors import UsageError
from comptrust.study.spec import TOP_KEYS, VARIANT_KEYS, parse_spec

RNG_SEED = 20261202


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 3, 8, 10**12, -(10**12)])
    if kind == 3:
        return rng.choice([0.5, -0.1, 1e300, float("nan"), float("inf")])
    if kind == 4:
        return rng.choice(["", " ", "dense", "gptq", "mmlu", "all", "2:4", "../x", "a\nb", "w4$\\frac{x$", "\x00",
                           "ethics,mmlu", "Q8_0", "hf:x", "/nonexistent/x.gguf"])
    if kind == 5:
        return rng.choice(["mini", "dt", "lite", "full", "auto", "cpu", "magnitude", "unstructured"])
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        keys = list(VARIANT_KEYS) + ["zzz"]
        return {rng.choice(keys): _value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {rng.choice([None, 1, 2.5, True, "k", ""]): 1}  # YAML keys are hashable scalars


def _variant(rng: random.Random):
    if rng.random() < 0.2:
        return _value(rng, 1)
    v = {"method": rng.choice(["dense", "gptq", "awq", "rtn", "magnitude", "sparsegpt", "wanda", "gguf", "bogus"])}
    for k in rng.sample(list(VARIANT_KEYS), rng.randrange(3)):
        v[k] = _value(rng, 1)
    return v


@pytest.mark.parametrize("block", range(4))
def test_random_study_files_end_in_a_spec_or_one_usage_error(block):
    rng = random.Random(RNG_SEED + block)
    keys = [k for k in TOP_KEYS if k != "data_dir"]
    for _ in range(300):
        data = {k: _value(rng) for k in rng.sample(keys, rng.randrange(4))}
        if rng.random() < 0.7:
            data["variants"] = [_variant(rng) for _ in range(rng.randrange(1, 4))]
        try:
            parse_spec(data, "fuzz.yaml")
        except UsageError as e:
            assert "\n" not in str(e).replace("a\nb", ""), str(e)
            assert len(str(e)) < 2000
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{type(e).__name__}: {e} for {data!r}")
