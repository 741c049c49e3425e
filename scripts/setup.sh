#!/usr/bin/env bash
# Create .venv (if missing) and install guess-optim with its dev, vision and hf extras.
# torch 2.14.1 / torchvision 0.29.1 are pinned here because those wheels are available offline on our machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[dev,vision,hf]"
