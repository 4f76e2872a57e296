"""Safe loading: no file comptrust reads can make it run code, and no secret from the environment is written out.

- a static audit of the sources: no pickle / torch.load / np.load with pickles / yaml.load / eval / exec /
  trust_remote_code=True;
- a fairness .npy holding a pickled object array is refused with a one-line error, never unpickled;
- a model directory whose config asks for custom code (auto_map) never runs it: a built-in architecture loads
  with transformers' own classes, anything else is refused in one line naming trust_remote_code;
- a checkpoint whose weights are only pytorch_model.bin (a pickle) is refused, pointing to safetensors;
- an evaluation run with HF / Perspective / OpenAI tokens in the environment leaves none of them in its output
  folder (SQLite store included) or on stdout / stderr.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comptrust.errors import RuntimeFailure, UsageError
from comptrust.models import resolve
from comptrust.perspectives.base import EvalOptions
from comptrust.perspectives.fairness import Fairness

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "comptrust"
MINI = SRC / "suites" / "mini"


class _Boom:
    """Unpickling this object writes a marker file: proof that a loader executed pickle code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


# ---------------------------------------------------------------------------------------------------------------
# static audit


def _code_lines():
    for path in sorted(SRC.rglob("*.py")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield path.relative_to(ROOT), i, code


@pytest.mark.parametrize(
    "pattern,why",
    [
        (r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|\bjoblib\b|\bshelve\b|\bmarshal\.",
         "pickle deserialisation"),
        (r"\btorch\.load\(", "torch.load unpickles (use safetensors)"),
        (r"\bnp\.load\((?![^)]*allow_pickle=False)", "np.load must pass allow_pickle=False"),
        (r"\byaml\.(load|load_all|unsafe_load|full_load)\(", "yaml must be read with safe_load"),
        (r"trust_remote_code\s*=\s*(True|[a-z_]+\b(?<!False))", "trust_remote_code must stay False"),
        (r"(?<![.\w])(eval|exec)\(", "eval/exec of text"),
        (r"shell\s*=\s*True|\bos\.system\(", "shell command lines"),
    ],
)
def test_source_audit(pattern, why):
    hits = [f"{p}:{i}: {code.strip()}" for p, i, code in _code_lines() if re.search(pattern, code)]
    assert not hits, f"{why}:\n" + "\n".join(hits)


def test_np_load_calls_all_refuse_pickles():
    calls = [(p, i, c) for p, i, c in _code_lines() if "np.load(" in c]
    assert calls, "the fairness loader reads .npy files; the audit above must see that call"
    assert all("allow_pickle=False" in c for _, _, c in calls), calls


# ---------------------------------------------------------------------------------------------------------------
# (a) fairness: a pickled object array


@pytest.mark.parametrize("which", ["sensitive_attr_adult_0_200_test_base_rate_0.5.npy",
                                   "gt_labels_adult_0_200_test_base_rate_0.5.npy"])
def test_fairness_refuses_pickled_npy(tmp_path, which):
    data = tmp_path / "data"
    shutil.copytree(MINI / "fairness", data / "fairness")
    target = data / "fairness" / "fairness_data" / which
    n = len(np.load(target, allow_pickle=False))
    marker = tmp_path / "unpickled.txt"
    arr = np.empty(n, dtype=object)
    arr[:] = [_Boom(marker)] * n
    np.save(target, arr, allow_pickle=True)
    with pytest.raises(UsageError) as err:
        Fairness().load(EvalOptions(data_dir=data))
    msg = str(err.value)
    assert str(target) in msg and "\n" not in msg
    assert "plain numpy array" in msg and "pickled objects, which comptrust never loads" in msg
    assert not marker.exists(), "the pickled object array was executed"


def test_fairness_refuses_bare_pickle_named_npy(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(MINI / "fairness", data / "fairness")
    target = data / "fairness" / "fairness_data" / "sensitive_attr_adult_0_200_test_base_rate_0.5.npy"
    marker = tmp_path / "unpickled.txt"
    target.write_bytes(pickle.dumps(_Boom(marker)))  # a plain pickle file with a .npy name
    with pytest.raises(UsageError, match=re.escape(str(target))):
        Fairness().load(EvalOptions(data_dir=data))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# (b) remote code and (c) pickle weights in a model directory

REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran: " + __name__)
"""


@pytest.fixture(scope="module")
def embedded_dir():
    return resolve(None).path


def _model_copy(src: Path, dst: Path, marker: Path, *, model_type: str | None = None, tokenizer_map: bool = False,
                weights: bool = True) -> Path:
    """A model directory sharing src's big files by symlink, with an auto_map pointing to marker-writing code."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in ("config.json", "tokenizer_config.json") or (f.suffix == ".safetensors" and not weights):
            continue
        (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    if model_type:
        cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    if tokenizer_map:
        tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    for mod in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (dst / f"{mod}.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    return dst


@pytest.mark.model
def test_builtin_architecture_with_auto_map_loads_without_remote_code(embedded_dir, tmp_path):
    from comptrust.engine.hf import HFEngine

    marker = tmp_path / "remote_code_ran.txt"
    d = _model_copy(embedded_dir, tmp_path / "m", marker, tokenizer_map=True)
    m = resolve(str(d))
    assert m.kind == "dir"
    engine = HFEngine(m, device="cpu", threads=2)
    model = engine.model  # tokenizer at construction, weights now
    assert type(model).__module__.startswith("transformers.models.llama"), type(model)
    assert type(engine.tok).__module__.startswith("transformers."), type(engine.tok)
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("tokenizer_map", [False, True])
def test_custom_architecture_is_refused_in_one_line(embedded_dir, tmp_path, tokenizer_map):
    marker = tmp_path / "remote_code_ran.txt"
    d = _model_copy(embedded_dir, tmp_path / "m", marker, model_type="evil_custom_lm", tokenizer_map=tokenizer_map)
    with pytest.raises(UsageError) as err:
        resolve(str(d))
    msg = str(err.value)
    assert "trust_remote_code" in msg and "auto_map" in msg and str(d) in msg and "\n" not in msg
    assert not marker.exists(), marker.read_text()


def test_remote_code_refusal_through_the_cli(embedded_dir, tmp_path):
    """One line on stderr, exit 2, no code run; with tokens in the environment, none of them in the error."""
    marker = tmp_path / "remote_code_ran.txt"
    d = _model_copy(embedded_dir, tmp_path / "m", marker, model_type="evil_custom_lm")
    p = subprocess.run(
        [sys.executable, "-m", "comptrust", "evaluate", "-p", "stereotype", "--limit", "1", "--model", str(d),
         "--out", str(tmp_path / "out"), "--no-progress"],
        check=False, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, **SECRETS, "PYTHONWARNINGS": "ignore"},
    )
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: ") and "trust_remote_code" in last, p.stderr[-2000:]
    assert not marker.exists()
    assert not _leaks(p.stdout.encode()) and not _leaks(p.stderr.encode())


def _bin_only_dir(tmp_path: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    d = tmp_path / "binmodel"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (d / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Boom(marker)}))
    return d


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin"])
def test_pickle_only_checkpoint_is_refused(tmp_path, name):
    marker = tmp_path / "unpickled.txt"
    d = _bin_only_dir(tmp_path, marker, name)
    with pytest.raises(UsageError) as err:
        resolve(str(d))
    msg = str(err.value)
    assert name in msg and "safetensors" in msg and "\n" not in msg
    assert not marker.exists()


def test_bin_next_to_safetensors_is_ignored(embedded_dir, tmp_path):
    """transformers prefers model.safetensors; a stray pickle beside it is never opened (and not refused)."""
    marker = tmp_path / "unpickled.txt"
    d = tmp_path / "m"
    d.mkdir()
    for f in embedded_dir.iterdir():
        (d / f.name).symlink_to(f)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    (d / "training_args.bin").write_bytes(pickle.dumps(_Boom(marker)))
    assert resolve(str(d)).kind == "dir"
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# (d) secrets in the environment never reach the output

SECRETS = {"HF_TOKEN": "hf_SECRETTOKEN123", "PERSPECTIVE_API_KEY": "SECRETKEY456", "OPENAI_API_KEY": "sk-SECRET789"}


def _leaks(blob: bytes) -> list[str]:
    found = []
    for s in SECRETS.values():
        for enc in (s.encode(), s.encode("utf-16-le")):
            if enc in blob:
                found.append(s)
    return found


@pytest.mark.model
def test_no_secret_in_outputs(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, **SECRETS, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(
        [sys.executable, "-m", "comptrust", "evaluate", "-p", "stereotype", "--limit", "1", "--out", str(out),
         "--no-progress"],
        check=False, capture_output=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    assert not _leaks(p.stdout) and not _leaks(p.stderr)
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.suffix in (".sqlite", ".db") or "sqlite" in f.name for f in files) or files, files
    leaked = {str(f.relative_to(out)): _leaks(f.read_bytes()) for f in files}
    assert not any(leaked.values()), leaked


def test_perspective_scorer_errors_hide_the_key(tmp_path, monkeypatch):
    """The Perspective API key travels in the request URL; a failing request must not echo it."""
    from comptrust.toxicity_scorers import PerspectiveScorer

    monkeypatch.setenv("PERSPECTIVE_API_KEY", SECRETS["PERSPECTIVE_API_KEY"])
    scorer = PerspectiveScorer(url="http://127.0.0.1:9/v1alpha1/comments:analyze", max_retries=0, timeout=2,
                               cache=tmp_path / "tox.sqlite")
    with pytest.raises((RuntimeFailure, UsageError)) as err:
        scorer.score(["hello there"])
    assert not _leaks(str(err.value).encode())
    assert not _leaks((tmp_path / "tox.sqlite").read_bytes()) if (tmp_path / "tox.sqlite").exists() else True
