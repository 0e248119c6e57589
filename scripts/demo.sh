#!/usr/bin/env bash
# README command (a): set everything up (idempotent), then run the main job on bundled data:
# make the digits data set once (clipforge make-shards), train with `deepspeed --num_gpus 2` (ZeRO 2,
# DALI, gradient caching, C++ loss), evaluate zero-shot on held-out digits, embed through the API.
# Arguments go to `python -m clipforge.demo` (e.g. --max-steps 100, --output-dir DIR [--force]).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
exec .venv/bin/python -m clipforge.demo "$@"
