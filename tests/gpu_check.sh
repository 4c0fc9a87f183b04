#!/usr/bin/env bash
# The CUDA path in one command, under 8 minutes on one GPU: the CUDA tests, a short world acquire -> reflect ->
# evaluate in bf16 and in fp16 (with its GradScaler), and bench.py's CUDA rows; one report in $OUT (default runs/gpu).
#     bash tests/gpu_check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
report="$out/gpu_check.md"
python - <<'EOF' | tee "$report"
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
EOF
echo '## CUDA tests' >> "$report"
python -m pytest -q -p no:xdist tests/test_t5.py tests/test_precision.py -k "cuda or precision or fp16 or bf16" \
    2>&1 | tail -3 | tee -a "$report"
for precision in bf16 fp16; do
    run="$out/world_$precision"
    rm -rf "$run"
    echo "## world, --precision $precision (acquire 10 epochs, reflect 1 iteration)" >> "$report"
    python tinythinker.py --phase acquire --precision "$precision" --epochs 10 --out "$run" 2>&1 | tail -1 | tee -a "$report"
    python tinythinker.py --phase reflect --from "$run" --precision "$precision" --iterations 1 --epochs 1 2>&1 \
        | tail -1 | tee -a "$report"
    python evaluate.py "$run" --out "$run/report" > /dev/null
    cat "$run/report.md" >> "$report"
done
echo '## bench.py (CUDA rows, t5-small)' >> "$report"
cp BENCHMARKS.md "$out/BENCHMARKS.md"  # bench.py rewrites its results section; copy it back to keep the rows
python bench.py --only train,generate --sizes small --repeats 2 --out "$out/bench.json" --markdown "$out/BENCHMARKS.md" \
    2>&1 | tail -30 | tee -a "$report"
echo "wrote $report"
