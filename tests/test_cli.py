"""The comptrust command end to end: real model, real files, real SQLite; bad inputs and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MINI


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "comptrust", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines, proc.stderr
    assert lines[-1].startswith("error: "), proc.stderr
    return lines[-1]


def test_help_teaches():
    p = run("--help")
    assert p.returncode == 0
    assert "evaluate" in p.stdout and "Quick start" in p.stdout
    e = run("evaluate", "--help")
    assert e.returncode == 0 and "--perspectives" in e.stdout and "Examples" in e.stdout


@pytest.mark.model
def test_evaluate_stereotype_end_to_end_and_rerun_generates_nothing(tmp_path):
    out = tmp_path / "run"
    args = ("evaluate", "-p", "stereotype", "--limit", "2", "--out", str(out), "--no-progress")
    p = run(*args)
    assert p.returncode == 0, p.stderr
    scores = json.loads((out / "scores.json").read_text())
    st = scores["perspectives"]["stereotype"]
    assert st["n_items"] == 6 and st["n_generations"] == 6
    assert 0 <= st["score"] <= 100 and 0 <= st["refusal_rate"] <= 100
    assert set(st["subscores"]) == {"benign", "untargeted", "targeted"}
    assert st["model_fingerprint"].startswith(scores["model"]["fingerprint"])
    assert "Q4_1" in scores["model"]["quantization_note"]
    assert scores["generation"]["generated"] == 6
    gens = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 6 and all(g["parsed"][0]["label"] in ("agree", "disagree", "no_response") for g in gens)
    again = run(*args)
    assert again.returncode == 0, again.stderr
    scores2 = json.loads((out / "scores.json").read_text())
    assert scores2["generation"]["generated"] == 0 and scores2["generation"]["cache_hits"] == 6
    assert scores2["perspectives"]["stereotype"]["score"] == st["score"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--limit", "0"), "--limit 0"),
        (("--limit", "-3"), "--limit -3"),
        (("-p", "stereotipe"), "unknown perspective 'stereotipe' (did you mean 'stereotype'?)"),
        (("--suite", "dt", "--data-dir", "/nonexistent/dt"), "--data-dir /nonexistent/dt: no such directory"),
        (("--suite", "dt"), "--suite dt needs --data-dir"),
        (("--model", "./nope/model"), "no such file or directory"),
        (("--model", "nobody/nothing-here"), "cannot get model 'nobody/nothing-here'"),
        (("--profile", "huge"), "--profile huge"),
        (("--limit", "abc"), "'--limit'"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    p = run("evaluate", "-p", "stereotype", "--out", str(tmp_path / "o"), *args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert needle in one_line_error(p)


def test_corrupt_gguf_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    p = run("evaluate", "-p", "stereotype", "--model", str(bad), "--out", str(tmp_path / "o"))
    assert p.returncode == 2
    assert "bad.gguf" in one_line_error(p)


def _copy_stereotype(dst: Path, mutate) -> Path:
    d = dst / "stereotype" / "dataset"
    d.mkdir(parents=True)
    src = MINI / "stereotype" / "dataset"
    lines = (src / "stereotype_bias_data.jsonl").read_text().splitlines()
    (d / "stereotype_bias_data.jsonl").write_text("\n".join(mutate(lines)) + "\n")
    (d / "system_prompts.csv").write_text((src / "system_prompts.csv").read_text())
    return dst


def test_malformed_jsonl_line_exit_2_and_store_intact(tmp_path):
    data = _copy_stereotype(tmp_path / "dt", lambda ls: ls[:4] + ["{not json"] + ls[4:])
    out = tmp_path / "o"
    out.mkdir()
    # a results directory with stored work must survive a failing command untouched
    from comptrust.store import Store
    from comptrust.types import GenParams

    with Store(out / "comptrust.sqlite") as s:
        s.put_generations([("k", "fp", "p", GenParams(max_new_tokens=1), ["x"], [1])])
    p = run("evaluate", "-p", "stereotype", "--suite", "dt", "--data-dir", str(data), "--out", str(out))
    assert p.returncode == 2
    assert "stereotype_bias_data.jsonl:5: malformed JSON line" in one_line_error(p)
    with Store(out / "comptrust.sqlite") as s:
        assert s.count_generations() == 1


def test_missing_data_for_the_only_perspective_is_an_error(tmp_path):
    # nothing to evaluate is not a success: one line naming the file looked for, exit 2, no --out left behind
    (tmp_path / "dt").mkdir()
    p = run("evaluate", "-p", "stereotype", "--suite", "dt", "--data-dir", str(tmp_path / "dt"),
            "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 2
    err = one_line_error(p)
    assert "no data for any requested perspective" in err and "stereotype_bias_data.jsonl" in err
    assert not (tmp_path / "o").exists()


# -- lm-eval habits (issue 22) -------------------------------------------------------------------------------


def test_version_and_perspectives_listing():
    v = run("--version")
    assert v.returncode == 0 and v.stdout.strip().startswith("comptrust 0.")
    p = run("perspectives", "--limit", "1", "--limit", "3")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "MMLU (benign accuracy)" in out and "not lm-eval's log-likelihood mmlu" in out
    assert "3 sub-scenarios: benign, untargeted, targeted" in out
    assert "prompts: mini suite: 48 | --limit 1: 3 | --limit 3: 9" in out  # stereotype: 3 system prompts x limit
    j = run("perspectives", "--json")
    rows = {r["perspective"]: r for r in json.loads(j.stdout)}
    # the counts are the loaders' own: the sum over perspectives is what `-p all --limit 1` sends
    from comptrust.config import EvalConfig
    from comptrust.evaluate import load_perspectives

    loaded, _ = load_perspectives(list(rows), EvalConfig(limit=1).to_options())
    assert sum(r["--limit 1"]["prompts"] for r in rows.values()) == sum(len(ld.items) for _, ld, _ in loaded.values())
    tl = run("evaluate", "--tasks", "list")  # lm-eval's `--tasks list`
    assert tl.returncode == 0 and "stereotype" in tl.stdout and "--limit 1" in tl.stdout


@pytest.mark.parametrize("args,needle", [
    (("--model_args", "pretrained=foo"), "--model_args is an lm-evaluation-harness flag: comptrust takes the model itself: --model"),
    (("--num_fewshot", "3"), "--num_fewshot is an lm-evaluation-harness flag: the shot counts are DecodingTrust's"),
    (("--use_cache", "x"), "cached in --out/comptrust.sqlite"),
    (("--apply_chat_template",), "--raw"),
    (("--perspektives", "x"), "No such option: --perspektives (did you mean --perspectives?)"),
    (("--batch-size", "big"), "--batch-size big: expected a positive number of prompts or auto"),
    (("--batch_size", "0"), "--batch-size 0: must be positive"),
    (("--gen-kwargs", "until=x"), "unknown key 'until'"),
    (("--gen_kwargs", "temperature=-1"), "temperature=-1: expected a number >= 0"),
    (("-p", "MMLUU"), "unknown perspective 'MMLUU' (did you mean 'mmlu'?)"),
    (("--model", "hf"), "--model hf is an lm-evaluation-harness model type; comptrust's --model is the model itself"),
])
def test_lm_eval_flags_answered_in_one_line(tmp_path, args, needle):
    p = run("evaluate", "--tasks", "stereotype", "--output_path", str(tmp_path / "o"), *args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert needle in one_line_error(p)
    assert not (tmp_path / "o").exists()  # answered before anything is made


def test_config_file_gives_an_evaluation_its_settings(tmp_path):
    """--config takes a study file's keys; the command line wins; a file with compression variants is a study;
    errors name the file and line (the study loader's)."""
    from typer.testing import CliRunner

    import comptrust.cli as cli

    seen = {}

    def fake_evaluate(model, perspectives, out, config=None, **kw):
        seen.update(model=model, perspectives=perspectives, config=config)
        raise SystemExit(0)

    cfg = tmp_path / "run.yaml"
    cfg.write_text("perspectives: [MMLU, stereotype]\nlimit: 3\nseed: 7\nn: 2\nbudget: 3\n")
    import comptrust.api as api

    orig = api.evaluate
    api.evaluate = fake_evaluate
    try:
        r = CliRunner().invoke(cli.app, ["evaluate", "--config", str(cfg), "--out", str(tmp_path / "o"), "--seed", "1"])
    finally:
        api.evaluate = orig
    assert r.exit_code == 0, r.output
    assert seen["perspectives"] == "mmlu,stereotype"
    assert (seen["config"].limit, seen["config"].seed, seen["config"].n) == (3, 1, 2)  # --seed 1 beats the file's 7
    assert "budget apply to studies only" in r.output
    study = tmp_path / "study.yaml"
    study.write_text("perspectives: [ethics]\nvariants:\n  - dense\n  - {method: gptq, bits: 4}\n")
    p = run("evaluate", "--config", str(study), "--out", str(tmp_path / "o2"))
    assert p.returncode == 2 and "an evaluation runs one model" in one_line_error(p)
    bad = tmp_path / "bad.yaml"
    bad.write_text("perspectives: [ethics]\nlimmit: 2\n")
    p = run("evaluate", "--config", str(bad), "--out", str(tmp_path / "o3"))
    assert p.returncode == 2 and f"{bad}:2: unknown key 'limmit'" in one_line_error(p)


def test_progress_lines_when_not_a_terminal():
    """Piped output gets plain lines with counts, rate and ETA; the bar advances inside a batch (on_step) and an
    engine that reports no batches still advances on commit."""
    import io

    from comptrust.progress import GenerationProgress

    s = io.StringIO()
    s.isatty = lambda: False  # type: ignore[method-assign]
    bar = GenerationProgress.for_stream(None, s)
    assert bar.mode == "lines"
    bar.every = 0.0
    bar.start(10, "generating (stereotype)")
    bar.advance(2)  # cache hits: done, not a rate
    bar.step(4, 5, 10)  # half of a 4-prompt batch decoded
    bar.t_gen -= 10  # as if it had taken ten seconds
    bar.step(4, 10, 10)
    bar.batch(4, 40)
    bar.commit(4, 40)  # already reported by the batch: no double count
    assert bar.done == 6
    bar.commit(4, 12)  # a chunk whose engine reported no batch
    assert bar.done == 10
    bar.stop()
    lines = s.getvalue().splitlines()
    assert lines[0] == "[comptrust] 10 prompts to answer; loading the model weights (first batch), then generating"
    lines = lines[1:]
    assert lines[0].startswith("[comptrust] generating (stereotype): 0/10 prompts (0%), rate ?")
    # inside the batch: 2 cached + 4 prompts at 10 of 10 steps after 10 s -> 0.40 prompts/s, 4 left -> ETA 0:10
    assert any("6/10 prompts (60%), 0.40 prompts/s" in x and "ETA 0:10" in x for x in lines), lines
    assert lines[-1].startswith("[comptrust] generating (stereotype): 10/10 prompts (100%)")


def test_hf_engine_reports_decode_steps_inside_a_batch(tmp_path):
    from comptrust.engine.hf import HFEngine
    from comptrust.models import resolve
    from comptrust.types import GenParams, Prompt
    from tests.compress import build_tiny

    eng = HFEngine(resolve(str(build_tiny(tmp_path / "tiny"))), device="cpu", dtype="float32")
    eng.ignore_eos = True  # random weights: fixed lengths
    calls = []
    eng.on_step = lambda prompts, done, max_new: calls.append((prompts, done, max_new))
    batches = []
    params = GenParams(max_new_tokens=12)
    eng.generate([Prompt.chat(("user", f"hello {i}"), params=params) for i in range(3)],
                 progress=lambda n, tok: batches.append(n))
    assert batches == [3]
    assert calls and all(c[0] == 3 and c[2] == 12 for c in calls)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls) and calls[-1][1] >= 10


def test_piped_evaluate_prints_stage_and_progress_lines(tmp_path):
    """A real run (tiny random model) with stderr not a terminal: the first line says what is happening, progress
    lines follow, third-party chatter goes to --out/comptrust.log, not stderr."""
    import time

    from tests.compress import build_tiny

    model = build_tiny(tmp_path / "tiny")
    out = tmp_path / "o"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "comptrust", "evaluate", "-m", str(model), "-p", "Stereotype",
                             "--limit", "1", "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
    first = proc.stderr.readline()
    t_first = time.time() - t0
    rest, _ = proc.communicate(timeout=600)[::-1], None
    err = first + rest[0]
    assert proc.returncode == 0, err
    assert first.startswith("[comptrust] resolving model"), err
    assert t_first < 15, t_first  # measured ~1 s on an idle 2-core machine; generous for a shared one
    assert "[comptrust] generating (stereotype): 3/3 prompts (100%)" in err, err
    assert "Traceback" not in err and "it/s]" not in err  # no third-party bars


def test_third_party_chatter_goes_to_the_log_file(tmp_path, capfd, monkeypatch):
    import logging
    import warnings

    shown = []  # what reaches the usual warning display (stderr outside pytest)
    monkeypatch.setattr(warnings, "showwarning", lambda m, c, f, n, file=None, line=None: shown.append(str(m)))

    from tqdm import tqdm

    from comptrust.logs import third_party_to_log

    log = tmp_path / "comptrust.log"
    with third_party_to_log(log):
        for _ in tqdm(range(3), desc="per-layer bar"):
            pass
        logging.getLogger("transformers.modeling_utils").error("a transformers advisory")  # ERROR: the HF engine
        # sets transformers' verbosity to errors (quiet_transformers), which earlier tests may have done
        warnings.warn_explicit("a torch warning", UserWarning, "/site-packages/torch/nn/x.py", 1)
        warnings.warn_explicit("comptrust's own warning", UserWarning, "/src/comptrust/evaluate.py", 1)
    err = capfd.readouterr().err
    assert "per-layer bar" not in err and "a transformers advisory" not in err and "a torch warning" not in err
    assert shown == ["comptrust's own warning"]
    text = log.read_text()
    assert "a transformers advisory" in text and "a torch warning" in text
    for _ in tqdm(range(2), desc="after the block"):
        pass
    assert "after the block" in capfd.readouterr().err  # everything restored


def test_torch_loggers_go_to_the_log_even_when_torch_is_first_imported_in_the_block(tmp_path):
    # torch gives its loggers their own stderr handlers when imported; a study imports it inside the block, and a
    # torch.fx warning per compression reached the terminal. A fresh interpreter, so torch is not imported yet.
    import subprocess
    import sys

    log = tmp_path / "comptrust.log"
    code = ("import sys\nfrom pathlib import Path\nfrom comptrust.logs import third_party_to_log\n"
            "assert 'torch' not in sys.modules\n"
            "with third_party_to_log(Path(sys.argv[1])):\n"
            "    import torch.fx._symbolic_trace as st\n"
            "    st.is_fx_tracing()\n")
    r = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "is_fx_tracing" not in r.stderr
    assert "is_fx_tracing" in log.read_text()


def test_llm_compressor_lines_reach_the_log_once_per_line_across_compressions(tmp_path):
    # with llm-compressor's own file switches a study's log held each line 2-3 times (a JSON sink on import, one
    # more DEBUG sink per oneshot call); a fresh interpreter, so llm-compressor is first imported in the block
    import subprocess
    import sys

    log = tmp_path / "comptrust.log"
    code = ("import sys\nfrom pathlib import Path\nfrom comptrust.logs import third_party_to_log, attach_loguru\n"
            "with third_party_to_log(Path(sys.argv[1])):\n"
            "    import llmcompressor\n"
            "    from loguru import logger\n"
            "    for i in range(3):  # three compressions in one study\n"
            "        attach_loguru()\n"
            "        logger.info(f'calibrating layer {i}')\n"
            "        logger.debug('a debug line')\n")
    r = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "calibrating" not in r.stdout + r.stderr
    text = log.read_text()
    for i in range(3):
        assert text.count(f"calibrating layer {i}") == 1, text
    assert "a debug line" not in text and '"record"' not in text
