#!/usr/bin/env bash
# Idempotent set-up: creates .venv, installs the pinned stack, builds clipforge (with its C++
# extension) in editable mode, and keeps compiled caches inside the repo (.cache/, ignored).
# A second run with nothing changed returns in seconds (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$TORCH_EXTENSIONS_DIR"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"

# The stamp covers every file that decides what gets installed or compiled.
stamp_src=$(cat scripts/setup.sh scripts/requirements.txt setup.py $(ls csrc/*.cpp csrc/*.h 2>/dev/null) | sha256sum | cut -d' ' -f1)
stamp=.venv/.clipforge-setup-stamp
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_src" ] && "$VPY" -c "import torch, clipforge, clipforge._C" 2>/dev/null; then
  echo "[setup] up to date (.venv, clipforge and its C++ extension)"
  exit 0
fi

echo "[setup] installing pinned packages (first run: a few minutes)"
"$VPY" -m pip install -q --upgrade pip setuptools wheel
# torch first, pinned: 2.13.0 is the CPU wheel on this machine's disk; anything unpinned would pull CUDA.
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q -r scripts/requirements.txt
# Test-only oracles. PyPI's torchvision would drag in a different (CUDA) torch, so it goes in without
# its dependencies; tests/conftest.py stubs out torchvision's CUDA-only meta registrations at import (see docs/DESIGN.md).
"$VPY" -m pip install -q --no-deps torchvision==0.28.0 open-clip-torch==3.3.0

echo "[setup] building clipforge and clipforge._C"
# No build isolation: an isolated build would fetch another torch and link against it.
"$VPY" -m pip install -q --no-build-isolation --no-deps -e .
# DeepSpeed compiles the one CPU op the CPU runs use (gloo shared-memory comm) on first use (~90 s):
# do it here, once, into the repo's cache rather than inside the first test that launches ranks.
"$VPY" -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
"$VPY" -c "import torch, clipforge, clipforge._C; print('[setup] clipforge', clipforge.__version__, 'ready')"
echo "$stamp_src" > "$stamp"
