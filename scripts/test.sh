#!/usr/bin/env bash
# Install what the tests need (idempotent), then run the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check erasekit tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
