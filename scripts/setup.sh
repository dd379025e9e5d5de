#!/usr/bin/env bash
# Create .venv and install pixelcam with the CPU runtime, the training extra and the dev tools.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# torch is pinned in the `train` extra: pip takes the CPU wheel that lies on this machine's disk.
"$VENV/bin/pip" install -q -e ".[cpu,train,dev]"
# The viewer's OpenSeadragon comes from its npm package (pinned in package.json), never copied into the repo.
npm install --no-audit --no-fund --silent
