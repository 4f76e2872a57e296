"""Progress estimates: the evaluation's ETA weighted by what is left, the study's estimate before any unit runs,
failed units counted as failed. No model: events are replayed with a fake clock."""

from __future__ import annotations

import io

import pytest

from comptrust import progress
from comptrust.progress import GenerationProgress, StudyProgress, work_of
from comptrust.types import GenParams, Prompt


def prompts(n: int, chars: int, max_new: int) -> list[Prompt]:
    return [Prompt.chat(("user", "x" * chars), params=GenParams(max_new_tokens=max_new)) for _ in range(n)]


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(progress, "LAST_RATE", {})  # the rate of an evaluation earlier in this process
    now = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    return now


def test_work_of_counts_shared_decode_steps():
    # 3 prompts of one budget share one batch's 150 steps; 40 prompts of 20 tokens need two batches of 20 steps
    assert work_of(prompts(3, 100, 150)) == 300 + progress.STEP_WEIGHT * 150
    assert work_of(prompts(40, 10, 20)) == 400 + progress.STEP_WEIGHT * 2 * 20
    mixed = prompts(2, 0, 16) + prompts(1, 0, 64)
    assert work_of(mixed) == progress.STEP_WEIGHT * (16 + 64)


def test_eta_weighted_by_work_left_when_long_prompts_come_first(clock):
    """8 long-generation prompts first (150 steps each batch), then 100 short ones: a prompt-count rate taken
    on the first ones predicts ~12x the time the short ones need; the weighted ETA is near the cost model's."""
    long_, short = prompts(8, 200, 150), prompts(100, 200, 10)
    g = GenerationProgress("off")
    g.mode = "lines-test"  # events run; nothing is printed
    g.plan([long_, short])
    g.start(108, "generating (toxicity, ethics)")
    g.engine_started()
    clock[0] += 30.0
    g.batch(8, 1200)  # the long segment took 30 s
    naive = (g.total - g.done) / g.rate()
    w_long, w_short = work_of(long_), work_of(short)
    expected = 30.0 * w_short / w_long  # the short segment at the rate measured on the long one
    assert g.eta() == pytest.approx(expected)
    assert naive > 5 * g.eta()  # the old estimate: 100 prompts at 8 prompts / 30 s


def test_cache_hits_are_done_but_not_in_the_rate(clock):
    g = GenerationProgress("off")
    g.mode = "lines-test"
    segs = [prompts(10, 100, 20), prompts(10, 100, 20)]
    g.plan(segs)
    g.start(20, "generating (a, b)")
    g.advance(10)  # the first segment was all cached
    g.engine_started()
    clock[0] += 10.0
    g.batch(5, 50)  # half of the second in 10 s
    # rate from the generated half only: the other half takes 10 s more (not 0 s from counting the hits)
    assert g.eta() == pytest.approx(10.0)


def test_bar_shows_the_weighted_eta(clock):
    s = io.StringIO()
    g = GenerationProgress("bar", s)
    g.plan([prompts(4, 100, 20)])
    g.start(4, "generating (ethics)")
    g.engine_started()
    clock[0] += 8.0
    g.batch(2, 20)
    assert g.bar is not None
    assert [str(c.render(g.bar.tasks[0])) for c in g.bar.columns if type(c).__name__ == "EtaColumn"] == ["ETA 0:08"]
    clock[0] += 8.0  # no event for 8 s (a long prefill): the rate drawn falls, the ETA with it
    assert progress.eta_text(g) == "ETA 0:16"
    g.stop()


def study_rows(n_variants: int, persp: list[str]) -> list[dict]:
    rows = []
    for i in range(n_variants):
        name = "dense" if i == 0 else f"gptq-w{i}"
        if i:
            rows.append({"kind": "compress", "variant": name, "perspective": None})
        rows += [{"kind": "eval", "variant": name, "perspective": p} for p in persp]
    return rows


def test_study_estimate_before_any_unit_then_measured(clock, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPTRUST_HOME", str(tmp_path / "home"))
    rows = study_rows(2, ["ethics", "toxicity"])  # dense x2, compress gptq, gptq x2
    s = io.StringIO()
    sp = StudyProgress(5, 0, rows, work={"ethics": 6500.0, "toxicity": 13000.0},
                       methods={"dense": "dense", "gptq-w1": "gptq"}, key="k", stream=s)
    left, sure = sp.estimate()
    # 2 x (6500 + 13000) work at the built-in rate, plus gptq's built-in seconds
    assert sure == "rough"
    assert left == pytest.approx(2 * 19500 / progress.DEFAULT_EVAL_RATE + progress.DEFAULT_COMPRESS_S["gptq"])
    sp.announce("runs/s")
    assert "5 units (0 done, 5 to run) in runs/s; ETA" in s.getvalue() and "rough" in s.getvalue()
    sp.finished("eval", 2, 39.0)  # dense's two units: 19500 work in 39 s -> 500 work/s
    assert sp.eval_rate() == (pytest.approx(500.0), "measured")
    sp.finished("compress", 1, 100.0)
    left, sure = sp.estimate()
    assert sure == "measured" and left == pytest.approx(39.0)
    assert "3/5 units finished (3 done), elapsed" in s.getvalue().splitlines()[-1]
    # the next study on this machine starts from the measured rates
    sp2 = StudyProgress(5, 0, rows, work={"ethics": 6500.0, "toxicity": 13000.0},
                        methods={"dense": "dense", "gptq-w1": "gptq"}, key="k", stream=io.StringIO())
    left, sure = sp2.estimate()
    assert sure == "prior" and left == pytest.approx(2 * 39.0 + 100.0)


def test_study_failed_units_are_not_done(clock, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPTRUST_HOME", str(tmp_path / "home"))
    rows = study_rows(3, ["ethics"])
    s = io.StringIO()
    sp = StudyProgress(5, 0, rows, work={"ethics": 1000.0}, methods={"gptq-w1": "gptq", "gptq-w2": "gptq"},
                       stream=s)
    sp.finished("eval", 1, 2.0)
    sp.finished("compress", 1, 5.0, failed=True)
    sp.blocked(1)  # its evaluation will not run
    assert sp.left == {"compress": 1, "eval": 1}
    sp.finished("compress", 1, 5.0)
    sp.finished("eval", 1, 3.0, failed=True)
    last = s.getvalue().splitlines()[-1]
    assert last.startswith("[study] 5/5 units finished (2 done, 3 failed), elapsed") and "ETA" not in last
    assert sp.eval_done == [(1000.0, 2.0)]  # a failed unit's time is not a rate


def test_units_finishing_out_of_plan_order_keep_their_own_rates(clock, tmp_path, monkeypatch):
    """Worker processes finish units out of plan order: each result is booked to its own model's units (a fast
    magnitude pruning must not become AWQ's stored rate), and with 2 units side by side the time left halves."""
    monkeypatch.setenv("COMPTRUST_HOME", str(tmp_path / "home"))
    rows = [{"kind": "compress", "variant": v, "instance": f"{v}@s0", "perspective": None} for v in ("awq", "mag")]
    rows += [{"kind": "eval", "variant": v, "instance": i, "perspective": "ethics"}
             for v, i in (("dense", "dense"), ("awq", "awq@s0"), ("mag", "mag@s0"))]
    sp = StudyProgress(5, 0, rows, work={"ethics": 1000.0}, methods={"awq": "awq", "mag": "magnitude"}, key="k",
                       stream=io.StringIO(), parallel=2)
    sp.finished("compress", 1, 10.0, instance="mag@s0")  # magnitude first, though AWQ comes first in the plan
    assert sp.compress_done == {"magnitude": [10.0]}
    assert [r["instance"] for r in sp.queue["compress"]] == ["awq@s0"]
    sp.finished("eval", 1, 4.0, instance="mag@s0")
    assert [r["instance"] for r in sp.queue["eval"]] == ["dense", "awq@s0"]
    left, _ = sp.estimate()  # two evaluations at 250 work/s and AWQ's built-in seconds, two at a time
    assert left == pytest.approx((2 * 4.0 + progress.DEFAULT_COMPRESS_S["awq"]) / 2)
    sp.blocked(1, instance="awq@s0")
    assert [r["instance"] for r in sp.queue["eval"]] == ["dense"]
    assert progress.load_rates()["k"]["compress"] == {"magnitude": 10.0}


def test_damaged_rates_file_is_no_prior(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPTRUST_HOME", str(tmp_path))
    (tmp_path / progress.RATES_FILE).write_text("{not json")
    assert progress.load_rates() == {}
    progress.save_rate("k", "eval", 123.0)
    assert progress.load_rates() == {"k": {"eval": 123.0}}


def test_pause_between_generate_calls_is_not_generation(clock):
    """evaluate parses a perspective's outputs (and starts toxicity's scoring) between two generate calls: that
    time must not slow the rate, while it passes and after."""
    g = GenerationProgress("off")
    g.mode = "lines-test"
    g.plan([prompts(4, 100, 20), prompts(4, 100, 20)])
    g.start(8, "generating (a, b)")
    g.engine_started()
    clock[0] += 10.0
    g.batch(4, 40)  # the first call: 4 prompts in 10 s
    assert g.eta() == pytest.approx(10.0)
    clock[0] += 30.0  # 30 s of scoring, no engine activity
    assert g.eta() == pytest.approx(10.0)
    g.start(8, "generating (a, b)")  # the second call begins
    clock[0] += 5.0
    g.step(4, 10, 20)  # half of it in 5 s
    assert g.eta() == pytest.approx(5.0, rel=1e-2)  # step() counts a batch at most 99.9% done
