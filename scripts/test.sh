#!/usr/bin/env bash
# The project's test command: set everything up from scratch, lint, run the default (fast, CPU) test set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
