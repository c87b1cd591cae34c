#!/usr/bin/env bash
# Install what the demo needs (idempotent), then run erasekit's main demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/erasekit demo "$@"
