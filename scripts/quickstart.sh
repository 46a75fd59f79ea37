#!/usr/bin/env bash
# Set up hf_dino from nothing and run the main job (the `demo` pretraining on the embedded Fashion-MNIST
# subset, on the CPU, then its k-NN evaluation).  Usage: bash scripts/quickstart.sh [--setup-only]
#
# What it does:
#   1. Debian packages (when run as root with apt-get): chromium (browser tests of the Space) and
#      dataset-fashion-mnist (the full dataset for the longer benchmark).
#   2. A virtual environment in .venv with torch/torchvision and hf_dino[test] (editable).
#   3. `hf-dino train --preset demo --output-dir outputs/demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium dataset-fashion-mnist >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the release this project is tested with (on this workplace it comes from local disk).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"

if [ "${1:-}" = "--setup-only" ]; then
    exit 0
fi
.venv/bin/hf-dino train --preset demo --output-dir outputs/demo
