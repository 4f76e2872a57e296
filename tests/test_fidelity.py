"""Fidelity of a run as composed: a perspective's outputs do not depend on what else ran, a run with no data at all
is refused, and loader notes reach scores.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comptrust.engine.base import Generation
from comptrust.errors import UsageError
from comptrust.evaluate import evaluate, prepare
from comptrust.perspectives import REGISTRY
from comptrust.perspectives.base import EvalOptions
from comptrust.types import Prompt


class BatchEchoEngine:
    """A scripted engine whose every output names its batch mates: any change in how a perspective's prompts are
    batched (other perspectives' prompts joining, another order) changes the texts, as bf16 rounding can on a real
    model. Each call to generate is one batch."""

    fingerprint = "batch-echo"
    load_seconds = 0.0

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def render(self, prompt: Prompt) -> str:
        return prompt.identity()

    def generate(self, prompts, progress=None):
        rendered = [self.render(p) for p in prompts]
        self.calls.append(rendered)
        mates = str(hash(tuple(rendered)) & 0xFFFF)
        return [Generation(tuple(f"I agree. batch {mates}" for _ in range(p.params.n)),
                           tuple(3 for _ in range(p.params.n))) for p in prompts]


def _outputs(out: Path, perspective: str) -> dict[str, list[str]]:
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    return {r["id"]: r["outputs"] for r in lines if r["perspective"] == perspective}


def test_a_perspectives_batches_do_not_depend_on_the_others(tmp_path, mini_data):
    opts = EvalOptions(data_dir=mini_data, mmlu_dir=mini_data / "mmlu", limit=2)
    alone, together = BatchEchoEngine(), BatchEchoEngine()
    evaluate(alone, {}, ["stereotype"], opts, tmp_path / "alone", progress=False)
    names = [n for n in REGISTRY if n != "toxicity"]  # toxicity needs a scorer; it is not what is compared here
    evaluate(together, {}, names, opts, tmp_path / "together", progress=False)
    a, b = _outputs(tmp_path / "alone", "stereotype"), _outputs(tmp_path / "together", "stereotype")
    assert a and a == b
    # and no batch ever mixed two perspectives' prompts
    stereo = {Prompt.identity(it.prompt) for it in prepare(["stereotype"], opts).loaded["stereotype"][1].items}
    assert all(set(call) <= stereo or not (set(call) & stereo) for call in together.calls)


def test_loader_notes_reach_scores_json(tmp_path, mini_data):
    # the mini MMLU folder gives some questions fewer than 5 demonstrations, which the loader notes
    opts = EvalOptions(data_dir=mini_data, mmlu_dir=mini_data / "mmlu", limit=1)
    prepared = prepare(["mmlu", "ethics"], opts)
    loader_notes = {n: ld.notes for n, (_, ld, _o) in prepared.loaded.items()}
    evaluate(BatchEchoEngine(), {}, ["mmlu", "ethics"], opts, tmp_path / "o", progress=False, prepared=prepared)
    doc = json.loads((tmp_path / "o" / "scores.json").read_text())
    for name, notes in loader_notes.items():
        assert set(notes) <= set(doc["perspectives"][name]["notes"]), name
    assert any(loader_notes.values()), "expected the mini suite to produce at least one loader note"


def test_no_data_for_any_perspective_is_refused_naming_what_and_where(tmp_path):
    root = tmp_path / "checkout"
    (root / "data").mkdir(parents=True)
    with pytest.raises(UsageError) as e:
        prepare(["toxicity", "advglue"], EvalOptions(data_dir=root))
    msg = str(e.value)
    assert "toxicity_prompts.py" in msg and "alpaca.json, vicuna.json, stable-vicuna.json, advglue_dev.json" in msg
    assert msg.endswith(f"did you mean {root / 'data'}?") and "\n" not in msg


def test_cli_with_no_data_exits_2_before_loading_a_model(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "comptrust", "evaluate", "-p", "toxicity,advglue", "--suite", "dt",
         "--data-dir", str(root), "--model", str(tmp_path / "no-such-model.gguf"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "no data for any requested perspective in" in lines[0]
    assert "did you mean" not in lines[0]  # no data/ folder inside: no such hint
    assert not out.exists()  # nothing made, nothing left behind


@pytest.mark.model
def test_stereotype_alone_equals_stereotype_beside_toxicity_on_the_embedded_model(tmp_path, mini_data):
    """The same model, items and seed score the same whichever perspectives share the command. Toxicity is the
    perspective whose prompts share stereotype's decoding parameters (150 new tokens, t=1), so it is the one that
    shared its batches when all prompts went to the engine together; the batch-echo test above covers -p all."""
    from comptrust.engine.select import open_engine

    opts = EvalOptions(data_dir=mini_data, mmlu_dir=mini_data / "mmlu", limit=1)
    with open_engine(None) as (engine, info):
        alone = evaluate(engine, info, ["stereotype"], opts, tmp_path / "alone", progress=False)
        together = evaluate(engine, info, ["toxicity", "stereotype"], opts, tmp_path / "both", progress=False)
    assert _outputs(tmp_path / "alone", "stereotype") == _outputs(tmp_path / "both", "stereotype")
    assert alone.scores["stereotype"]["score"] == together.scores["stereotype"]["score"]


def test_partial_data_is_a_warning_not_an_error(tmp_path, mini_data):
    import shutil

    root = tmp_path / "dt"
    shutil.copytree(mini_data / "stereotype", root / "stereotype")
    prepared = prepare(["stereotype", "fairness"], EvalOptions(data_dir=root, limit=1))
    assert list(prepared.loaded) == ["stereotype"]
    assert prepared.not_run["fairness"].startswith(f"missing data file {root / 'fairness' / 'fairness_data'}")
