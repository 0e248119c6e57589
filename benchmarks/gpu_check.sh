#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200, Python 3.12 with its own torch + triton, NO network):
# install the carried wheels, make `import clipforge` work, run the GPU tests (pytest -m cuda), run
# every benchmarks/bench_*.py with --benchmark-json, and print a short table.
#
# Before (on the dev machine, with network), once:  bash ../shared/tools/gpu-wheels.sh   (fills .whl/)
# Device call: carry [".whl"], command:             bash benchmarks/gpu_check.sh [BENCH_FILE ...]
#   BENCH_FILE: benchmark files to run (default: all benchmarks/bench_*.py), e.g. benchmarks/bench_attention.py
# Environment:
#   OUT                  results folder (the device tool sets it; default runs/gpu_check/<time>). Gets
#                        tests.log, bench.log, summary.txt, one bench_<name>.json per benchmark file, and
#                        install.log only when the editable install failed (the device tool brings back
#                        at most 8 files: keep benchmarks/bench_*.py to 5 or fewer, or name them).
#   GPU_CHECK_TESTS=0    skip the GPU tests;  GPU_CHECK_BENCH=0  skip the benchmarks
#   GPU_CHECK_BENCH_CPU=1  also run the benchmarks' CPU cases (default: only those marked `cuda`: the CPU
#                        ones take minutes and are measured on the dev machine)
#   GPU_CHECK_INSTALL    editable (default: pip install -e . with the C++ extension, falling back to
#                        the shim when that fails) or shim (symlinks only, no build)
#   PYTHON               interpreter (default python3, the one holding the machine's torch)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Kernels must compile for the GPU: an inherited TRITON_INTERPRET=1 would run them on the CPU.
unset TRITON_INTERPRET
status=0

say() { printf '\n=== %s\n' "$*"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")'

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
  echo "shim at $shim (no C++ extension: ops that use clipforge._C fall back to the PyTorch reference)"
}
mode="${GPU_CHECK_INSTALL:-editable}"
if [ "$mode" = editable ]; then
  # no build isolation: an isolated build would try to download its own torch (no network here)
  if "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . > /tmp/clipforge_install.log 2>&1; then
    echo "pip install -e . done (C++ extension built against the machine's torch)"
  else
    cp /tmp/clipforge_install.log "$OUT/install.log"
    tail -n 20 "$OUT/install.log"
    echo "editable install failed (log above); falling back to the shim"
    make_shim
  fi
else
  make_shim
fi
"$PY" -c 'import clipforge, clipforge.kernels; print("clipforge", clipforge.__version__, "from", clipforge.__file__)' \
  || { echo "clipforge does not import: stopping"; exit 1; }

if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  say "GPU tests: pytest -m cuda tests"
  # --continue-on-collection-errors: a test module whose optional dependency is missing here (e.g. DALI)
  # must not stop the others; its error is still counted in the exit status and listed in tests.log.
  "$PY" -m pytest tests -m cuda -q -rfEs -p no:cacheprovider --continue-on-collection-errors 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1  # 5: nothing collected
fi

if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  if [ "$#" -gt 0 ]; then benches=("$@"); else benches=(benchmarks/bench_*.py); fi
  : > "$OUT/bench.log"
  for bench in "${benches[@]}"; do
    [ -f "$bench" ] || { echo "no such benchmark file: $bench"; status=1; continue; }
    name="$(basename "$bench" .py)"
    say "benchmark $bench"
    select=(-m cuda)
    [ "${GPU_CHECK_BENCH_CPU:-0}" = 1 ] && select=()
    "$PY" -m pytest "$bench" "${select[@]}" -q -rfEs -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/$name.json" \
      --benchmark-columns=median,iqr,rounds --benchmark-sort=name 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1
  done

  say "summary"
  "$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
"""Print one line per benchmark (per-op median and its extra_info figures), then, for attention, the
speed of the Triton kernel relative to each peer at every shape and pass."""
import glob
import json
import os
import sys

out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    with open(path) as f:
        data = json.load(f)
    benches = data.get("benchmarks", [])
    print(f"\n## {os.path.basename(path)}  ({data.get('machine_info', {}).get('node', '?')}, {len(benches)} results)")
    if not benches:
        continue
    print(f"{'benchmark':<58} {'ms/op':>9} {'TFLOP/s':>8} {'GB/s':>8} {'peak MB':>9}")
    for b in benches:
        info = b.get("extra_info", {})
        ms = info.get("ms_per_op", b["stats"]["median"] * 1e3)
        cols = [f"{info[k]:.1f}" if isinstance(info.get(k), (int, float)) else "-" for k in ("tflops", "gbps", "peak_mem_mb")]
        print(f"{b['name'][:58]:<58} {ms:>9.4f} {cols[0]:>8} {cols[1]:>8} {cols[2]:>9}")
    rows = [b["extra_info"] for b in benches if {"provider", "shape", "pass", "ms_per_op"} <= b.get("extra_info", {}).keys()]
    if any(r["provider"] == "triton" for r in rows):
        table = {(r["shape"], r["pass"], r["provider"]): r["ms_per_op"] for r in rows}
        peers = sorted({r["provider"] for r in rows} - {"triton"})
        print(f"\nspeed of triton relative to each peer (peer time / triton time; > 1 means triton is faster)")
        print(f"{'shape':<20} {'pass':<8} " + " ".join(f"{p:>15}" for p in peers))
        for shape, pass_ in sorted({(r["shape"], r["pass"]) for r in rows}):
            ours = table.get((shape, pass_, "triton"))
            cells = [f"{table[(shape, pass_, p)] / ours:>14.2f}x" if ours and (shape, pass_, p) in table else f"{'-':>15}" for p in peers]
            print(f"{shape:<20} {pass_:<8} " + " ".join(cells))
EOF
fi

say "done: results in $OUT (exit status $status)"
exit "$status"
