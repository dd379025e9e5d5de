#!/usr/bin/env bash
# Create .venv and install pixelcam with the CPU runtime, the training extra and the dev tools.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# pyproject requires Python >= 3.11: prefer python3.11 over a possibly older python3 (override with PYTHON=...)
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup: $PYTHON is older than 3.11; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# torch is pinned in the `train` extra. pip takes a local CPU wheel when its config points at one; from PyPI alone
# Linux gets the CUDA build (GBs): point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index for the CPU one.
"$VENV/bin/pip" install -q -e ".[cpu,train,dev]"
# The viewer's OpenSeadragon and the API docs' Swagger UI come from npm (pinned in package.json), never copied
# into the repo.
npm install --no-audit --no-fund --silent --ignore-scripts  # plain files only; no package runs code
