#!/usr/bin/env bash
# Set everything up and run the main job: `guess-optim train` (wt on mnist-5k by default). Extra args pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/guess-optim train "$@"
