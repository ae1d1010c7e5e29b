#!/usr/bin/env bash
# One call for a short GPU window (issue #14): the Triton kernels compiled on CUDA, the
# compile / CUDA-graph tests, the step benchmark at 100M and 1B parameters with each pass's
# share of the copy probe, and one end-to-end unlearning step.  Everything lands in OUTDIR;
# OUTDIR/summary.md is the one file to read.  Estimated 5-7 minutes on an H100/H200 (not yet
# measured).  Each section runs under its own timeout, clamped to what is left of the whole
# check's budget (--budget, default 480 s): once it is spent, the remaining sections are
# skipped with that reason, so the check ends inside the window whatever hangs.
#
#   benchmarks/gpu_check.sh [--dry-run] [--only SECTION[,SECTION...]] [--budget SECONDS] OUTDIR
#
# Needs only what a CUDA machine has: torch with CUDA, triton, pytest (diffusers for the
# UNet step, torchvision for the ResNet-18 one, hypothesis for the integrity tests: each is
# skipped or reported without it).  No C++ build, no pip install, no network: the package is
# imported from this checkout (PYTHONPATH=repo root).  PYTHON picks the interpreter.
#
# Without CUDA (or with --dry-run) every GPU section is recorded as skipped, with the
# reason, summary.md is still written and the exit status is 0.  Otherwise the exit
# status is 1 if any section failed (a skip is not a failure).
set -u

usage() {
    echo "usage: $0 [--dry-run] [--only SECTION[,SECTION...]] [--budget SECONDS] OUTDIR" >&2
    exit 2
}

DRY_RUN=0
ONLY=""
BUDGET=480
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --only) [ $# -ge 2 ] || usage; ONLY=",$2,"; shift ;;
        --budget) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || usage; BUDGET=$2; shift ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || usage
# Every GPU section, in the order it runs (--only takes these names).
SECTIONS="triton-kernels compile step-100M-float32 step-100M-bf16-fp32states step-1B-float32
step-1B-float32-3players step-1B-bf16-fp32states step-1B-bf16-fp32states-3players e2e-unet e2e-resnet18"
for name in ${ONLY//,/ }; do
    if [[ " ${SECTIONS//$'\n'/ } " != *" $name "* ]]; then
        echo "--only: unknown section $name; sections: ${SECTIONS//$'\n'/ }" >&2
        exit 2
    fi
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET # compiled kernels, never the interpreter
cd "$ROOT" || exit 2
: >"$OUT/sections.tsv"
FAILED=0
START=$SECONDS

record() { # name status reason seconds
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/sections.tsv"
    printf '[gpu_check] %-34s %-5s %s (%ss)\n' "$1" "$2" "${3:-}" "$4"
    if [ "$2" = fail ]; then FAILED=1; fi
}

selected() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

# run NAME TIMEOUT_S CMD...: stdout+stderr to OUT/NAME.log, killed after TIMEOUT_S.
run() {
    local name=$1 limit=$2 begin=$SECONDS rc
    shift 2
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - begin))
    case $rc in
        0) record "$name" pass "" "$took" ;;
        124 | 137) record "$name" fail "timed out after ${limit}s (see $name.log)" "$took" ;;
        *) record "$name" fail "exit status $rc (see $name.log)" "$took" ;;
    esac
}

# gpu NAME TIMEOUT_S CMD...: run on CUDA (its timeout clamped to the budget left), or record why not.
gpu() {
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
    shift 2
    if ! selected "$name"; then
        record "$name" skip "not selected (--only)" 0
    elif [ "$DRY_RUN" = 1 ]; then
        record "$name" skip "skipped: --dry-run" 0
    elif [ "$HAS_CUDA" != 1 ]; then
        record "$name" skip "skipped: no CUDA device" 0
    elif [ "$left" -lt 20 ]; then
        record "$name" skip "skipped: the ${BUDGET}s budget is spent" 0
    else
        run "$name" $((limit < left ? limit : left)) "$@"
    fi
}

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# ---------------------------------------------------------------- env (runs everywhere)
HAS_CUDA=0
run env 120 "$PY" benchmarks/gpu_check_env.py "$OUT"
if grep -qx 'HAS_CUDA=1' "$OUT/env.log"; then HAS_CUDA=1; fi

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)

# --------------------------------------------------------- tests, compiled on CUDA
# tests/triton_interpreted/ runs natively when CUDA is visible; the interpreter's run of it
# (test_kernels_under_the_interpreter, a CPU test) is CI's and is left out here.
gpu triton-kernels 300 "${PYTEST[@]}" tests/triton_interpreted tests/test_backend_triton.py \
    --deselect tests/test_backend_triton.py::test_kernels_under_the_interpreter \
    --junitxml="$OUT/triton-kernels.xml"
# torch.compile of the passes and of step() (triton parameters on CUDA) and CUDA-graph replay.
gpu compile 240 "${PYTEST[@]}" tests/test_compile.py --junitxml="$OUT/compile.xml"

# ---------------------------------------------------------- step benchmark
# Rows: whole steps and each Triton pass alone (:gram reads K gradients; :update reads K
# gradients + p, m, v and writes p, m, v), K = 2 and 3, and the copy probe.  No memory
# subprocesses (each costs a CUDA start).  At 1B (4 GB per fp32 tensor) the plain-torch
# rows are left out and K = 3 runs in its own process, so an 80 GB card holds each run.
TRITON2="munba-triton,munba-triton:gram,munba-triton:update"
TRITON3="munba-triton-3players,munba-triton-3players:gram,munba-triton-3players:update"
SMALL="fused-adamw,naive-sum,plain-ops,munba-torch,$TRITON2,naive-sum-3players,$TRITON3,copy-probe"
step() { # NAME TIMEOUT_S NUMEL ROUNDS VARIANTS DTYPE-ARGS...
    local name=$1 limit=$2 numel=$3 rounds=$4 variants=$5
    shift 5
    gpu "$name" "$limit" "$PY" benchmarks/bench_optimizer_step.py --device cuda --numel "$numel" \
        --tensors 10 --rounds "$rounds" --no-memory --variants "$variants" "$@" \
        --out "$OUT/$name.json" --markdown "$OUT/$name.md"
}
BF16=(--dtype bfloat16 --state-dtype float32)
step step-100M-float32 180 100000000 20 "$SMALL" --dtype float32
step step-100M-bf16-fp32states 180 100000000 20 "$SMALL" "${BF16[@]}"
step step-1B-float32 150 1000000000 10 "fused-adamw,$TRITON2,copy-probe" --dtype float32
step step-1B-float32-3players 150 1000000000 10 "fused-adamw,$TRITON3,copy-probe" --dtype float32
step step-1B-bf16-fp32states 150 1000000000 10 "fused-adamw,$TRITON2,copy-probe" "${BF16[@]}"
step step-1B-bf16-fp32states-3players 150 1000000000 10 "fused-adamw,$TRITON3,copy-probe" "${BF16[@]}"

# ---------------------------------------------------------- one whole unlearning step
e2e() { # NAME MODULE MODEL BATCH
    local name=$1 module=$2 model=$3 batch=$4
    if selected "$name" && [ "$DRY_RUN" = 0 ] && [ "$HAS_CUDA" = 1 ] && ! has_module "$module"; then
        record "$name" skip "skipped: $module is not installed" 0
        return
    fi
    gpu "$name" 180 "$PY" benchmarks/bench_unlearning_step.py --device cuda --model "$model" \
        --batch "$batch" --rounds 5 --no-memory --out "$OUT/$name.json" --markdown "$OUT/$name.md"
}
e2e e2e-unet diffusers unet 16
e2e e2e-resnet18 torchvision resnet18 32

# ---------------------------------------------------------- summary
record total "$([ "$FAILED" = 0 ] && echo pass || echo fail)" "wall time of the whole check" $((SECONDS - START))
if ! "$PY" benchmarks/gpu_check_summary.py "$OUT"; then
    echo "[gpu_check] could not write $OUT/summary.md" >&2
    FAILED=1
fi
echo "[gpu_check] summary: $OUT/summary.md"
exit "$FAILED"
