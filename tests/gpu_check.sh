#!/usr/bin/env bash
# The CUDA path in one command that fits the device tool (a command runs at most 10 minutes; at most 8 files come
# back from $OUT): the CUDA tests, a world acquire -> reflect -> evaluate in bf16, the same in fp16 under torchrun (so
# NCCL starts), bench.py's eager rows, then its torch.compile rows. Each step runs under `timeout` with its budget and
# none starts past DEADLINE, so the check ends within 7 minutes whatever hangs; a step that fails or runs out of time
# is recorded and the next one runs (no set -e). The runs go to a mktemp folder; $OUT gets these 7 files, the report
# rewritten before and after every step, so a check killed at any point still returns what it measured:
#   gpu_check.md                                     versions found; per step its exit code, time and last lines
#   tests.log world_bf16.log world_fp16.log bench.log   the steps' whole output
#   bench.json BENCHMARKS.md                         the repo's, with this machine's bench.py rows merged in
#
#     bash tests/gpu_check.sh                  # on a GPU; $OUT defaults to runs/gpu_check
#     OUT=DIR bash tests/gpu_check.sh --cpu    # the CPU rehearsal the suite runs (tests/test_gpu_check.py): tiny
#                                              # sizes, the CUDA-only steps skipped, the same files
# Budgets and the times expected on one H100, with how they were estimated: BENCHMARKS.md, "The GPU check".
set -u
mode=gpu
[[ ${1:-} == --cpu ]] && mode=cpu
python=${PYTHON:-python3}
out=${OUT:-runs/gpu_check}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
report=$out/gpu_check.md
export PYTHONUNBUFFERED=1  # a step killed by its timeout leaves what it printed
[[ $mode == cpu ]] && export OMP_NUM_THREADS=1  # tiny models; on a busy machine threads only wait on each other
DEADLINE=400               # seconds after the start; with timeout's 5 s grace the check ends before 7 minutes
started=$(date +%s)
summary=""                 # the report's table, one row per step
sections=""                # the report's sections, one per step
for f in tests.log world_bf16.log world_fp16.log bench.log; do : > "$out/$f"; done
cp bench.json BENCHMARKS.md "$out/"  # bench.py merges its rows into these copies, not into the repo's

write_report() {  # write_report [ROW]: the whole report, ROW (a running step) after the table; renamed into place
    { echo "# GPU check ($mode), $(date -u '+%Y-%m-%d %H:%M UTC'), $(($(date +%s) - started)) s so far"
      echo
      echo "\`bash tests/gpu_check.sh$([[ $mode == cpu ]] && echo ' --cpu')\`, python \`$python\`; runs in $work"
      echo
      echo "| step | result | seconds | budget |"
      echo "|---|---|---|---|"
      printf '%s' "$summary"
      [[ -n ${1:-} ]] && echo "$1"
      printf '%s' "$sections"; } > "$report.tmp" && mv "$report.tmp" "$report"
}

last_lines() {  # a log's last lines, without tqdm's progress bars
    tr '\r' '\n' < "$1" | grep -v -E '[0-9]+%\||it/s\]|s/it\]' | grep -v '^\s*$' | tail -n "${2:-12}"
}

step() {  # step NAME LOG BUDGET COMMAND...: COMMAND under `timeout`, its output appended to $out/LOG
    local name=$1 log=$2 budget=$3 left rc begin seconds result
    shift 3
    left=$((DEADLINE - ($(date +%s) - started)))
    ((budget > left)) && budget=$left
    if ((budget < 10)); then
        skip "$name" "out of time"
        return
    fi
    write_report "| $name | running | | $budget |"
    echo "\$ $*" >> "$out/$log"
    begin=$(date +%s.%N)
    timeout -k 5 "$budget" "$@" 2>&1 | tee "$work/step.log" >> "$out/$log"  # in $out as it comes
    rc=${PIPESTATUS[0]}
    seconds=$(awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    result="exit $rc"
    ((rc == 124 || rc == 137)) && result="exit $rc (out of time)"
    summary+="| $name | $result | $seconds | $budget |"$'\n'
    sections+=$'\n'"## $name: $result after $seconds s (budget $budget s)"$'\n\n'"\`$*\`"$'\n\n```\n'
    sections+="$(last_lines "$work/step.log")"$'\n```\n'
    write_report
    failures=$((failures + (rc != 0)))
}

skip() {  # skip NAME REASON
    summary+="| $1 | skipped: $2 | | |"$'\n'
    write_report
}

failures=0
# 1. What the machine has (no install step: the check uses it as it is).
step "environment" tests.log 30 "$python" - "$mode" <<'EOF'
import platform, sys
import numpy, sentencepiece, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, "
      f"numpy {numpy.__version__}, sentencepiece {sentencepiece.__version__}")
if gpu:
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
          f"compute capability {props.major}.{props.minor}, bf16 {torch.cuda.is_bf16_supported()}")
try:
    import transformers
    print(f"transformers {transformers.__version__} (requirements-test.txt pins its own: bench.py compares with this)")
except ImportError as e:
    print(f"transformers not importable ({e}): the bench.py steps will fail")
if sys.argv[1] == "gpu" and not gpu:
    sys.exit("no CUDA device: run `OUT=DIR bash tests/gpu_check.sh --cpu` for the CPU rehearsal")
EOF
if ((failures)); then
    sections+=$'\nNo usable environment: the other steps were not run.\n'
    write_report
    exit 1
fi
[[ $mode == gpu ]] && sections+=$'\n'"nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader 2>&1)"$'\n'

# 2. The CUDA tests (fp32 against the CPU, CUDA-graph decoding, fused AdamW, generators); on the CPU all skip.
step "CUDA tests" tests.log 90 "$python" -m pytest -q -p no:xdist -p no:cacheprovider -k cuda \
    tests/test_t5.py tests/test_train.py

# 3-8. The world in bf16, then in fp16 (GradScaler), its acquire under torchrun: NCCL with device_id, barriers and
# gathered generators, on one GPU.
if [[ $mode == gpu ]]; then
    acquire=(--epochs 15)  # the recipe cut in half: on the CPU in fp32, 46-54% validation (BENCHMARKS.md)
    reflect=(--iterations 1 --samples 2)
else
    acquire=(--epochs 1 --steps 2 --eval-every 2 --batch-size 16 --max-new-tokens 4)
    reflect=(--iterations 1 --epochs 1 --samples 1 --max-new-tokens 4 --batch-size 64 --max-length 16)
fi
for precision in bf16 fp16; do
    launcher=("$python")
    [[ $precision == fp16 ]] && launcher=("$python" -m torch.distributed.run --standalone --nproc_per_node 1)
    run=$work/world_$precision
    step "world $precision: acquire" "world_$precision.log" 75 "${launcher[@]}" tinythinker.py --phase acquire \
        --precision "$precision" "${acquire[@]}" --out "$run"
    step "world $precision: reflect" "world_$precision.log" 45 "$python" tinythinker.py --phase reflect --from "$run" \
        --precision "$precision" "${reflect[@]}"
    step "world $precision: evaluate" "world_$precision.log" 30 "$python" evaluate.py "$run" --out "$run/report"
done

# 9-11. bench.py at t5-small: the eager rows, then the compiled ones, which cost the most; batch 1 is the goal's for
# compiled decoding (BENCHMARKS.md).
if [[ $mode == gpu ]]; then
    bench=(--sizes small --repeats 2)
    gen_batches=1,8,64
else  # tests/test_gpu_check.py checks these rows
    bench=(--sizes small --threads 1 --batch 2 --src 12 --tgt 6 --new-tokens 4 --warmup 0 --repeats 1)
    gen_batches=1,3
fi
# bench.py records each command as typed in a clone to write the repo's files (--out bench.json ...), not $out's path
results=(--out "$out/bench.json" --markdown "$out/BENCHMARKS.md")
step "bench eager" bench.log 60 "$python" bench.py --only train,generate --variants eager --gen-batch "$gen_batches" \
    "${bench[@]}" "${results[@]}"
if [[ $mode == gpu ]]; then
    step "bench compile: generate" bench.log 150 "$python" bench.py --only generate --variants compile --gen-batch 1 \
        "${bench[@]}" "${results[@]}"
    step "bench compile: train" bench.log 150 "$python" bench.py --only train --variants compile "${bench[@]}" \
        "${results[@]}"
else
    skip "bench compile: generate" "CUDA only"
    skip "bench compile: train" "CUDA only"
fi
sections+=$'\n'"Done: $failures step(s) failed. bench.json and BENCHMARKS.md here hold the repo's rows and this \
machine's; copy them over the repo's to keep them."$'\n'
write_report
exit $((failures > 0))
