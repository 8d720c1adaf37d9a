#!/usr/bin/env bash
# The CUDA paths in one call, on a fresh GPU machine after `make install`:
#
#     scripts/gpu_check.sh            # VENV=<venv> if it is not .venv
#
# 1. `make test-gpu` (the tests marked cuda: mixed precision and GradScaler, CPU/CUDA
#    agreement, channels_last and torch.compile, DDP with NCCL and SyncBatchNorm, CUDA
#    evaluation and the CRF pool, peak memory), JUnit XML and measured facts kept;
# 2. section 5 of scripts/bench.py (DeepLab v3 ResNet-101 512x512 fp32/bf16/fp16 img/s,
#    peak memory, MFU; every zoo model at its paper's crop);
# 3. docs/gpu.md from both (scripts/gpu_report.py): machine, versions, tables.
#
# Time bound, under 8 minutes (480 s) on one H100: each part runs under `timeout`
# (tests 270 s, bench 170 s; the report takes seconds), and inside them the work is fixed:
# tiny configs and a few steps per test, a fixed number of steps per bench row. A part
# that hits its limit is reported as such and docs/gpu.md is still written.
# Without CUDA it says so in one line and exits 0. Exit status: 0 when both parts passed.
set -u
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "gpu_check: no Python at $PY: run make install first (or set VENV=<venv>)" >&2
    exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi

TESTS_LIMIT="${TESTS_LIMIT:-270}"
BENCH_LIMIT="${BENCH_LIMIT:-170}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
echo "gpu_check: logs in $WORK"

start=$SECONDS
SEGTRAIN_GPU_FACTS="$WORK/facts.jsonl" timeout --kill-after=10 "$TESTS_LIMIT" \
    make --no-print-directory test-gpu VENV="$VENV" \
    GPU_TEST_ARGS="--junitxml=$WORK/junit.xml" 2>&1 | tee "$WORK/tests.log"
tests_rc=${PIPESTATUS[0]}
tests_s=$((SECONDS - start))

start=$SECONDS
# every core for the CPU side (building the models); the GPU work is timed on the wall clock
timeout --kill-after=10 "$BENCH_LIMIT" "$PY" scripts/bench.py --skip train data eval knobs \
    --clock wall --threads "$(nproc)" --json "$WORK/bench.json" 2>&1 | tee "$WORK/bench.log"
bench_rc=${PIPESTATUS[0]}
bench_s=$((SECONDS - start))

"$PY" scripts/gpu_report.py --junit "$WORK/junit.xml" --facts "$WORK/facts.jsonl" \
    --bench "$WORK/bench.json" --tests-rc "$tests_rc" --bench-rc "$bench_rc" \
    --tests-seconds "$tests_s" --bench-seconds "$bench_s" --out docs/gpu.md
echo "gpu_check: make test-gpu exit $tests_rc (${tests_s} s), bench exit $bench_rc (${bench_s} s)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
