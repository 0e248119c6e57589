#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200, Python 3.12 with its own torch + triton, NO network).
#
#   bash benchmarks/gpu_check.sh --quick     # <= 4 minutes on an H200: what a 15-minute device budget affords
#   bash benchmarks/gpu_check.sh [BENCH ...] # everything: all GPU tests, every benchmarks/bench_*.py (or those named)
#
# Before (on the dev machine, with network), once:  bash ../shared/tools/gpu-wheels.sh   (fills .whl/)
# Device call: carry [".whl"], command: bash benchmarks/gpu_check.sh --quick, timeout_s 300.
#
# --quick, each step under its own time cap inside a 240 s deadline, writing under $OUT as it goes (so a
# step cut short, or the whole call, still returns what finished):
#   install  the carried wheels into /tmp/site and a symlink shim for clipforge (no C++ build)      ~10 s
#   tests    pytest -m cuda on the kernels' files (tests/test_attention.py, tests/test_contrastive.py,
#            tests/test_siglip.py)                                                                  75 s
#   bench    attention at 50/77/197/257 tokens (ours, SDPA flash / efficient / cuDNN, xformers)     55 s
#            loss at N = 32768, d = 768, bf16 (ours, chunked, reference, ClipLoss, 4 x torch.mm)    35 s
#            one train step of ViT-B/32 at 256 per GPU, bf16, with MFU (clipforge vs OpenCLIP)      45 s
#            SigLIP loss at N = 32768, d = 768, bf16 (ours, chunked, SigLipLoss, 4 x torch.mm)      25 s
#   without a GPU (a CPU emulation of the stack): the compile gate (benchmarks/compile_gate.py --quick)
#   instead of the benchmarks, which need CUDA.
# Files under $OUT (the device tool brings back at most 8): gpu_check.log (everything printed), tests.jsonl
# and rows.jsonl (one JSON line per finished test / benchmark row, benchmarks/jsonl_report.py),
# bench_attention.json, bench_contrastive.json, bench_siglip.json, bench_train_step.json (pytest-benchmark,
# written when each file's session ends), summary.txt.
#
# Environment:
#   OUT                  results folder (the device tool sets it; default runs/gpu_check/<time>)
#   GPU_CHECK_TESTS=0    skip the GPU tests;  GPU_CHECK_BENCH=0  skip the benchmarks
#   GPU_CHECK_BENCH_CPU=1  full mode: also run the benchmarks' CPU cases (measured on the dev machine)
#   GPU_CHECK_INSTALL    shim (default with --quick: symlinks, no build) or editable (default otherwise:
#                        pip install -e . with the C++ extension, falling back to the shim)
#   GPU_CHECK_DEADLINE   seconds for --quick (default 240)
#   PYTHON               interpreter (default python3, the one holding the machine's torch)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
OUT="${OUT:-$ROOT/runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
# Kernels must compile for the GPU: an inherited TRITON_INTERPRET=1 would run them on the CPU.
unset TRITON_INTERPRET
START=$SECONDS
DEADLINE=$((START + ${GPU_CHECK_DEADLINE:-240}))
status=0

say() { printf '\n=== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
# cap SECONDS: the time a step may take, within the --quick deadline (at least 5 s)
cap() {
  if [ "$QUICK" = 0 ]; then echo 3600; return; fi
  local left=$((DEADLINE - SECONDS - 5))
  [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"
}
# run_step NAME SECONDS CMD...: run under a time cap; 124 (cut at its cap) is reported, not fatal
run_step() {
  local name=$1 limit=$2; shift 2
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  case $rc in
    0|5) ;;                                   # 5: pytest collected nothing (e.g. no GPU)
    124|137) echo "[$name] stopped at its ${limit}s cap: what finished is in $OUT"; status=1 ;;
    *) echo "[$name] exit status $rc"; status=1 ;;
  esac
}

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")' \
  || { echo "python / torch / triton do not import: stopping"; exit 1; }
HAS_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')

say "carried wheels"
if compgen -G ".whl/*.whl" > /dev/null; then
  # the line ../shared/tools/gpu-wheels.sh prints: --target keeps them out of the machine's own site-packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  ls .whl
else
  echo "no .whl/ folder (run ../shared/tools/gpu-wheels.sh here and carry [\".whl\"]): tests needing deepspeed / open_clip will fail or skip"
fi

say "clipforge package"
make_shim() {
  # `clipforge` -> engine/, `clipforge.kernels` -> kernels/, as setup.py's package_dir maps them, built
  # from symlinks so relative imports and package data resolve in the repo itself.
  local shim=/tmp/clipforge_shim
  rm -rf "$shim" && mkdir -p "$shim/clipforge"
  for entry in "$ROOT"/engine/*; do ln -s "$entry" "$shim/clipforge/$(basename "$entry")"; done
  rm -f "$shim/clipforge/kernels" && ln -s "$ROOT/kernels" "$shim/clipforge/kernels"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  echo "shim at $shim (no C++ extension: the CPU loss takes the 'chunked' backend; GPU paths do not use it)"
}
mode="${GPU_CHECK_INSTALL:-$([ "$QUICK" = 1 ] && echo shim || echo editable)}"
if [ "$mode" = editable ]; then
  # no build isolation: an isolated build would try to download its own torch (no network here)
  if "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . > /tmp/clipforge_install.log 2>&1; then
    echo "pip install -e . done (C++ extension built against the machine's torch)"
  else
    tail -n 20 /tmp/clipforge_install.log
    echo "editable install failed (log above); falling back to the shim"
    make_shim
  fi
else
  make_shim
fi
"$PY" -c 'import clipforge, clipforge.kernels; print("clipforge", clipforge.__version__, "from", clipforge.__file__)' \
  || { echo "clipforge does not import: stopping"; exit 1; }
# benchmarks/ on the path: the JSON-lines reporter (-p jsonl_report) and the benchmarks' common helpers
export PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider -p jsonl_report)

if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  if [ "$QUICK" = 1 ]; then tests=(tests/test_attention.py tests/test_contrastive.py tests/test_siglip.py); else tests=(tests); fi
  say "GPU tests: pytest -m cuda ${tests[*]}"
  # --continue-on-collection-errors: a test module whose optional dependency is missing here (e.g. DALI)
  # must not stop the others; its error is still counted in the exit status.
  CLIPFORGE_JSONL="$OUT/tests.jsonl" run_step tests "$(cap 75)" \
    "${PYTEST[@]}" "${tests[@]}" -m cuda --continue-on-collection-errors
fi

if [ "${GPU_CHECK_BENCH:-1}" != 0 ] && [ "$HAS_GPU" = 1 ]; then
  if [ "$#" -gt 0 ]; then benches=("$@"); else benches=(benchmarks/bench_*.py); fi
  if [ "$QUICK" = 1 ]; then
    export CLIPFORGE_BENCH_QUICK=1
    # the SigLIP loss last: what the deadline leaves after the train step (its MFU matters more)
    benches=(benchmarks/bench_attention.py benchmarks/bench_contrastive.py benchmarks/bench_train_step.py
             benchmarks/bench_siglip.py)
  fi
  for bench in "${benches[@]}"; do
    [ -f "$bench" ] || { echo "no such benchmark file: $bench"; status=1; continue; }
    name="$(basename "$bench" .py)"
    select=(-m cuda)
    [ "${GPU_CHECK_BENCH_CPU:-0}" = 1 ] && [ "$QUICK" = 0 ] && select=()
    case "$name" in bench_attention) limit=55 ;; bench_contrastive) limit=35 ;; bench_siglip) limit=25 ;; *) limit=45 ;; esac
    say "benchmark $bench"
    CLIPFORGE_JSONL="$OUT/rows.jsonl" run_step "$name" "$(cap $limit)" \
      "${PYTEST[@]}" "$bench" "${select[@]}" --benchmark-only --benchmark-json="$OUT/$name.json" \
      --benchmark-columns=median,iqr,rounds --benchmark-sort=name
  done
elif [ "$HAS_GPU" = 0 ]; then
  say "no GPU: the compile gate instead of the benchmarks (every kernel compiled for sm80 / sm90)"
  run_step compile_gate "$(cap 120)" "$PY" benchmarks/compile_gate.py --quick --json "$OUT/compile_gate.json"
fi

say "summary"
"$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"

say "done in $((SECONDS - START)) s: results in $OUT (exit status $status)"
exit "$status"
