#!/usr/bin/env bash
# README command (b): set everything up (idempotent), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
